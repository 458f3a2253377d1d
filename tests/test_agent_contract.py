"""The agent contract (qvpo.agents.base.Agent), checked for every algorithm in the registry.

Adding an algorithm = one agent file, one gin file (qvpo/gin/algos/<name>.gin), one line in
qvpo.agents.REGISTRY and one row in CASES below: the tests then check it like every other
agent (docs/architecture.md#adding-an-algorithm):

  * seeds trained together in one agent compute exactly what each seed computes alone
    (parameters, buffers, metrics and actions, seed by seed);
  * a state_dict round trip (through bytes, as a checkpoint) continues the same run: the next
    updates and actions are identical;
  * an update's record: metric names `group/name`, each value a float or one finite value per
    seed, (N,); actions (N, M, A) in [-1, 1];
  * bad input is one ConfigError line naming the setting, raised while building the agent.
"""

from __future__ import annotations

import copy
import io
import re
from dataclasses import dataclass, field

import gin
import pytest
import torch
from torch import nn

from qvpo.agents import ALGORITHMS, Agent, OnPolicyAgent, agent_class
from qvpo.agents.base import AgentContext
from qvpo.config import find_file
from qvpo.errors import ConfigError
from qvpo.research.adaptive_entropy import AdaptiveEntropyWeight
from qvpo.research.adaptive_k import BiasKt, SpreadKb
from qvpo.research.gradient_variance import GradientVariance
from qvpo.research.mpo import MPOEStep, MStepTrustRegion
from conftest import TINY
from helpers import filled_buffers, synthetic_rollout

S, A = 3, 2  # observation and action sizes of every case
SEEDS = (3, 4)
UPDATES = 3
TINY_DIFFUSION = dict(batch_size=8, T=3)
TINY_QVPO = dict(TINY_DIFFUSION, train_candidates=4, uniform_samples=2, target_candidates=2, eval_candidates=3,
                 grad_clip=0.5)


@dataclass
class Case:
    algo: str                      # the registry name (qvpo.agents.ALGORITHMS)
    settings: dict                 # tiny settings, as keyword arguments
    bad: dict                      # one bad setting: the error must name it
    hooks: object = None           # QVPO hooks: a function returning fresh ones (they hold state)
    one_seed: bool = False         # refuses to train several seeds together (adaptive K)
    gin_files: tuple = field(default=())  # files the algorithm needs (SPO's settings)
    discrete: bool = False         # a task with A discrete actions, relaxed to [-1, 1]^A (SAC's, PPO's discrete form)

    def make(self, seeds, total_steps: int = 1_000_000) -> Agent:
        for f in self.gin_files:
            gin.parse_config_file(str(find_file(f)))
        extra = self.hooks() if self.hooks else {}
        return agent_class(self.algo)(AgentContext(S, A, tuple(seeds), total_steps=total_steps,
                                                   discrete_actions=A if self.discrete else None),
                                      **self.settings, **extra)


ON_POLICY = dict(rollout_steps=8, minibatch_size=4, epochs=2, actor_hidden=(8,), critic_hidden=(8,))
CASES = {
    "qvpo": Case("qvpo", TINY_QVPO, {"train_candidates": 1}),
    "qvpo+hooks": Case("qvpo", TINY_QVPO, {"uniform_samples": -1}, hooks=lambda: {
        "entropy_weight": AdaptiveEntropyWeight(target=0.0, lr=0.05, initial=0.01, min_weight=1e-4, max_weight=1.0),
        "hooks": [GradientVariance(every=2, samples=2)]}),
    "qvpo+adaptive-k": Case("qvpo", TINY_QVPO, {"behavior_candidates": 0}, one_seed=True, hooks=lambda: {
        "hooks": [SpreadKb(low=-1.0, high=-0.5, momentum=1.0, patience=1), BiasKt(momentum=1.0, patience=1)]}),
    "qvpo+mpo": Case("qvpo", dict(TINY_QVPO, train_selection="all"), {"train_selection": "best"},
                     hooks=lambda: {"q_weight": MPOEStep(epsilon=0.1)}),
    "qvpo+mstep": Case("qvpo", TINY_QVPO, {"target_candidates": 0},
                       hooks=lambda: {"hooks": [MStepTrustRegion(epsilon=1e-3, alpha_init=2.0, lr=0.05)]}),
    "sac": Case("sac", dict(batch_size=8, hidden=(16, 16), init_alpha=0.5), {"init_alpha": 0.0}),
    "sac-discrete": Case("sac", dict(batch_size=8, hidden=(16, 16), init_alpha=0.5), {"init_alpha": 0.0}, discrete=True),
    "td3": Case("td3", dict(batch_size=8, hidden=(16, 16), policy_delay=2), {"batch_size": 0}),
    "dipo": Case("dipo", dict(TINY_DIFFUSION, action_gradient_steps=2, update_actor_target_every=2),
                 {"update_actor_target_every": 0}),
    "qsm": Case("qsm", dict(batch_size=8, T=3, actor_hidden=(16, 16), critic_hidden=(16, 16), time_dim=8,
                            time_hidden=(16, 16)), {"gamma": 1.5}),
    "ppo": Case("ppo", ON_POLICY, {"minibatch_size": 3}),
    "ppo-discrete": Case("ppo", ON_POLICY, {"minibatch_size": 3}, discrete=True),
    "spo": Case("spo", ON_POLICY, {"clip_coef": 0.0}, gin_files=("algos/spo.gin",)),
    "random": Case("random", {}, {"batch_size": 0}),
}


def tiny_bindings(algo: str) -> list[str]:
    """CASES[algo]'s settings as gin bindings, with the shared networks at tiny sizes: the
    end-to-end tests (tests/test_cli.py) run every algorithm through the CLI with them."""
    return TINY_NETWORKS + [f"{ALGORITHMS[algo]}.{k} = {v!r}" for k, v in CASES[algo].settings.items()]


TINY_NETWORKS = [b for b in TINY if not b.startswith("QVPO.")]


@pytest.fixture(autouse=True)
def tiny_networks(tiny):
    """The shared networks (Denoiser, TwinQ) at tiny sizes (tests/conftest.py)."""


def test_every_registered_algorithm_has_a_row_and_a_gin_file():
    assert set(ALGORITHMS) == {c.algo for c in CASES.values()}
    for name in ALGORITHMS:
        assert issubclass(agent_class(name), Agent)
        assert find_file(f"algos/{name}.gin").read_text().count(f"Trainer.agent = @{ALGORITHMS[name]}") == 1


# ------------------------------------------------------------------ helpers
def _data(agent: Agent, seeds):
    """What the agent learns from: replay buffers (off-policy) or a rollout (on-policy)."""
    return synthetic_rollout(seeds, S=S, A=A) if agent.on_policy else filled_buffers(seeds, S, A)


def _update(agent: Agent, data, step: int) -> dict:
    """One update, and what the trainer calls around it: an on-policy agent's `explore` (which
    moves its observation statistics) and an episode end (which adaptive Kt reads)."""
    N = len(agent.seeds)
    obs = torch.stack([torch.linspace(-2, 2, S) * (1 + 0.1 * s) * step for s in agent.seeds])  # seed k's own
    if agent.on_policy:
        agent.explore(obs)
    for k in range(N):
        agent.observe_episode(k, {"train/episode_return": 1.0, "q/overestimation": 30.0 * step, "q/mc_return": 10.0})
    return agent.update(data, step * (8 if agent.on_policy else 1))


def _compare_states(batched, alone, k: int, N: int, what: str, exact: bool = False) -> int:
    """Walk two agents' state_dicts together (a checkpoint's whole content: networks, optimiser
    moments, random streams, statistics, hook states) and compare seed k of the batched one with
    the one-seed agent's; per-seed lists and tensors with a leading seed dimension are sliced.
    Returns how many values it compared."""
    if isinstance(alone, dict):
        return sum(_compare_states(batched[key], alone[key], k, N, f"{what}.{key}", exact) for key in alone)
    if isinstance(alone, (list, tuple)):
        if len(alone) == 1 and len(batched) == N:
            return _compare_states(batched[k], alone[0], k, N, f"{what}[{k}]", exact)
        return sum(_compare_states(b, a, k, N, f"{what}[{i}]", exact) for i, (b, a) in enumerate(zip(batched, alone)))
    if torch.is_tensor(alone):
        if alone.dim() and alone.shape[0] == 1 and batched.shape[0] == N:
            batched, alone = batched[k], alone[0]
        if not alone.dtype.is_floating_point:
            assert torch.equal(batched, alone), what
        else:
            _close(batched, alone, what, exact)
        return 1
    if isinstance(alone, (int, float, str, bool)) or alone is None:
        assert batched == alone, f"{what}: {batched!r} != {alone!r}"
        return 1
    return 0


def _acts(agent: Agent, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    agent.begin_evaluation(7)
    evaluation = agent.act(obs, explore=False)
    return evaluation, agent.act(obs, explore=True)


def _close(a, b, what: str, exact: bool = False) -> None:
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32),
                               msg=what, **tol)


# ------------------------------------------------------------------ the contract
@pytest.mark.parametrize("name", CASES)
def test_batched_seeds_equal_separate_runs(name):
    case = CASES[name]
    if case.one_seed:
        with pytest.raises(ConfigError, match="seeds_per_process = 1"):
            case.make(SEEDS)
        pytest.skip(f"{name} refuses several seeds per process (checked above)")
    batched = case.make(SEEDS, total_steps=8 * UPDATES)
    alone = [case.make((s,), total_steps=8 * UPDATES) for s in SEEDS]
    data, singles = _data(batched, SEEDS), [_data(a, (s,)) for a, s in zip(alone, SEEDS)]
    for step in range(1, UPDATES + 1):
        mb = _update(batched, data, step)
        ms = [_update(a, d, step) for a, d in zip(alone, singles)]
        for k in range(len(SEEDS)):
            for key, value in ms[k].items():
                _close(mb[key][k] if torch.is_tensor(mb[key]) else mb[key], value[0] if torch.is_tensor(value) else value,
                       f"{name}: metric {key} of seed {k} at update {step}")
    state = batched.state_dict()
    for k, a in enumerate(alone):
        compared = _compare_states(state, a.state_dict(), k, len(SEEDS), f"{name}: seed {k}: state")
        assert compared >= (2 if batched.baseline else 5), f"{name}: only {compared} values of the state compared"
        if not batched.on_policy:  # what the agent wrote into its buffers (DIPO's improved actions)
            for key, value in singles[k].buffers[0].state_dict().items():
                if torch.is_tensor(value):
                    _close(data.buffers[k].state_dict()[key], value, f"{name}: buffer {key} of seed {k}")
    obs = torch.randn(len(SEEDS), 5, S)
    (eb, xb) = _acts(batched, obs)
    for k, a in enumerate(alone):
        ea, xa = _acts(a, obs[k:k + 1])
        _close(eb[k], ea[0], f"{name}: evaluation action of seed {k}")
        _close(xb[k], xa[0], f"{name}: exploration action of seed {k}")
    if name != "random":  # the seeds did not train identically
        p = next(p for m in vars(batched).values() if isinstance(m, nn.Module) for p in m.parameters()
                 if p.dim() > 1 and p.shape[0] == len(SEEDS))
        assert (p[0] - p[1]).abs().max() > 1e-4


@pytest.mark.parametrize("name", CASES)
def test_state_round_trip_continues_the_same_run(name):
    case = CASES[name]
    seeds = (0,) if case.one_seed else SEEDS
    a = case.make(seeds, total_steps=8 * (UPDATES + 2))
    data_a = _data(a, seeds)
    for step in range(1, UPDATES + 1):
        _update(a, data_a, step)
    blob = io.BytesIO()  # as through a checkpoint file: nothing shared with `a`
    torch.save({"agent": a.state_dict(),
                "buffers": None if a.on_policy else [b.state_dict() for b in data_a.buffers]}, blob)
    blob.seek(0)
    state = torch.load(blob, weights_only=False)
    b = case.make(tuple(s + 100 for s in seeds), total_steps=8 * (UPDATES + 2))  # other seeds: all from state
    b.load_state_dict(state["agent"])
    data_b = _data(b, seeds)
    if not b.on_policy:
        for buf, buf_state in zip(data_b.buffers, state["buffers"]):
            buf.load_state_dict(buf_state)
    assert b.seeds == a.seeds
    for step in range(UPDATES + 1, UPDATES + 3):
        ma, mb = _update(a, data_a, step), _update(b, data_b, step)
        assert set(ma) == set(mb)
        for key in ma:
            _close(ma[key], mb[key], f"{name}: metric {key} after the round trip", exact=True)
    compared = _compare_states(b.state_dict(), a.state_dict(), 0, len(seeds), f"{name}: state after the round trip",
                               exact=True)
    assert compared >= (2 if a.baseline else 5), f"{name}: only {compared} values of the state compared"
    obs = torch.randn(len(seeds), 4, S)
    for x, y in zip(_acts(a, obs), _acts(b, obs)):
        _close(x, y, f"{name}: actions after the round trip", exact=True)
    if hasattr(a, "Kb"):
        assert (a.Kb, a.Kt) == (b.Kb, b.Kt)


@pytest.mark.parametrize("name", CASES)
def test_record_shape(name):
    case = CASES[name]
    seeds = (0,) if case.one_seed else SEEDS
    agent = case.make(seeds)
    data = _data(agent, seeds)
    for step in (1, 2):
        metrics = _update(agent, data, step)
    for key, value in metrics.items():
        assert re.fullmatch(r"[a-z0-9_]+(/[a-z0-9_]+)+", key), f"{name}: metric name {key!r} is not group/name"
        if torch.is_tensor(value):
            assert value.shape == (len(seeds),), f"{name}: {key} has shape {tuple(value.shape)}, not (N,)"
            assert torch.isfinite(value).all(), f"{name}: {key} = {value}"
        else:
            assert isinstance(value, (int, float)), f"{name}: {key} is a {type(value).__name__}"
    if name != "random":
        assert any(k.startswith("loss/") for k in metrics), f"{name} logs no loss"
    obs = torch.randn(len(seeds), 6, S)
    for explore in (False, True):
        action = agent.act(obs, explore=explore)
        assert action.shape == (len(seeds), 6, A) and action.abs().max() <= 1
    if isinstance(agent, OnPolicyAgent):
        out = agent.explore(obs[:, 0])
        assert {k: tuple(v.shape) for k, v in out.items()} == {
            "env_action": (len(seeds), A), "obs": (len(seeds), S), "action": (len(seeds), A),
            "log_prob": (len(seeds),), "value": (len(seeds),)}
        assert agent.value(obs[:, 0]).shape == (len(seeds),)
    else:
        assert isinstance(agent.batch_size, int) and agent.warmup_steps >= 0
    if agent.has_q_critic:  # what the overestimation measurement reads
        assert 0 <= agent.gamma <= 1 and agent.q_estimate(obs, action).shape == (len(seeds), 6)


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_one_line_naming_the_setting(name):
    case = CASES[name]
    (setting, value), = case.bad.items()
    bad = copy.copy(case)
    bad.settings = {**case.settings, setting: value}
    with pytest.raises(ConfigError) as e:
        bad.make((0,))
    message = str(e.value).splitlines()[0]
    assert setting in message, f"{name}: {message!r} does not name {setting}"
    with pytest.raises(ConfigError, match="at least one seed"):
        case.make(())
