"""Slow check (`make test-slow`): a same-seed short training run in the bf16 mode (sampler and
candidate scoring) reaches a return within the spread of fp32 runs over seeds (the learning
test's settings, Pendulum-v1)."""

import gin
import numpy as np
import pytest

from qvpo.train import Trainer
from test_learning import SMALL


def late_means(extra):
    gin.clear_config()
    import qvpo.config  # noqa: F401
    gin.parse_config(SMALL + extra)
    trainer = Trainer()
    results = trainer.run()
    trainer.close()
    return [float(np.mean([e.mean for e in r.evaluations[-3:]])) for r in results]


@pytest.mark.slow
def test_bf16_sampler_training_within_fp32_seed_spread():
    steps = "Trainer.total_steps = 7000"  # env steps (the figures in docs/speed.md#bf16-and-learning are for this)
    fp32 = late_means([steps, "Trainer.seeds_per_process = 3"])          # seeds 0, 1, 2
    bf16 = late_means([steps, "DiffusionPolicy.precision = 'bf16'", "TwinQ.scoring_precision = 'bf16'"])[0]  # seed 0
    spread = max(fp32) - min(fp32)
    print(f"fp32 seeds 0-2 late means {[round(x) for x in fp32]}; bf16 seed 0 {bf16:.0f}")
    assert min(fp32) - 0.5 * spread <= bf16 <= max(fp32) + 0.5 * spread
