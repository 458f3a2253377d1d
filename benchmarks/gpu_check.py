"""GPU check (run on a CUDA machine): QVPO's update, acting and a short training run on CUDA.

    python benchmarks/gpu_check.py [--steps 3000]

Prints: per-update / per-action times at the paper's settings (Hopper-v5 dims, B 256, Nd 64,
T 20, Kb = Kt = 4, eval K 32), the CPU-vs-CUDA sampler agreement on the same weights and noise,
and a short Hopper-v5 run through the Trainer with device='cuda'. No MLflow needed.
"""

import argparse
import time

import gin
import torch

import qvpo.config  # noqa: F401
from qvpo.agents.qvpo import QVPO
from qvpo.buffers import ReplayBuffer
from qvpo.train import Trainer


def timed(fn, n, sync):
    fn()
    sync()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - t) / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3000)
    args = ap.parse_args()
    assert torch.cuda.is_available(), "no CUDA device"
    dev = torch.device("cuda")
    print("device:", torch.cuda.get_device_name(0), "torch", torch.__version__, flush=True)
    sync = torch.cuda.synchronize

    torch.manual_seed(0)
    agent = QVPO(11, 3, device=dev)
    buf = ReplayBuffer(11, 3, capacity=10_000, device=dev)
    for _ in range(2_000):
        buf.add(torch.randn(11), torch.rand(3) * 2 - 1, 1.0, torch.randn(11), False)
    t_up = timed(lambda: agent.update(buf, 20_000), 20, sync)
    obs = torch.randn(1, 11, device=dev)
    t_b = timed(lambda: agent.act(obs, True), 50, sync)
    t_e = timed(lambda: agent.act(obs, False), 50, sync)
    print(f"paper settings on CUDA: update {t_up * 1e3:.1f} ms, behaviour action (Kb 4) {t_b * 1e3:.2f} ms, "
          f"eval action (K 32) {t_e * 1e3:.2f} ms", flush=True)

    # the same weights and noise give the same samples on CPU and CUDA
    pol_cpu = agent.policy.to("cpu")
    states = torch.randn(8, 11)
    noise = torch.randn(pol_cpu.T, 8 * 16, 3)
    a_cpu = pol_cpu.sample(states, 16, noise=noise)
    pol_gpu = pol_cpu.to(dev)
    a_gpu = pol_gpu.sample(states.to(dev), 16, noise=noise.to(dev)).cpu()
    print(f"sampler CPU vs CUDA, same weights and noise: max |diff| = {(a_cpu - a_gpu).abs().max():.2e}", flush=True)

    gin.parse_config([f"Trainer.total_steps = {args.steps}", "Trainer.warmup_steps = 1000",
                      f"Trainer.eval_every = {args.steps}", "Trainer.eval_episodes = 2",
                      "Trainer.device = 'cuda'", "Trainer.env_id = 'Hopper-v5'",
                      "Trainer.progress = False"])
    tr = Trainer()
    t = time.perf_counter()
    res = tr.run()
    dt = time.perf_counter() - t
    print(f"Trainer on Hopper-v5, device={tr.device}, {args.steps} steps (1000 warm-up): {dt:.1f} s, "
          f"{(args.steps - 1000) / dt:.1f} updates/s incl. env; eval return {res.final_eval:.1f}; "
          f"episodes {len(res.episodes)}", flush=True)


if __name__ == "__main__":
    main()
