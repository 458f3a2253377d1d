"""The training loops: interaction, updates, evaluation, metrics, checkpoints.

Two loops, one vocabulary. `Trainer._run_off_policy`: a random warm-up, a replay buffer per seed
and `updates_per_step` updates per env step (QVPO, SAC, TD3, DIPO, QSM). `Trainer._run_on_policy`:
the agent's own rollouts, an update each time the rollout buffer is full (PPO, SPO). What both
share is a method each: stepping the envs (`_step_envs`), episode bookkeeping (`_end_of_step`),
and evaluation, logging and checkpoints (`_after_updates`). Work that is not the loop's
(the critic's overestimation, the run's files) is done by observers (qvpo.observers).

No algorithm maths and no algorithm here: the loop asks the agent for actions and updates and
hands metrics to a `log(metrics, step)` callable (tracking.py sends them to MLflow). Steps are
env steps throughout.
"""

from __future__ import annotations

import math
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import gin
import numpy as np
import torch
from tqdm import tqdm

from qvpo.agents import agent_class, check_agent_bindings
from qvpo.agents.base import Agent, AgentContext
from qvpo.buffers import ReplayBuffer, SeedBuffers
from qvpo.checkpoint import atomic_save
from qvpo.envs import (EnvStateNotRestorable, check_env_id, discrete_actions, env_dims, get_env_state, make_env,
                       set_env_state)
from qvpo.errors import ConfigError, require, require_int
from qvpo.observers import ArtifactWriter, Observer, QBiasObserver
from qvpo.rng import eval_env_seeds
from qvpo.rollout import RolloutBuffer
from qvpo.timing import PhaseTimer

LogFn = Callable[[dict[str, float], int], None]


def resolve_device(device: str) -> torch.device:
    require(device in ("auto", "cpu", "cuda") or device.startswith("cuda:"),
            f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but torch sees no CUDA device; use --device cpu or auto")
    if device.startswith("cuda:"):
        index = device.split(":", 1)[1]
        require(index.isdigit() and int(index) < torch.cuda.device_count(),
                f"device {device!r}: torch sees {torch.cuda.device_count()} CUDA device(s), cuda:0 .. "
                f"cuda:{torch.cuda.device_count() - 1}")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class MetricAccumulator:
    """Sums the agent's per-update metrics on the device; one host sync per `pop`.

    Metric values are (N,) tensors (one per seed) or plain floats (the same for every seed). A
    metric only some updates report (a periodic diagnostic) is averaged over those updates.
    """

    def __init__(self):
        self.sums: dict[str, torch.Tensor | float] = {}
        self.counts: dict[str, int] = {}

    @property
    def count(self) -> int:
        return max(self.counts.values(), default=0)

    def add(self, metrics: dict[str, torch.Tensor | float]) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.counts[k] = self.counts.get(k, 0) + 1

    def pop(self, num_seeds: int) -> list[dict[str, float]]:
        """Means over the updates since the last pop (that reported the metric), one dict per seed."""
        out = [{} for _ in range(num_seeds)]
        keys = [k for k, v in self.sums.items() if torch.is_tensor(v)]
        if keys:  # one device-to-host transfer for all tensor metrics: (metrics, seeds)
            values = torch.stack([self.sums[k].float().reshape(-1).expand(num_seeds) for k in keys]).tolist()
            for k, row in zip(keys, values):
                for i in range(num_seeds):
                    out[i][k] = row[i] / self.counts[k]
        for k, v in self.sums.items():
            if not torch.is_tensor(v):
                for i in range(num_seeds):
                    out[i][k] = float(v) / self.counts[k]
        self.sums, self.counts = {}, {}
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
    """Builds envs, buffers and the agent, then runs the loop (off- or on-policy, by the agent).

    "paper" below: the QVPO paper's protocol, docs/paper-notes.md#training-protocol.

    Args:
      env_id: Gymnasium task id.
      agent: the agent class (gin: `Trainer.agent = @QVPO`), or its --algo name ('qvpo').
      total_steps: env steps in the run, per seed (paper: 1,000,000).
      warmup_steps: env steps of uniformly random actions before the first update; None = the
        agent's own (`QVPO.warmup_steps`, `TD3.warmup_steps`, ...: each algorithm's setting), a
        number overrides it for whichever agent runs (on-policy agents need 0).
      updates_per_step: gradient updates per env step after warm-up (paper: 1).
      eval_every: env steps between evaluations (paper: 10,000).
      eval_episodes: episodes per evaluation (paper: 10).
      seed: the first seed; seeds_per_process = N trains seeds seed .. seed + N - 1.
      seeds_per_process: independent seeds trained together in this process, batched over a
        leading seed dimension (each with its own env, buffer, random streams, optimiser state,
        gradient clipping and MLflow run).
      device: 'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'.
      truncation_is_terminal: store a time-limit truncation as terminal, as the reference code
        does (a bug: it stops bootstrapping at the time limit). False = bootstrap, the default.
      log_every: env steps between metric flushes (averages of the updates in between).
      progress: show a progress bar.
      num_threads: torch intra-op threads (0 = torch's default, one per core).
      sync_timing: on CUDA, synchronise at the edges of each timed phase so `time/*` metrics are
        device time (slower); off: host-side time.
      checkpoint_every: env steps between resumable checkpoints when `run` is given a
        Checkpointer (0 = none; SIGINT/SIGTERM still write one). A checkpoint holds the whole
        state: agent, buffers, env states, RNGs, counters, results.
      deterministic: torch.use_deterministic_algorithms(True) and one thread (CPU runs then
        repeat bit for bit, also across a checkpoint and resume).
      q_bias: at every episode end, log the critic's overestimation for agents with a Q critic:
        `q/overestimation` = mean over the episode's states of min(Q1, Q2)(s_t, a_t) - G_t, with G_t
        the discounted Monte-Carlo return (only states whose return is complete: all after a
        termination, those >= log(0.01)/log(gamma) steps before a truncation), and `q/mc_return`.
    """

    def __init__(self, env_id: str = "Hopper-v5",
                 agent: Callable[..., Agent] | str = "qvpo",
                 total_steps: int = 1_000_000,
                 warmup_steps: int | None = None,
                 updates_per_step: int = 1,
                 eval_every: int = 10_000,
                 eval_episodes: int = 10,
                 seed: int = 0,
                 seeds_per_process: int = 1,
                 device: str = "auto",
                 truncation_is_terminal: bool = False,
                 log_every: int = 1_000,
                 progress: bool = True,
                 num_threads: int = 0,
                 sync_timing: bool = False,
                 checkpoint_every: int = 10_000,
                 deterministic: bool = False,
                 q_bias: bool = True):
        require_int(total_steps, "Trainer.total_steps (--steps)", 0)
        if warmup_steps is not None:
            require_int(warmup_steps, "Trainer.warmup_steps", 0)
        require_int(updates_per_step, "Trainer.updates_per_step", 0)
        require_int(eval_every, "Trainer.eval_every (env steps)", 1)
        require_int(eval_episodes, "Trainer.eval_episodes", 1)
        require_int(log_every, "Trainer.log_every (env steps)", 1)
        require_int(seed, "Trainer.seed (--seed)", 0)
        require_int(seeds_per_process, "Trainer.seeds_per_process", 1)
        require_int(num_threads, "Trainer.num_threads", 0)
        require_int(checkpoint_every, "Trainer.checkpoint_every (env steps)", 0)
        require(isinstance(env_id, str), f"Trainer.env_id (--env) must be a string, got {env_id!r}")
        check_env_id(env_id)
        self.env_id, self.total_steps = env_id, int(total_steps)
        self.updates_per_step, self.eval_every, self.eval_episodes = updates_per_step, eval_every, eval_episodes
        self.seeds = [seed + k for k in range(seeds_per_process)]
        self.truncation_is_terminal = truncation_is_terminal
        self.log_every, self.progress = log_every, progress
        self.checkpoint_every = checkpoint_every
        if deterministic:
            torch.use_deterministic_algorithms(True)
            num_threads = 1
        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = resolve_device(device)

        seed_everything(seed)
        self.envs = [make_env(env_id, seed=s) for s in self.seeds]
        # evaluation envs: their own seeds (independent across training seeds and envs), so
        # evaluation never perturbs the training streams
        self.eval_envs = [[make_env(env_id, seed=e) for e in eval_env_seeds(s, eval_episodes)]
                          for s in self.seeds]
        obs_dim, action_dim = env_dims(self.envs[0])
        self.timer = PhaseTimer(self.device, sync=sync_timing)
        if isinstance(agent, str):
            agent = agent_class(agent)
        self.agent = agent(AgentContext(obs_dim, action_dim, tuple(self.seeds), self.device,
                                        self.total_steps, self.timer, discrete_actions(self.envs[0])))
        self.warmup_steps = self.agent.warmup_steps if warmup_steps is None else warmup_steps
        if not self.agent.baseline:
            check_agent_bindings(type(self.agent).__name__)
        # the loop's state (what a checkpoint holds besides agent, buffers and envs)
        N = len(self.seeds)
        self.step = 0
        self.results = [TrainResult() for _ in range(N)]
        self.acc = MetricAccumulator()
        self.obs: np.ndarray | None = None
        self.ep_return, self.ep_len = [0.0] * N, [0] * N
        # the critic's overestimation, only where there is a critic to compare with
        self.observers: list[Observer] = []
        if q_bias and not self.agent.on_policy and self.agent.has_q_critic:
            self.add_observer(QBiasObserver(N))
        self.stop_signal: int | None = None  # set by a signal handler: checkpoint and stop
        if self.agent.on_policy:  # rollouts instead of a replay buffer, no random warm-up
            require(self.warmup_steps == 0, f"{type(self.agent).__name__} is on-policy: it collects its own "
                    f"rollouts, so Trainer.warmup_steps must be 0 or unset (got {warmup_steps})")
            self.rollout = RolloutBuffer(len(self.seeds), self.agent.rollout_steps, obs_dim, action_dim,
                                         self.device)
            return
        self.buffers = SeedBuffers([ReplayBuffer(obs_dim, action_dim, device=self.device)
                                    for _ in self.seeds], self.seeds)
        capacity = self.buffers[0].capacity
        require(self.agent.batch_size <= capacity,
                f"batch size {self.agent.batch_size} is larger than the replay buffer "
                f"(ReplayBuffer.capacity = {capacity}); lower the batch or raise the capacity")

    @property
    def seed(self) -> int:
        return self.seeds[0]

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> list[list[float]]:
        """eval_episodes episodes per seed, all in lockstep: one batched act() per step."""
        N, E = len(self.seeds), self.eval_episodes
        obs = np.stack([[env.reset()[0] for env in envs] for envs in self.eval_envs])  # (N, E, S)
        returns = np.zeros((N, E))
        success = np.full((N, E), np.nan)
        running = np.ones((N, E), dtype=bool)
        while running.any():
            batch = torch.as_tensor(obs, dtype=torch.float32, device=self.device)
            actions = self.agent.act(batch, explore=False).cpu().numpy()  # finished envs' are unused
            for k, i in zip(*np.nonzero(running)):
                obs[k, i], r, term, trunc, info = self.eval_envs[k][i].step(actions[k, i])
                returns[k, i] += float(r)
                running[k, i] = not (term or trunc)
                if not running[k, i] and "is_success" in info:  # the task's flag at the episode's end
                    success[k, i] = float(info["is_success"])
        # per seed, the success rate of the episodes (None where the task defines no success)
        self.eval_success = [None if np.isnan(s).any() else float(s.mean()) for s in success]
        return returns.tolist()

    def add_observer(self, observer: Observer) -> None:
        """Hand the loops' events to `observer` too (qvpo.observers.Observer); before `run`, and
        before `load_state_dict` for its state to be restored from a checkpoint."""
        require(isinstance(observer, Observer),
                f"an observer must be a qvpo.observers.Observer, got a {type(observer).__name__}")
        require(observer.key not in {o.key for o in self.observers},
                f"two observers named {observer.key!r}: give one another `name` (its key in the checkpoint)")
        self.observers.append(observer)

    # ------------------------------------------------------------------ the loops
    def run(self, logs: LogFn | list[LogFn] | None = None,
            out_dirs: Path | list[Path] | None = None,
            checkpointer: "Checkpointer | None" = None) -> list[TrainResult]:
        """Train every seed up to total_steps env steps (continuing from `self.step` after
        load_state_dict); logs[k] and out_dirs[k] are seed k's."""
        N = len(self.seeds)
        logs = [logs] * N if logs is None or callable(logs) else list(logs)
        self._logs = [log or (lambda metrics, step: None) for log in logs]
        out_dirs = [out_dirs] * N if out_dirs is None or isinstance(out_dirs, Path) else list(out_dirs)
        self._observers = [*self.observers, ArtifactWriter(out_dirs)]
        self._checkpointer = checkpointer
        if self.obs is None:  # a fresh run (a resumed one continues its episodes)
            self.obs = np.stack([env.reset(seed=s)[0] for env, s in zip(self.envs, self.seeds)])
        self._next_obs = np.empty_like(self.obs)
        self._t_log, self._steps_at_log = time.perf_counter(), self.step - self.step % self.log_every
        self._bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                         disable=not self.progress, desc=f"{type(self.agent).__name__} {self.env_id}"
                         + (f" x{N} seeds" if N > 1 else ""))
        try:
            (self._run_on_policy if self.agent.on_policy else self._run_off_policy)()
        finally:
            self._bar.close()
        for k in range(N):
            for observer in self._observers:
                observer.on_end(self, k)
        return self.results

    def _run_off_policy(self) -> None:
        """Random actions for warmup_steps, then the agent's behaviour policy; every transition
        into the seed's replay buffer; updates_per_step updates per env step once the warm-up is
        over and the buffer holds a minibatch."""
        agent, envs, timer = self.agent, self.envs, self.timer
        for step in range(self.step + 1, self.total_steps + 1):  # `step` = env steps taken, after this one
            if step <= self.warmup_steps:
                actions = [env.action_space.sample() for env in envs]
            else:
                with timer.phase("sampling"):
                    obs_t = torch.as_tensor(self.obs, dtype=torch.float32, device=self.device)[:, None]
                    actions = agent.act(obs_t, explore=True)[:, 0].cpu().numpy()
            rewards, terminated, truncated, terminal = self._step_envs(actions)
            for k in range(len(self.seeds)):
                self.buffers[k].add(self.obs[k], actions[k], rewards[k], self._next_obs[k], bool(terminal[k]))
            self._end_of_step(step, actions, rewards, terminated, truncated)
            if step > self.warmup_steps and len(self.buffers) >= agent.batch_size:
                for _ in range(self.updates_per_step):
                    self.acc.add(agent.update(self.buffers, step))
            self._after_updates(step)

    def _run_on_policy(self) -> None:
        """The agent's exploration policy every step, into the rollout buffer (a truncated
        episode bootstraps from V of its real final observation); an update whenever the rollout
        is full, with V of the observation after it."""
        agent, timer = self.agent, self.timer
        for step in range(self.step + 1, self.total_steps + 1):
            with timer.phase("sampling"):
                policy_out = agent.explore(torch.as_tensor(self.obs, dtype=torch.float32, device=self.device))
                actions = policy_out["env_action"].cpu().numpy()
            rewards, terminated, truncated, terminal = self._step_envs(actions)
            self._store_rollout_step(policy_out, rewards, self._next_obs, terminal, terminated | truncated)
            self._end_of_step(step, actions, rewards, terminated, truncated)
            if self.rollout.full:
                with timer.phase("sampling"):
                    last_value = agent.value(torch.as_tensor(self.obs, dtype=torch.float32, device=self.device))
                self.acc.add(agent.update(self.rollout.finish(last_value), step))
            self._after_updates(step)

    # ------------------------------------------------------------------ shared by both loops
    def _step_envs(self, actions):
        """One env step of every seed into self._next_obs; returns rewards, terminated,
        truncated and `terminal` (what stops bootstrapping: a termination, or a time-limit
        truncation only when the reference code's behaviour is asked for)."""
        N = len(self.seeds)
        rewards = np.zeros(N)
        terminated, truncated = np.zeros(N, dtype=bool), np.zeros(N, dtype=bool)
        self._infos = [{}] * N
        with self.timer.phase("env"):
            for k, env in enumerate(self.envs):
                self._next_obs[k], rewards[k], terminated[k], truncated[k], self._infos[k] = env.step(actions[k])
        return rewards, terminated, truncated, terminated | (truncated & self.truncation_is_terminal)

    def _end_of_step(self, step: int, actions, rewards, terminated, truncated) -> None:
        """Episode bookkeeping of every seed: returns and lengths, observers, and at an episode's
        end its metrics and a reset; then the next observations become the current ones."""
        for k, env in enumerate(self.envs):
            self.ep_return[k] += float(rewards[k])
            self.ep_len[k] += 1
            for observer in self._observers:
                observer.on_transition(self, k, self.obs[k], actions[k], rewards[k])
            if terminated[k] or truncated[k]:
                self.results[k].episodes.append((step, self.ep_return[k]))
                metrics = {"train/episode_return": self.ep_return[k], "train/episode_length": self.ep_len[k]}
                if "is_success" in self._infos[k]:  # the task's success flag at the episode's end
                    metrics["train/success"] = float(self._infos[k]["is_success"])
                watched = {}  # what the watching-only observers add: logged, never shown to the agent
                for observer in self._observers:
                    out = observer.on_episode_end(self, k, bool(terminated[k]))
                    (metrics if observer.feeds_agent else watched).update(out)
                self.agent.observe_episode(k, metrics)
                self._logs[k]({**watched, **metrics}, step)
                with self.timer.phase("env"):
                    self._next_obs[k], _ = env.reset()
                self.ep_return[k], self.ep_len[k] = 0.0, 0
        self.obs, self._next_obs = self._next_obs, self.obs
        self.step = step

    def _after_updates(self, step: int) -> None:
        """Evaluation every eval_every steps and at the end, metrics every log_every steps,
        a checkpoint every checkpoint_every steps, and a stop when a signal asked for one."""
        N = len(self.seeds)
        if step % self.eval_every == 0 or step == self.total_steps:
            with self.timer.phase("eval"):
                self.agent.begin_evaluation(step)
                returns = self.evaluate()
            for k in range(N):
                record = EvalRecord(step, returns[k])
                is_best = self.results[k].best_eval is None or record.mean > self.results[k].best_eval
                self.results[k].evaluations.append(record)
                metrics = {"eval/return_mean": record.mean, "eval/return_std": record.std,
                           "eval/return_best": self.results[k].best_eval}
                if self.eval_success[k] is not None:
                    metrics["eval/success_rate"] = self.eval_success[k]
                self._logs[k](metrics, step)
                for observer in self._observers:
                    observer.on_evaluation(self, k, record, is_best)
            self._bar.set_postfix(eval=" ".join(f"{r.evaluations[-1].mean:.1f}" for r in self.results), refresh=False)

        if step % self.log_every == 0 or step == self.total_steps:
            now = time.perf_counter()
            n = step - self._steps_at_log
            per_seed = self.acc.pop(N)
            check_finite(per_seed, step, self.seeds)
            common = {"perf/steps_per_s": n / max(now - self._t_log, 1e-9)}
            for phase, secs in self.timer.pop().items():
                common[f"time/{phase}_ms_per_step"] = 1e3 * secs / n
            for k in range(N):
                self._logs[k]({**per_seed[k], **common}, step)
            self._t_log, self._steps_at_log = now, step
        self._bar.update(1)

        stop, checkpointer = self.stop_signal, self._checkpointer
        if checkpointer is not None and (stop or (self.checkpoint_every and step % self.checkpoint_every == 0)):
            checkpointer.save(self)
        if stop:
            raise Interrupted(stop, step, checkpointer.path if checkpointer else None)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The whole training state: agent, buffers, env states and RNGs, counters, results."""
        agent_state = self.agent.state_dict()
        check_finite_parameters(agent_state, self.step)
        return {
            "step": self.step, "env_id": self.env_id, "seeds": self.seeds, "agent_class": type(self.agent).__name__,
            "agent": agent_state,
            "buffers": None if self.agent.on_policy else [b.state_dict() for b in self.buffers.buffers],
            "rollout": self.rollout.state_dict() if self.agent.on_policy else None,
            "envs": [get_env_state(e) for e in self.envs],
            "eval_env_rngs": [[e.unwrapped.np_random.bit_generator.state for e in envs] for envs in self.eval_envs],
            "obs": None if self.obs is None else self.obs.copy(),
            "ep_return": list(self.ep_return), "ep_len": list(self.ep_len),
            "observers": {o.key: o.state_dict() for o in self.observers},
            "results": self.results, "acc": (dict(self.acc.sums), dict(self.acc.counts)),
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }

    def load_state_dict(self, state: dict) -> None:
        mine = (self.env_id, self.seeds, type(self.agent).__name__)
        theirs = (state["env_id"], state["seeds"], state["agent_class"])
        if mine != theirs:
            raise ValueError(f"checkpoint is for (env, seeds, agent) = {theirs}, this run is {mine}")
        self.agent.load_state_dict(state["agent"])
        if self.agent.on_policy:
            self.rollout.load_state_dict(state["rollout"])
        else:
            for buf, b in zip(self.buffers.buffers, state["buffers"]):
                buf.load_state_dict(b)
        restart = []  # seeds whose env cannot continue its episode exactly (Box2D): a new episode
        for k, (env, e) in enumerate(zip(self.envs, state["envs"])):
            try:
                set_env_state(env, e)
            except EnvStateNotRestorable:
                restart.append(k)
        for envs, rngs in zip(self.eval_envs, state["eval_env_rngs"]):
            for env, r in zip(envs, rngs):
                env.unwrapped.np_random.bit_generator.state = r
        self.step, self.obs = state["step"], state["obs"]
        self.ep_return, self.ep_len = list(state["ep_return"]), list(state["ep_len"])
        saved = state.get("observers") or {}
        if "observers" not in state and state.get("episode") is not None:  # checkpoints before named observers
            saved = {QBiasObserver.name: state["episode"]}
        for observer in self.observers:  # one the checkpoint has no state for starts afresh
            if observer.key in saved:
                observer.load_state_dict(saved[observer.key])
        if restart and self.obs is not None:
            print(f"qvpo: {self.env_id} cannot restore its simulator state exactly; the episode restarts")
            for k in restart:
                self.obs[k], _ = self.envs[k].reset()
                self.ep_return[k], self.ep_len[k] = 0.0, 0
                for observer in self.observers:
                    observer.on_episode_restart(self, k)
        self.results = state["results"]
        sums, counts = state["acc"]
        if not isinstance(counts, dict):  # checkpoints before per-metric counts: one count for all
            counts = {k: counts for k in sums}
        self.acc.sums, self.acc.counts = sums, counts
        rng = state["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def _store_rollout_step(self, policy_out: dict, rewards: np.ndarray, next_obs: np.ndarray,
                            terminal: np.ndarray, done: np.ndarray) -> None:
        """One step of every seed into the rollout; a truncated episode bootstraps from the value
        of its real final observation (computed here, before the env is reset)."""
        bootstrap = None
        if (done & ~terminal).any():
            v = self.agent.value(torch.as_tensor(next_obs, dtype=torch.float32, device=self.device))
            bootstrap = v * torch.as_tensor(done & ~terminal, device=self.device)
        self.rollout.add(policy_out["obs"], policy_out["action"], policy_out["log_prob"], policy_out["value"],
                         rewards, terminal, done, bootstrap)

    def close(self) -> None:
        for env in [*self.envs, *(e for envs in self.eval_envs for e in envs)]:
            env.close()


class Interrupted(Exception):
    """A signal asked the run to stop; the state was checkpointed first (when a path is given)."""

    def __init__(self, signum: int, step: int, path: Path | None):
        self.signum, self.step, self.path = signum, step, path
        name = signal.Signals(signum).name if signum in signal.Signals._value2member_map_ else str(signum)
        super().__init__(f"{name} at env step {step}" + (f"; checkpoint {path}" if path else ""))


class DivergenceError(RuntimeError):
    """A loss, Q value or parameter became NaN or infinite."""


def check_finite(per_seed: list[dict[str, float]], step: int, seeds: list[int]) -> None:
    for k, metrics in enumerate(per_seed):
        for key, value in metrics.items():
            if not math.isfinite(value):
                raise DivergenceError(f"diverged: {key} = {value} (seed {seeds[k]}) in the updates up to "
                                      f"env step {step}")


def check_finite_parameters(state: dict, step: int, where: str = "agent") -> None:
    """Refuse to checkpoint non-finite parameters (the last good checkpoint stays)."""
    for key, value in state.items():
        if isinstance(value, dict):
            check_finite_parameters(value, step, f"{where}.{key}")
        elif torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
            raise DivergenceError(f"diverged: non-finite values in {where}.{key} at env step {step}")


@dataclass
class Checkpointer:
    """Where and how `Trainer.run` writes its resumable checkpoints.

    extra() returns what the caller adds to each checkpoint (e.g. MLflow run ids and the metrics
    not yet sent); committed(step) is called once the file is durable (e.g. to send them).
    """
    path: Path
    extra: Callable[[], dict] = dict
    committed: Callable[[int], None] = lambda step: None

    def save(self, trainer: "Trainer") -> None:
        atomic_save({"trainer": trainer.state_dict(), "extra": self.extra()}, self.path)
        self.committed(trainer.step)
