"""The off-policy training loop: warm-up, interaction, updates, evaluation, metrics, artifacts.

No algorithm maths here: the loop asks the agent for actions and updates and hands metrics to a
`log(metrics, step)` callable (tracking.py sends them to MLflow). Steps are env steps throughout.
"""

from __future__ import annotations

import csv
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import gin
import numpy as np
import torch
from tqdm import tqdm

from qvpo.agents.base import Agent
from qvpo.agents.qvpo import QVPO
from qvpo.buffers import ReplayBuffer
from qvpo.envs import check_env_id, env_dims, make_env
from qvpo.errors import ConfigError, require, require_int
from qvpo.timing import PhaseTimer

LogFn = Callable[[dict[str, float], int], None]


def resolve_device(device: str) -> torch.device:
    require(device in ("auto", "cpu", "cuda") or device.startswith("cuda:"),
            f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but torch sees no CUDA device; use --device cpu or auto")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class MetricAccumulator:
    """Sums the agent's per-update metric tensors on the device; one host sync per `pop`."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor | float] = {}
        self.count = 0

    def add(self, metrics: dict[str, torch.Tensor | float]) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.count += 1

    def pop(self) -> dict[str, float]:
        """Means over the updates since the last pop."""
        n = max(self.count, 1)
        out = {k: float(v) / n for k, v in self.sums.items() if not torch.is_tensor(v)}
        keys = [k for k, v in self.sums.items() if torch.is_tensor(v)]
        if keys:  # one device-to-host transfer for all tensor metrics
            values = torch.stack([self.sums[k].float().reshape(()) for k in keys]).tolist()
            out.update({k: v / n for k, v in zip(keys, values)})
        self.sums, self.count = {}, 0
        return out


@dataclass
class EvalRecord:
    step: int
    returns: list[float]

    @property
    def mean(self) -> float:
        return float(np.mean(self.returns))

    @property
    def std(self) -> float:
        return float(np.std(self.returns))


@dataclass
class TrainResult:
    evaluations: list[EvalRecord] = field(default_factory=list)
    episodes: list[tuple[int, float]] = field(default_factory=list)  # (env step at end, return)

    @property
    def final_eval(self) -> float | None:
        return self.evaluations[-1].mean if self.evaluations else None

    @property
    def best_eval(self) -> float | None:
        return max(e.mean for e in self.evaluations) if self.evaluations else None


@gin.configurable
class Trainer:
    """Builds env, replay buffer and agent, then runs the off-policy loop.

    Args:
      env_id: Gymnasium task id.
      agent: the agent class (gin: `Trainer.agent = @QVPO`).
      total_steps: env steps in the run (QVPO.md: 1,000,000).
      warmup_steps: uniformly random actions before the first update (QVPO.md: 10,000).
      updates_per_step: gradient updates per env step after warm-up (QVPO.md: 1).
      eval_every: env steps between evaluations (QVPO.md: 10,000).
      eval_episodes: episodes per evaluation (QVPO.md: 10).
      seed: seeds python, numpy, torch, the envs and the buffer's sampler.
      device: 'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'.
      truncation_is_terminal: store a time-limit truncation as terminal, as the reference code
        does (a bug: it stops bootstrapping at the time limit). False = bootstrap, the default.
      log_every: env steps between metric flushes (averages of the updates in between).
      progress: show a progress bar.
      num_threads: torch intra-op threads (0 = torch's default, one per core).
    """

    def __init__(self, env_id: str = "Hopper-v5",
                 agent: Callable[..., Agent] = QVPO,
                 total_steps: int = 1_000_000,
                 warmup_steps: int = 10_000,
                 updates_per_step: int = 1,
                 eval_every: int = 10_000,
                 eval_episodes: int = 10,
                 seed: int = 0,
                 device: str = "auto",
                 truncation_is_terminal: bool = False,
                 log_every: int = 1_000,
                 progress: bool = True,
                 num_threads: int = 0):
        require_int(total_steps, "Trainer.total_steps (--steps)", 0)
        require_int(warmup_steps, "Trainer.warmup_steps", 0)
        require_int(updates_per_step, "Trainer.updates_per_step", 0)
        require_int(eval_every, "Trainer.eval_every (env steps)", 1)
        require_int(eval_episodes, "Trainer.eval_episodes", 1)
        require_int(log_every, "Trainer.log_every (env steps)", 1)
        require_int(seed, "Trainer.seed (--seed)", 0)
        require(isinstance(env_id, str), f"Trainer.env_id (--env) must be a string, got {env_id!r}")
        check_env_id(env_id)
        self.env_id, self.total_steps, self.warmup_steps = env_id, int(total_steps), warmup_steps
        self.updates_per_step, self.eval_every, self.eval_episodes = updates_per_step, eval_every, eval_episodes
        self.seed, self.truncation_is_terminal = seed, truncation_is_terminal
        self.log_every, self.progress = log_every, progress
        require_int(num_threads, "Trainer.num_threads", 0)
        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = resolve_device(device)

        seed_everything(seed)
        self.env = make_env(env_id, seed=seed)
        # evaluation envs: their own seeds, so evaluation never perturbs the training stream
        self.eval_envs = [make_env(env_id, seed=seed + 10_000 + i) for i in range(eval_episodes)]
        obs_dim, action_dim = env_dims(self.env)
        self.timer = PhaseTimer(self.device)
        self.agent = agent(obs_dim=obs_dim, action_dim=action_dim, device=self.device,
                           total_steps=self.total_steps, timer=self.timer)
        self.buffer = ReplayBuffer(obs_dim, action_dim, device=self.device)
        self.buffer.seed(seed)
        require(self.agent.batch_size <= self.buffer.capacity,
                f"batch size {self.agent.batch_size} is larger than the replay buffer "
                f"(ReplayBuffer.capacity = {self.buffer.capacity}); lower the batch or raise the capacity")

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> list[float]:
        """Run eval_episodes episodes in lockstep, one batched act() per step for all that run."""
        obs = [env.reset()[0] for env in self.eval_envs]
        returns = [0.0] * len(self.eval_envs)
        running = list(range(len(self.eval_envs)))
        while running:
            batch = torch.as_tensor(np.stack([obs[i] for i in running]), dtype=torch.float32,
                                    device=self.device)
            actions = self.agent.act(batch, explore=False).cpu().numpy()
            still = []
            for i, a in zip(running, actions):
                obs[i], r, term, trunc, _ = self.eval_envs[i].step(a)
                returns[i] += float(r)
                if not (term or trunc):
                    still.append(i)
            running = still
        return returns

    # ------------------------------------------------------------------ the loop
    def run(self, log: LogFn = lambda metrics, step: None, out_dir: Path | None = None) -> TrainResult:
        result = TrainResult()
        acc = MetricAccumulator()
        timer, agent, env = self.timer, self.agent, self.env
        obs, _ = env.reset(seed=self.seed)
        ep_return, ep_len = 0.0, 0
        last_eval = None
        t_log, steps_at_log = time.perf_counter(), 0
        bar = tqdm(total=self.total_steps, unit="step", dynamic_ncols=True, disable=not self.progress,
                   desc=f"{type(agent).__name__} {self.env_id}")
        for step in range(1, self.total_steps + 1):  # `step` = env steps taken so far, after this one
            if step <= self.warmup_steps:
                action = env.action_space.sample()
            else:
                with timer.phase("sampling"):
                    obs_t = torch.as_tensor(obs, dtype=torch.float32, device=self.device)[None]
                    action = agent.act(obs_t, explore=True)[0].cpu().numpy()
            with timer.phase("env"):
                next_obs, reward, terminated, truncated, _ = env.step(action)
            terminal = terminated or (truncated and self.truncation_is_terminal)
            self.buffer.add(obs, action, reward, next_obs, terminal)
            obs = next_obs
            ep_return += float(reward)
            ep_len += 1
            if terminated or truncated:
                result.episodes.append((step, ep_return))
                log({"train/episode_return": ep_return, "train/episode_length": ep_len}, step)
                with timer.phase("env"):
                    obs, _ = env.reset()
                ep_return, ep_len = 0.0, 0

            if step > self.warmup_steps and len(self.buffer) >= agent.batch_size:
                for _ in range(self.updates_per_step):
                    acc.add(agent.update(self.buffer, step))

            if step % self.eval_every == 0 or step == self.total_steps:
                with timer.phase("eval"):
                    returns = self.evaluate()
                rec = EvalRecord(step, returns)
                is_best = result.best_eval is None or rec.mean > result.best_eval
                result.evaluations.append(rec)
                last_eval = rec.mean
                log({"eval/return_mean": rec.mean, "eval/return_std": rec.std,
                     "eval/return_best": result.best_eval}, step)
                if out_dir is not None:
                    if is_best:
                        save_checkpoint(out_dir / "checkpoints" / "best.pt", agent, step, rec.mean)
                    write_eval_csv(out_dir / "eval.csv", result.evaluations)
                bar.set_postfix(eval=f"{last_eval:.1f}", refresh=False)

            if step % self.log_every == 0 or step == self.total_steps:
                now = time.perf_counter()
                n = step - steps_at_log
                metrics = acc.pop()
                metrics["perf/steps_per_s"] = n / max(now - t_log, 1e-9)
                for phase, secs in timer.pop().items():
                    metrics[f"time/{phase}_ms_per_step"] = 1e3 * secs / n
                log(metrics, step)
                t_log, steps_at_log = now, step
            bar.update(1)
        bar.close()
        if out_dir is not None:
            save_checkpoint(out_dir / "checkpoints" / "final.pt", agent, self.total_steps, result.final_eval)
            write_eval_csv(out_dir / "eval.csv", result.evaluations)
            from qvpo.plots import plot_learning_curve
            plot_learning_curve(result, out_dir / "learning_curve.png",
                                title=f"{type(agent).__name__} on {self.env_id} (seed {self.seed})")
        return result

    def close(self) -> None:
        for env in [self.env, *self.eval_envs]:
            env.close()


def save_checkpoint(path: Path, agent: Agent, step: int, eval_return: float | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"agent": agent.state_dict(), "step": step, "eval_return": eval_return}, tmp)
    tmp.replace(path)


def write_eval_csv(path: Path, evaluations: list[EvalRecord]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        n = max(len(e.returns) for e in evaluations) if evaluations else 0
        w.writerow(["step", "return_mean", "return_std", *[f"return_{i}" for i in range(n)]])
        for e in evaluations:
            w.writerow([e.step, f"{e.mean:.4f}", f"{e.std:.4f}", *[f"{r:.4f}" for r in e.returns]])
