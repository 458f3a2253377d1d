"""Adaptive Kb / Kt rules: direction, the fixed set of values, hysteresis, state."""

import pytest
import torch

from qvpo.agents.base import AgentContext
from qvpo.research.adaptive_k import BiasKt, SpreadKb
from qvpo.errors import ConfigError


def test_spread_rule_raises_kb_for_wide_spreads_and_lowers_it_for_narrow_ones():
    rule = SpreadKb(initial=4, low=0.01, high=0.05, momentum=1.0, patience=2)
    wide = torch.tensor([[[0.0, 10.0, -10.0, 5.0]]])    # std >> |mean| + 1
    narrow = torch.full((1, 3, 4), 100.0)                # identical candidates
    assert rule.observe(wide) == 4                       # one observation: patience not reached
    assert rule.observe(wide) == 8                       # two: up one value
    for _ in range(10):
        rule.observe(wide)
    assert rule.value == 16                              # capped at the largest value
    for _ in range(2 * 10):
        rule.observe(narrow)
    assert rule.value == 1                               # down to the smallest, one value at a time


def test_bias_rule_lowers_kt_when_overestimation_grows_and_back_when_it_shrinks():
    rule = BiasKt(initial=4, low=0.05, high=0.2, momentum=1.0, patience=1)
    assert rule.observe(overestimation=50.0, mc_return=100.0) == 2    # b = 50 / 101 > 0.2: down
    assert rule.observe(overestimation=50.0, mc_return=100.0) == 1
    assert rule.observe(overestimation=10.0, mc_return=100.0) == 1    # inside the band: stays
    assert rule.observe(overestimation=-5.0, mc_return=100.0) == 2    # underestimation: back up
    state = rule.state_dict()
    other = BiasKt(initial=4)
    other.load_state_dict(state)
    assert other.value == 2


def test_smoothing_and_checks():
    rule = BiasKt(initial=4, momentum=0.1, patience=1)
    rule.observe(100.0, 100.0)  # the first observation sets the average
    rule.observe(0.0, 100.0)    # one small value barely moves it: still above the band
    assert rule.value == 1
    with pytest.raises(ConfigError, match="initial"):
        SpreadKb(initial=3)
    with pytest.raises(ConfigError, match="low"):
        BiasKt(low=0.5, high=0.1)


def test_qvpo_moves_kb_and_kt_with_its_rules():
    from qvpo.agents.qvpo import QVPO
    from helpers import filled_buffers

    kw = dict(batch_size=8, train_candidates=4)
    rules = [SpreadKb(initial=4, low=-1.0, high=-0.5, momentum=1.0, patience=1), BiasKt(initial=4, momentum=1.0, patience=1)]
    agent = QVPO(AgentContext(3, 2, seeds=(0,)), hooks=rules, **kw)
    buffers = filled_buffers((0,))
    agent.update(buffers, step=1)  # any spread is above a negative band: Kb up one value
    assert agent.Kb == 8
    agent.update(buffers, step=2)
    assert agent.Kb == 16 and agent.act(torch.randn(1, 1, 3), explore=True).shape == (1, 1, 2)
    agent.observe_episode(0, {"train/episode_return": 1.0})  # no measurement: no change
    assert agent.Kt == 4
    agent.observe_episode(0, {"q/overestimation": 80.0, "q/mc_return": 100.0})
    assert agent.Kt == 2
    # Kb, Kt and the rules' state through a checkpoint: the contract suite's `qvpo+adaptive-k` case
    with pytest.raises(ConfigError, match="seeds_per_process = 1"):
        QVPO(AgentContext(3, 2, seeds=(0, 1)), hooks=[SpreadKb()], **kw)
