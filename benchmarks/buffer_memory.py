"""Resident memory of a full paper-size replay buffer (Humanoid-v5 shapes, capacity 1,000,000).

Fills a ReplayBuffer with random float32 rows in env-step order (episodes of `--episode-len`
steps, then a fresh reset observation), in chunks of `--chunk` transitions through `add_batch`
(or `add()` per step with `--per-step`), and reports the process's resident set size (VmRSS) before
and after (after glibc's malloc_trim, so freed input chunks do not count), next to
`ReplayBuffer.nbytes`. Run:

    .venv/bin/python benchmarks/buffer_memory.py

`--module FILE` measures the ReplayBuffer of another buffers.py (e.g. an older version from
`git show REV:qvpo/buffers.py > /tmp/old_buffers.py`); such a buffer is filled with add().
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.util
import time

import torch


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def release_free_heap() -> None:
    """Hand glibc's freed-but-kept heap back to the OS, so RSS counts what is still allocated."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def load_buffer_class(module: str | None):
    if module is None:
        from qvpo.buffers import ReplayBuffer
        return ReplayBuffer
    spec = importlib.util.spec_from_file_location("other_buffers", module)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.ReplayBuffer


def chunks(n_steps: int, obs_dim: int, action_dim: int, chunk: int, episode_len: int, seed: int):
    """(obs, action, reward, next_obs, terminal) tensors of <= chunk rows, consecutive env steps."""
    g = torch.Generator().manual_seed(seed)
    obs0 = torch.randn(obs_dim, generator=g)  # the first observation of the next chunk
    done = 0
    while done < n_steps:
        n = min(chunk, n_steps - done)
        nxt = torch.randn(n, obs_dim, generator=g)
        obs = torch.cat([obs0[None], nxt[:-1]])
        steps = torch.arange(done, done + n)
        ends = (steps + 1) % episode_len == 0           # the episode's last step (time limit)
        later = ends[:-1].nonzero().flatten() + 1        # the step after an end starts from a reset
        obs[later] = torch.randn(len(later), obs_dim, generator=g)
        obs0 = torch.randn(obs_dim, generator=g) if ends[-1] else nxt[-1]
        yield (obs, torch.rand(n, action_dim, generator=g) * 2 - 1, torch.randn(n, generator=g),
               nxt, torch.zeros(n))
        done += n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--obs-dim", type=int, default=348)     # Humanoid-v5
    p.add_argument("--action-dim", type=int, default=17)
    p.add_argument("--capacity", type=int, default=1_000_000)
    p.add_argument("--steps", type=int, default=None,
                   help="transitions added (default: capacity * 1.01, so the ring wraps)")
    p.add_argument("--episode-len", type=int, default=1000)
    p.add_argument("--chunk", type=int, default=10_000)
    p.add_argument("--per-step", action="store_true", help="add() per transition instead of add_batch")
    p.add_argument("--module", default=None, help="a buffers.py file to load ReplayBuffer from")
    args = p.parse_args()
    torch.set_num_threads(1)
    steps = args.steps if args.steps is not None else args.capacity + args.capacity // 100
    cls = load_buffer_class(args.module)

    gc.collect()
    release_free_heap()
    rss0 = rss_bytes()
    buf = cls(args.obs_dim, args.action_dim, capacity=args.capacity)
    rss_built = rss_bytes()
    batched = hasattr(buf, "add_batch") and not args.per_step
    t0 = time.perf_counter()
    for obs, action, reward, next_obs, terminal in chunks(steps, args.obs_dim, args.action_dim,
                                                          args.chunk, args.episode_len, seed=0):
        if batched:
            buf.add_batch(obs, action, reward, next_obs, terminal)
        else:
            for row in zip(obs, action, reward.tolist(), next_obs, terminal.tolist()):
                buf.add(*row)
    fill_s = time.perf_counter() - t0
    del obs, action, reward, next_obs, terminal
    gc.collect()
    buf.sample(256)
    rss_filled = rss_bytes()
    release_free_heap()
    rss1 = rss_bytes()

    nbytes = getattr(buf, "nbytes", None)
    print(f"buffer: {args.module or 'qvpo.buffers'}  obs {args.obs_dim}  action {args.action_dim}  "
          f"capacity {args.capacity:,}  added {steps:,}  stored {len(buf):,}  "
          f"fill {'add_batch' if batched else 'add()'} {fill_s:.1f} s")
    print(f"RSS before {rss0 / 1e9:.3f} GB, after construction {rss_built / 1e9:.3f} GB, "
          f"after filling {rss_filled / 1e9:.3f} GB, after malloc_trim {rss1 / 1e9:.3f} GB")
    print(f"RSS increase: {rss1 - rss0:,} bytes ({(rss1 - rss0) / 1e9:.3f} GB)")
    if nbytes is not None:
        print(f"ReplayBuffer.nbytes: {nbytes:,} bytes ({nbytes / 1e9:.3f} GB)")


if __name__ == "__main__":
    main()
