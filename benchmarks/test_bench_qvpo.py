"""QVPO at the paper's settings on Hopper-v5 dimensions (obs 11, action 3): constructor defaults =
gin/algos/qvpo.gin (batch 256, Nd 64, T 20, Kb = Kt = 4, eval K 32, 3 x 256 Mish networks).

Run with `make bench`: it writes the numbers, with the machine and command, to docs/speed-results.md.
"""

import time

import numpy as np
import pytest
import torch

from qvpo.agents.base import AgentContext
from qvpo.agents.qvpo import QVPO
from qvpo.agents.sac import SAC
from qvpo.buffers import SeedBuffers
from qvpo.envs import make_env
from qvpo.reproduce.costing import random_buffer

OBS, ACT = 11, 3  # Hopper-v5


def _buffers():
    return SeedBuffers([random_buffer(OBS, ACT, 5_000, reward=1.0)], [0])


@pytest.fixture(scope="module")
def agent_and_buffer():
    return _agent(), _buffers()


def _agent(precision="fp32", scoring="fp32", compile=False, native=True) -> QVPO:
    """QVPO at the paper's settings with these sampler and scoring modes (policy and its target,
    critic and its target alike)."""
    agent = QVPO(AgentContext(OBS, ACT, device="cpu"))
    for pol in (agent.policy, agent.policy_target):
        pol.precision, pol.compile, pol.native = precision, compile, native
    for critic in (agent.critic, agent.critic_target):
        critic.scoring_precision = scoring
    return agent


def test_qvpo_update_paper_settings(benchmark, agent_and_buffer):
    agent, buf = agent_and_buffer
    from qvpo import native

    path = native.describe().split(":")[0].split(" (")[0]  # native fused, native or torch ops
    benchmark.extra_info["what"] = f"one QVPO update: B 256, Nd 64, T 20, Kt 4, 3x256 Mish, fp32, the default here: {path}"
    benchmark.pedantic(agent.update, args=(buf, 20_000), rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("precision,compile,native,scoring", [
    ("fp32", False, False, "fp32"), ("fp32", True, False, "fp32"),
    ("bf16", False, True, "fp32"), ("bf16", False, True, "bf16"), ("bf16", True, False, "fp32")])
def test_qvpo_update_fast_modes(benchmark, precision, compile, native, scoring):
    """The other sampler modes: torch ops only (no native kernels), torch.compile of the denoising
    step (which uses torch ops), and the bf16 sampler (native kernels: on AMX CPUs the whole-chain
    AMX sampler; or compiled), with candidate scoring in fp32 or bf16 (TwinQ.scoring_precision)."""
    agent, buf = _agent(precision, scoring, compile, native), _buffers()
    how = "torch.compile" if compile else ("native kernels" if native else "torch ops only")
    benchmark.extra_info["what"] = f"one QVPO update, sampler {precision}, {how}, scoring {scoring}"
    benchmark.pedantic(agent.update, args=(buf, 20_000), rounds=5, warmup_rounds=2)


def _seconds(fn, reps: int, batches: int) -> float:
    """Seconds per call: the fastest of `batches` batches of `reps` calls (after one warm-up)."""
    fn()
    best = float("inf")
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


@pytest.mark.parametrize("mode", ["fp32", "bf16"])
def test_qvpo_update_against_interleaved_floor(benchmark, mode):
    """One update as a multiple of the floor measured in the same round, just before it: this
    machine's speed drifts by a third within the hour, so a floor measured minutes apart (the
    floor benchmarks) can make the ratio look better or worse than it is. Each round times the
    floor's primitives (fp32 and bf16 matmul at the sampler's shape, one exp pass), then one
    update; extra_info keeps every round's update time, floor and ratio. mode 'bf16': bf16
    sampler and bf16 candidate scoring (the floor counts those matmuls at the bf16 rate)."""
    from floor import Shapes, mixed_floor, update_costs
    from test_bench_floor import H, ROWS, _mm

    agent, buf = _agent(mode, mode), _buffers()
    mm32, mm16 = _mm(torch.float32), _mm(torch.bfloat16)
    e = torch.randn(ROWS, H)
    out = torch.empty_like(e)
    costs = update_costs(Shapes())
    bf16_parts = ("sampling", "scoring") if mode == "bf16" else ()
    rounds = {"update_s": [], "floor_s": [], "ratio": []}

    def one_round():
        # the machine's best in this round: fastest of 5 batches of 20
        fp32 = 2 * ROWS * H * H / _seconds(mm32, 20, 5)
        bf16 = 2 * ROWS * H * H / _seconds(mm16, 20, 5) if bf16_parts else float("nan")  # unused in fp32
        exp_s = _seconds(lambda: torch.exp(e, out=out), 20, 5) / (ROWS * H)
        floor = mixed_floor(costs, fp32, bf16, exp_s, bf16_parts)
        t0 = time.perf_counter()  # one update, timed alone (the agent is warm: see below)
        agent.update(buf, 20_000)
        update = time.perf_counter() - t0
        for k, v in zip(rounds, (update, floor, update / floor)):
            rounds[k].append(round(v, 4))

    agent.update(buf, 20_000)
    benchmark.pedantic(one_round, rounds=7, warmup_rounds=0)
    benchmark.extra_info.update(what=f"one QVPO update ({mode}{' sampling and scoring' if mode == 'bf16' else ''}) "
                                     "over the floor measured in the same round", **rounds)


def test_qvpo_behaviour_action_kb4(benchmark, agent_and_buffer):
    agent, _ = agent_and_buffer
    obs = torch.randn(1, 1, OBS)
    benchmark.extra_info["what"] = "one behaviour action: best of Kb = 4 candidates, T 20"
    benchmark.pedantic(agent.act, args=(obs, True), rounds=200, warmup_rounds=5)


def test_qvpo_eval_action_k32(benchmark, agent_and_buffer):
    agent, _ = agent_and_buffer
    obs = torch.randn(1, 1, OBS)
    benchmark.extra_info["what"] = "one evaluation action: best of 32 candidates, T 20"
    benchmark.pedantic(agent.act, args=(obs, False), rounds=100, warmup_rounds=5)


def test_sac_update(benchmark):
    agent = SAC(AgentContext(OBS, ACT, device="cpu"))  # the paper's settings: batch 256, 2 x 256 ReLU
    buf = _buffers()
    benchmark.extra_info["what"] = "one SAC update: batch 256, 2x256 ReLU, fp32"
    benchmark.pedantic(agent.update, args=(buf, 20_000), rounds=50, warmup_rounds=3)


def test_env_step_hopper(benchmark):
    env = make_env("Hopper-v5", seed=0)
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, size=(1000, ACT)).astype(np.float32)
    i = iter(range(10**9))

    def step():
        _, _, term, trunc, _ = env.step(actions[next(i) % 1000])
        if term or trunc:
            env.reset()

    benchmark.extra_info["what"] = "one Hopper-v5 env step (random action)"
    benchmark.pedantic(step, rounds=2000, warmup_rounds=10)
