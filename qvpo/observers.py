"""Small jobs the trainer's loops hand their events to, kept out of the loops themselves.

An observer sees each transition, each episode end, each evaluation and the end of the run, for
one seed k at a time; what it returns at an episode end is logged with that episode's metrics.
Two ship with the package: the critic's overestimation against Monte-Carlo returns
(`QBiasObserver`) and the run's files (`ArtifactWriter`: best and final agent checkpoints,
eval.csv, the learning curve).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import torch

from qvpo.checkpoint import atomic_save


class Observer:
    """The hooks, all optional. `trainer` is the running qvpo.train.Trainer.

    Attach one with `Trainer.add_observer` (or `qvpo.run(..., observers=[...])`). An observer
    only watches: what it returns is logged, nothing it does changes what the run computes (so it
    is no part of the run's identity). Its `state_dict` goes into the trainer's checkpoint under
    the observer's `name` (the class name unless set), so a resumed run continues its episodes.
    """

    name: str | None = None  # its key in the trainer's checkpoint (None: the class name)
    # whether its episode metrics are handed to the agent's observe_episode with the trainer's own
    # (True only for the package's measurements that agents read, e.g. q/overestimation for
    # adaptive Kt); a watching observer's are logged, and never override the trainer's
    feeds_agent: bool = False

    @property
    def key(self) -> str:
        """Its key in the trainer's checkpoint: `name`, else the class name."""
        return self.name or type(self).__name__

    def on_transition(self, trainer, k: int, obs: np.ndarray, action, reward: float) -> None:
        """Seed k took `action` in `obs` and got `reward`."""

    def on_episode_end(self, trainer, k: int, terminated: bool) -> dict[str, float]:
        """Seed k's episode ended (terminated, else truncated); metrics to log with it."""
        return {}

    def on_evaluation(self, trainer, k: int, record, is_best: bool) -> None:
        """Seed k was evaluated (record: qvpo.train.EvalRecord)."""

    def on_end(self, trainer, k: int) -> None:
        """The run reached total_steps."""

    def on_episode_restart(self, trainer, k: int) -> None:
        """Seed k's episode was restarted without ending (a resumed env whose simulator state
        cannot be restored): forget what was seen of it."""

    def state_dict(self):
        return None

    def load_state_dict(self, state) -> None:
        """The `state_dict` a checkpoint holds for it (not called when the checkpoint has none)."""


class QBiasObserver(Observer):
    """At every episode end, the critic's overestimation: `q/overestimation` = mean over the
    episode's states of min(Q1, Q2)(s_t, a_t) - G_t, with G_t the discounted Monte-Carlo return
    (only states whose return is complete: all after a termination, those at least
    log(0.01)/log(gamma) steps before a truncation), and `q/mc_return` = the mean of those G_t.
    For agents with a twin Q critic (`agent.has_q_critic`), discounting by `agent.gamma`."""

    name = "q_bias"
    feeds_agent = True  # adaptive Kt (qvpo.research.adaptive_k.BiasKt) reads q/overestimation

    def __init__(self, num_seeds: int):
        self.episode = [([], [], []) for _ in range(num_seeds)]  # per seed: obs, actions, rewards

    def on_transition(self, trainer, k, obs, action, reward) -> None:
        ep_obs, ep_act, ep_rew = self.episode[k]
        ep_obs.append(obs.copy())
        ep_act.append(np.asarray(action, dtype=np.float32).copy())
        ep_rew.append(float(reward))

    def on_episode_end(self, trainer, k, terminated) -> dict[str, float]:
        ep_obs, ep_act, ep_rew = self.episode[k]
        self.episode[k] = ([], [], [])
        agent, device = trainer.agent, trainer.device
        gamma = agent.gamma
        n = q_bias_states(len(ep_rew), terminated, gamma)
        if n == 0:
            return {}
        N = len(trainer.seeds)
        obs = torch.zeros(N, n, len(ep_obs[0]), device=device)  # other seeds' rows unused
        act = torch.zeros(N, n, len(ep_act[0]), device=device)
        obs[k] = torch.as_tensor(np.stack(ep_obs[:n]), dtype=torch.float32, device=device)
        act[k] = torch.as_tensor(np.stack(ep_act[:n]), dtype=torch.float32, device=device)
        q = agent.q_estimate(obs, act)
        g = discounted_returns(np.asarray(ep_rew), gamma)[:n]
        q_k = q[k].double().cpu().numpy()
        return {"q/overestimation": float(np.mean(q_k - g)), "q/mc_return": float(np.mean(g))}

    def on_episode_restart(self, trainer, k) -> None:
        self.episode[k] = ([], [], [])

    def state_dict(self):
        return self.episode

    def load_state_dict(self, state) -> None:
        if state is not None:
            self.episode = state


class ArtifactWriter(Observer):
    """Seed k's files under out_dirs[k] (None: none): checkpoints/best.pt at each new best
    evaluation, eval.csv after every evaluation, checkpoints/final.pt and learning_curve.png at
    the end. The tracker uploads the folder to the run's artifacts."""

    def __init__(self, out_dirs: list[Path | None]):
        self.out_dirs = out_dirs

    def on_evaluation(self, trainer, k, record, is_best) -> None:
        out = self.out_dirs[k]
        if out is None:
            return
        if is_best:
            save_checkpoint(out / "checkpoints" / "best.pt", trainer.agent, record.step, record.mean, k)
        write_eval_csv(out / "eval.csv", trainer.results[k].evaluations)

    def on_end(self, trainer, k) -> None:
        out = self.out_dirs[k]
        if out is None:
            return
        result = trainer.results[k]
        save_checkpoint(out / "checkpoints" / "final.pt", trainer.agent, trainer.total_steps, result.final_eval, k)
        write_eval_csv(out / "eval.csv", result.evaluations)
        from qvpo.plots import plot_learning_curve

        plot_learning_curve(result, out / "learning_curve.png",
                            title=f"{type(trainer.agent).__name__} on {trainer.env_id} (seed {trainer.seeds[k]})")


def discounted_returns(rewards: np.ndarray, gamma: float) -> np.ndarray:
    """G_t = r_t + gamma G_{t+1} over one episode, G_T = 0 (the Monte-Carlo return from each step)."""
    out = np.empty(len(rewards))
    g = 0.0
    for t in range(len(rewards) - 1, -1, -1):
        g = rewards[t] + gamma * g
        out[t] = g
    return out


def mc_horizon(gamma: float, tail: float = 0.01) -> int:
    """Steps after which the discounted tail weighs less than `tail`: gamma^H <= tail."""
    return 0 if gamma <= 0 else (math.inf if gamma >= 1 else math.ceil(math.log(tail) / math.log(gamma)))


def q_bias_states(length: int, terminated: bool, gamma: float, tail: float = 0.01) -> int:
    """How many of an episode's first states have a Monte-Carlo return that estimates Q: all of
    them after a termination; after a time-limit truncation only those with at least
    mc_horizon(gamma) steps left (the missing tail weighs less than `tail` of the return)."""
    if terminated:
        return length
    h = mc_horizon(gamma, tail)
    return max(0, length - h) if h != math.inf else 0


def save_checkpoint(path: Path, agent, step: int, eval_return: float | None, seed_index: int = 0) -> None:
    """The agent's whole state (all seeds of the process) and which seed this file is for."""
    atomic_save({"agent": agent.state_dict(), "step": step, "eval_return": eval_return,
                 "seed_index": seed_index}, path)


def write_eval_csv(path: Path, evaluations) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        n = max(len(e.returns) for e in evaluations) if evaluations else 0
        w.writerow(["step", "return_mean", "return_std", *[f"return_{i}" for i in range(n)]])
        for e in evaluations:
            w.writerow([e.step, f"{e.mean:.4f}", f"{e.std:.4f}", *[f"{r:.4f}" for r in e.returns]])
