"""QVPO at the paper's settings on Hopper-v5 dimensions (obs 11, action 3): constructor defaults =
gin/algos/qvpo.gin (batch 256, Nd 64, T 20, Kb = Kt = 4, eval K 32, 3 x 256 Mish networks).

Run with `make bench`; numbers go to the README with the machine they ran on.
"""

import numpy as np
import pytest
import torch

from qvpo.agents.qvpo import QVPO
from qvpo.agents.sac import SAC
from qvpo.buffers import ReplayBuffer, SeedBuffers
from qvpo.envs import make_env

OBS, ACT = 11, 3  # Hopper-v5


def _buffers():
    buf = ReplayBuffer(OBS, ACT, capacity=20_000)
    g = torch.Generator().manual_seed(0)
    for _ in range(5_000):
        buf.add(torch.randn(OBS, generator=g), torch.rand(ACT, generator=g) * 2 - 1,
                1.0, torch.randn(OBS, generator=g), False)
    return SeedBuffers([buf], [0])


@pytest.fixture(scope="module")
def agent_and_buffer():
    return QVPO(OBS, ACT, device="cpu"), _buffers()


def test_qvpo_update_paper_settings(benchmark, agent_and_buffer):
    agent, buf = agent_and_buffer
    benchmark.extra_info["what"] = "one QVPO update: B 256, Nd 64, T 20, Kt 4, 3x256 Mish, fp32, native kernels (the default)"
    benchmark.pedantic(agent.update, args=(buf, 20_000), rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("precision,compile,native,scoring", [
    ("fp32", False, False, "fp32"), ("fp32", True, False, "fp32"),
    ("bf16", False, True, "fp32"), ("bf16", False, True, "bf16"), ("bf16", True, False, "fp32")])
def test_qvpo_update_fast_modes(benchmark, precision, compile, native, scoring):
    """The other sampler modes: torch ops only (no native kernels), torch.compile of the denoising
    step (which uses torch ops), and the bf16 sampler (native kernels: on AMX CPUs the whole-chain
    AMX sampler; or compiled), with candidate scoring in fp32 or bf16 (TwinQ.scoring_precision)."""
    agent, buf = QVPO(OBS, ACT, device="cpu"), _buffers()
    for pol in (agent.policy, agent.policy_target):
        pol.precision, pol.compile, pol.native = precision, compile, native
    for critic in (agent.critic, agent.critic_target):
        critic.scoring_precision = scoring
    how = "torch.compile" if compile else ("native kernels" if native else "torch ops only")
    benchmark.extra_info["what"] = f"one QVPO update, sampler {precision}, {how}, scoring {scoring}"
    benchmark.pedantic(agent.update, args=(buf, 20_000), rounds=5, warmup_rounds=2)


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
    agent = SAC(OBS, ACT, device="cpu")  # the paper's settings: batch 256, 2 x 256 ReLU
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
