"""Schedules of the entropy weight omega_ent of QVPO: fixed or decayed over env steps (the adaptive
one, a research add-on, is qvpo.research.adaptive_entropy)."""

from __future__ import annotations

import gin

from qvpo.errors import require


@gin.configurable
class Constant:
    """omega_ent fixed; 0.01 is the fixed weight taken as the paper's for all tasks
    (docs/paper-notes.md#entropy-weight-schedule: not checked against its Table 3)."""

    def __init__(self, value: float = 0.01):
        require(value >= 0, f"Constant.value must be >= 0, got {value}")
        self.value = value

    def __call__(self, step: int, total_steps: int) -> float:
        return self.value


@gin.configurable
class LinearDecay:
    """The reference code's omega_ent: min(initial, max(final, initial * (1 - step / total_steps))).

    total_steps is the run length (1e6 in the paper), passed in by the trainer. Source:
    wadx2019/qvpo@40a1974 main.py L193 (docs/paper-notes.md#entropy-weight-schedule).
    """

    def __init__(self, initial: float = 0.02, final: float = 0.002):  # the reference code's
        require(initial >= 0 and final >= 0,
                f"LinearDecay needs initial, final >= 0, got initial={initial}, final={final}")
        self.initial, self.final = initial, final

    def __call__(self, step: int, total_steps: int) -> float:
        frac = step / max(total_steps, 1)
        return min(self.initial, max(self.final, self.initial * (1.0 - frac)))
