"""Wall-clock time per phase (sampling, critic, actor, env), for the `time/*` metrics."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch


class PhaseTimer:
    """Accumulates seconds per named phase until `pop()`.

    On CUDA, kernels run asynchronously: a phase's time is the device's time only if the device
    is synchronised at its edges, which stalls the queue of a launch-bound sampler. So by default
    nothing is synchronised (on CUDA the figures are then host-side time: where the host waited);
    `sync=True` (gin: `Trainer.sync_timing`) measures device time per phase at that cost.
    """

    def __init__(self, device: torch.device | None = None, sync: bool = False):
        self.sync = sync and device is not None and torch.device(device).type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str):
        if self.sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.seconds[name] += time.perf_counter() - t0

    def pop(self) -> dict[str, float]:
        out, self.seconds = dict(self.seconds), defaultdict(float)
        return out
