"""Render a pytest-benchmark JSON file as a markdown table, with the machine it ran on."""

import json
import sys


def main(path: str) -> None:
    data = json.load(open(path))
    m = data["machine_info"]
    cpu = m.get("cpu", {})
    flags = set(cpu.get("flags", []))
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    print(f"Machine: {cpu.get('brand_raw', m.get('processor', '?'))}, {cpu.get('count', '?')} cores, "
          f"Python {m.get('python_version')}; ISA: {', '.join(isa) or 'n/a'}; {data['datetime']}\n")
    print("| benchmark | what | median | mean | rounds |")
    print("|---|---|---|---|---|")
    for b in data["benchmarks"]:
        s = b["stats"]
        fmt = lambda x: f"{x * 1e3:.2f} ms" if x < 1 else f"{x:.3f} s"  # noqa: E731
        print(f"| {b['name']} | {b.get('extra_info', {}).get('what', '')} | {fmt(s['median'])} | "
              f"{fmt(s['mean'])} | {s['rounds']} |")


if __name__ == "__main__":
    main(sys.argv[1])
