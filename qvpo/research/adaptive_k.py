"""Adaptive candidate numbers for QVPO's K-efficient policies (ours; an open question of the
project's list, docs/paper-notes.md#open-questions: sensitivity to Kb / Kt and an adaptive choice of them).

K moves one step at a time within a small fixed set (1, 2, 4, 8, 16 by default), so the sampler
sees only a handful of shapes (compiled graphs stay static). Both rules read signals the run
already has:

* `SpreadKb` (behaviour candidates): the spread of Q among the Nd candidates of the policy step,
  relative to the size of Q. A wide spread means the best of K differs much from a random
  candidate, so more candidates pay; a narrow one means selection buys little, so fewer do.
* `BiasKt` (target candidates): the critic's overestimation, Q(s, a) minus the discounted
  Monte-Carlo return of finished episodes (the trainer's `q/overestimation`), relative to the
  return. The max over Kt candidates in the target inflates it; when it grows Kt goes down, when
  it is small Kt goes back up.

Each rule smooths its signal with an exponential moving average and only moves after `patience`
observations on the same side of its band (hysteresis). K is one number per process: a run that
trains several seeds together cannot give each its own K (the shapes would differ), so QVPO
refuses adaptive K with seeds_per_process > 1.

Both attach to QVPO as hooks (qvpo.hooks): `QVPO.hooks = [@SpreadKb(), @BiasKt()]`.
"""

from __future__ import annotations

import gin

from qvpo.errors import require
from qvpo.hooks import QVPOHook


class _StepRule(QVPOHook):
    def __init__(self, values: tuple[int, ...], initial: int, low: float, high: float, momentum: float,
                 patience: int, name: str):
        values = tuple(sorted(int(v) for v in values))
        require(len(values) >= 1 and values[0] >= 1, f"{name}.values must be positive ints, got {values}")
        require(initial in values, f"{name}.initial ({initial}) must be one of {name}.values {values}")
        require(low < high, f"{name}: low ({low}) must be below high ({high})")
        require(0 < momentum <= 1, f"{name}.momentum must be in (0, 1], got {momentum}")
        self.values, self.index = values, values.index(initial)
        self.low, self.high, self.momentum, self.patience = low, high, momentum, patience
        self.signal: float | None = None
        self._count = 0  # consecutive observations outside the band (+ above, - below)

    @property
    def value(self) -> int:
        return self.values[self.index]

    def _observe(self, x: float, up_when_high: bool) -> int:
        self.signal = x if self.signal is None else (1 - self.momentum) * self.signal + self.momentum * x
        side = 1 if self.signal > self.high else (-1 if self.signal < self.low else 0)
        self._count = self._count + side if side and (self._count * side >= 0) else side
        if abs(self._count) >= self.patience:
            step = side if up_when_high else -side
            self.index = min(len(self.values) - 1, max(0, self.index + step))
            self._count = 0
        return self.value

    def attach(self, agent) -> None:
        require(len(agent.seeds) == 1, f"adaptive Kb / Kt ({type(self).__name__} in QVPO.hooks) needs "
                "Trainer.seeds_per_process = 1: seeds trained together share one K")

    def state_dict(self) -> dict:
        return {"index": self.index, "signal": self.signal, "count": self._count}

    def load_state_dict(self, state: dict) -> None:
        self.index, self.signal, self._count = state["index"], state["signal"], state["count"]


@gin.configurable
class SpreadKb(_StepRule):
    """Kb from the relative spread of Q among candidates: s = mean over states of std(Q) /
    (|mean(Q)| + 1), observed every update; s above `high` -> Kb up one value, below `low` ->
    down one. Band and smoothing are ours (no source gives values)."""

    def __init__(self, values: tuple[int, ...] = (1, 2, 4, 8, 16), initial: int = 4, low: float = 0.01,
                 high: float = 0.05, momentum: float = 0.01, patience: int = 1000):
        super().__init__(values, initial, low, high, momentum, patience, "SpreadKb")

    def attach(self, agent) -> None:
        super().attach(agent)
        agent.Kb = self.value

    def on_candidates(self, agent, scored) -> None:
        agent.Kb = self.observe(scored.q)  # one host read per update

    def observe(self, q) -> int:
        """q: the candidates' Q values (1, B, Nd) of one update."""
        spread = float((q.std(dim=-1) / (q.mean(dim=-1).abs() + 1.0)).mean())
        return self._observe(spread, up_when_high=True)


@gin.configurable
class BiasKt(_StepRule):
    """Kt from the critic's relative overestimation b = mean(Q - G) / (|mean G| + 1) of each
    finished episode (the trainer's q/overestimation and q/mc_return); b above `high` -> Kt down
    one value, below `low` -> up one. Band and smoothing are ours."""

    def __init__(self, values: tuple[int, ...] = (1, 2, 4, 8, 16), initial: int = 4, low: float = 0.05,
                 high: float = 0.2, momentum: float = 0.1, patience: int = 3):
        super().__init__(values, initial, low, high, momentum, patience, "BiasKt")

    def attach(self, agent) -> None:
        super().attach(agent)
        agent.Kt = self.value

    def on_episode(self, agent, seed_index: int, metrics: dict[str, float]) -> None:
        """The trainer's measured overestimation of each finished episode."""
        if "q/overestimation" in metrics:
            agent.Kt = self.observe(metrics["q/overestimation"], metrics["q/mc_return"])

    def observe(self, overestimation: float, mc_return: float) -> int:
        return self._observe(overestimation / (abs(mc_return) + 1.0), up_when_high=False)
