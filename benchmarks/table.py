"""Render a pytest-benchmark JSON file as a markdown table, with the machine it ran on and each
QVPO figure as a multiple of the machine's floor (benchmarks/floor.py)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from floor import Shapes, floor_seconds, mixed_floor, sampler_costs, update_costs  # noqa: E402

REFERENCE_UPDATE_S = 1.7  # the authors' code on the project's 2-core CPU (docs/paper-notes.md#cost)


def main(path: str) -> None:
    data = json.load(open(path))
    m = data["machine_info"]
    cpu = m.get("cpu", {})
    flags = set(cpu.get("flags", []))
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    print(f"Machine: {cpu.get('brand_raw', m.get('processor', '?'))}, {cpu.get('count', '?')} cores, "
          f"Python {m.get('python_version')}; ISA: {', '.join(isa) or 'n/a'}; {data['datetime']}\n")
    bench = {b["name"]: b for b in data["benchmarks"]}
    fmt = lambda x: f"{x * 1e3:.2f} ms" if x < 1 else f"{x:.3f} s"  # noqa: E731

    floors = {}
    if {"test_floor_matmul_fp32", "test_floor_exp_pass"} <= bench.keys():
        med = lambda k: bench[k]["stats"]["median"]  # noqa: E731
        fp32 = bench["test_floor_matmul_fp32"]["extra_info"]["flops"] / med("test_floor_matmul_fp32")
        exp_s = med("test_floor_exp_pass") / bench["test_floor_exp_pass"]["extra_info"]["elements"]
        costs = update_costs(Shapes())
        floors["fp32"] = floor_seconds(costs, fp32, exp_s)
        beh = {"sampling": sampler_costs(Shapes(batch=1, Nd=4), 4)}
        floors["act_kb4"] = floor_seconds(beh, fp32, exp_s)
        floors["act_k32"] = floor_seconds({"sampling": sampler_costs(Shapes(batch=1, Nd=32), 32)}, fp32, exp_s)
        lines = [f"- matmul at the sampler's shape: fp32 {fp32 / 1e9:.0f} GFLOP/s"]
        if "test_floor_matmul_bf16" in bench:
            bf16 = bench["test_floor_matmul_bf16"]["extra_info"]["flops"] / med("test_floor_matmul_bf16")
            # bf16 sampler: the samplers' matmuls in bf16, the rest (scoring, training) in fp32;
            # with TwinQ.scoring_precision = 'bf16' the candidates' scoring too
            floors["bf16"] = mixed_floor(costs, fp32, bf16, exp_s, ("sampling",))
            floors["bf16_score"] = mixed_floor(costs, fp32, bf16, exp_s, ("sampling", "scoring"))
            lines[0] += f", bf16 {bf16 / 1e9:.0f} GFLOP/s"
        lines.append(f"- one exp pass: {exp_s * 1e9:.3f} ns per element")
        total = sum(f for f, _ in costs.values())
        lines.append(f"- one QVPO update at the paper's settings: {total / 1e9:.1f} GFLOP; floor "
                     f"{floors['fp32']:.3f} s in fp32" + (f", {floors['bf16']:.3f} s with a bf16 sampler, {floors['bf16_score']:.3f} s "
                     "with bf16 sampling and scoring" if "bf16" in floors else ""))
        print("\n".join(lines) + "\n")

    print("| benchmark | what | median | mean | rounds | x floor | reference / this |")
    print("|---|---|---|---|---|---|---|")
    for b in data["benchmarks"]:
        st, name = b["stats"], b["name"]
        key = {"test_qvpo_update_paper_settings": "fp32", "test_qvpo_update_fast_modes[fp32-False-False-fp32]": "fp32",
               "test_qvpo_update_fast_modes[fp32-True-False-fp32]": "fp32",
               "test_qvpo_update_fast_modes[bf16-False-True-fp32]": "bf16",
               "test_qvpo_update_fast_modes[bf16-False-True-bf16]": "bf16_score",
               "test_qvpo_update_fast_modes[bf16-True-False-fp32]": "bf16",
               "test_qvpo_behaviour_action_kb4": "act_kb4", "test_qvpo_eval_action_k32": "act_k32"}.get(name)
        x_floor = f"{st['median'] / floors[key]:.2f}" if key in floors else ""
        vs_ref = f"{REFERENCE_UPDATE_S / st['median']:.2f}x" if key in ("fp32", "bf16", "bf16_score") else ""
        print(f"| {name} | {b.get('extra_info', {}).get('what', '')} | {fmt(st['median'])} | "
              f"{fmt(st['mean'])} | {st['rounds']} | {x_floor} | {vs_ref} |")

    interleaved = [b for b in data["benchmarks"] if "ratio" in b.get("extra_info", {})]
    if interleaved:
        print("\n| one update over the floor measured in the same round | update (median) | floor (median) "
              "| x floor: median (min - max over rounds) | reference / this |")
        print("|---|---|---|---|---|")
        for b in interleaved:
            info = b["extra_info"]
            med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
            r = info["ratio"]
            print(f"| {info['what']} | {fmt(med(info['update_s']))} | {fmt(med(info['floor_s']))} | "
                  f"{med(r):.2f} ({min(r):.2f} - {max(r):.2f}) | {REFERENCE_UPDATE_S / med(info['update_s']):.2f}x |")

    throughput = {}  # (algo, library) -> env steps / s
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        if "env_steps" in info:
            throughput[info["algo"], info["library"]] = info["env_steps"] / b["stats"]["median"]
    algos = sorted({a for a, _ in throughput})
    if algos:
        print("\n| training on Hopper-v5 (CPU) | qvpo env steps/s | stable-baselines3 env steps/s | qvpo / SB3 |")
        print("|---|---|---|---|")
        for a in algos:
            ours, theirs = throughput.get((a, "qvpo")), throughput.get((a, "sb3"))
            ratio = f"{ours / theirs:.2f}" if ours and theirs else ""
            print(f"| {a} | {ours or 0:.0f} | {theirs or 0:.0f} | {ratio} |")


if __name__ == "__main__":
    main(sys.argv[1])
