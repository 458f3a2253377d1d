"""GPU check (run on a CUDA machine): QVPO's update and acting on CUDA at the paper's settings,
1 versus 5 seeds per process, and a short multi-seed training run through the Trainer.

    python benchmarks/gpu_check.py [--seeds 1 5] [--steps 1500]

Prints, for each seeds-per-process N: ms per update of the whole process and seed-updates per
second (N / update time), ms per behaviour action; the CPU-vs-CUDA sampler agreement on the same
weights and noise; and a short Hopper-v5 run with device='cuda'. No MLflow needed.
"""

import argparse
import time

import gin
import torch

import qvpo.config  # noqa: F401
from qvpo.agents.base import AgentContext
from qvpo.agents.qvpo import QVPO
from qvpo.buffers import ReplayBuffer, SeedBuffers
from qvpo.rng import init_generators
from qvpo.train import Trainer

OBS, ACT = 11, 3  # Hopper-v5


def timed(fn, n):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n


def buffers(n_seeds, device):
    bufs = []
    for k in range(n_seeds):
        b = ReplayBuffer(OBS, ACT, capacity=10_000, device=device)
        x = torch.randn(2001, OBS)
        b.add_batch(x[:-1], torch.rand(2000, ACT) * 2 - 1, torch.ones(2000), x[1:], torch.zeros(2000))
        bufs.append(b)
    return SeedBuffers(bufs, list(range(n_seeds)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--steps", type=int, default=1500)
    args = ap.parse_args()
    assert torch.cuda.is_available(), "no CUDA device"
    dev = torch.device("cuda")
    print("device:", torch.cuda.get_device_name(0), "torch", torch.__version__, flush=True)
    for precision in ("fp32", "bf16"):
        for n in args.seeds:
            gin.clear_config()
            gin.parse_config([f"DiffusionPolicy.precision = '{precision}'"])
            agent = QVPO(AgentContext(OBS, ACT, seeds=tuple(range(n)), device=dev))
            buf = buffers(n, dev)
            t_up = timed(lambda: agent.update(buf, 20_000), 10)
            obs = torch.randn(n, 1, OBS, device=dev)
            t_act = timed(lambda: agent.act(obs, True), 30)
            print(f"{precision} seeds_per_process={n}: update {t_up * 1e3:.1f} ms -> {n / t_up:.1f} seed-updates/s; "
                  f"behaviour action {t_act * 1e3:.2f} ms; peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB",
                  flush=True)
            del agent, buf
            torch.cuda.empty_cache()

    gin.clear_config()
    from qvpo.diffusion import DiffusionPolicy
    pol = DiffusionPolicy(OBS, ACT, init_generators([0]))
    states, noise = torch.randn(1, 8, OBS), torch.randn(1, pol.T, 8 * 16, ACT)
    a_cpu = pol.sample(states, 16, noise=noise)
    a_gpu = pol.to(dev).sample(states.to(dev), 16, noise=noise.to(dev)).cpu()
    print(f"sampler CPU vs CUDA, same weights and noise: max |diff| = {(a_cpu - a_gpu).abs().max():.2e}", flush=True)

    n = max(args.seeds)
    gin.parse_config([f"Trainer.total_steps = {args.steps}", "Trainer.warmup_steps = 1000",
                      f"Trainer.eval_every = {args.steps}", "Trainer.eval_episodes = 2",
                      "Trainer.device = 'cuda'", "Trainer.env_id = 'Hopper-v5'",
                      f"Trainer.seeds_per_process = {n}", "Trainer.progress = False"])
    tr = Trainer()
    t = time.perf_counter()
    res = tr.run()
    dt = time.perf_counter() - t
    print(f"Trainer on Hopper-v5, device={tr.device}, {n} seeds, {args.steps} steps (1000 warm-up): "
          f"{dt:.1f} s; eval returns {[round(r.final_eval, 1) for r in res]}", flush=True)


if __name__ == "__main__":
    main()
