"""Per-seed random streams: every random draw of an agent comes from its seed's own generator.

With N seeds trained in one process, seed k's draws are exactly those it would make if it were
trained alone (same generator, same order of draws), so a batched run and N separate runs see
the same noise. Draws are returned with a leading seed dimension: (N, *shape).
"""

from __future__ import annotations

import numpy as np
import torch

# offsets keep the streams of one seed apart (network init, training noise, evaluation noise,
# replay sampling, diagnostics that must leave training's streams alone)
INIT_STREAM, NOISE_STREAM, EVAL_STREAM, BUFFER_STREAM = 0, 1_000_003, 2_000_029, 3_000_017
DIAGNOSTIC_STREAM = 4_000_037
RESEARCH_STREAM = 5_000_011  # research hooks that add to the training step (qvpo.research.mpo)


# entropy of the evaluation envs' seed tree (any fixed number: it only has to stay fixed)
EVAL_ENV_ENTROPY = 0x51F0_E7A1


def eval_env_seeds(seed: int, episodes: int) -> list[int]:
    """The reset seeds of training seed `seed`'s evaluation envs, one per evaluation episode.

    numpy's SeedSequence spawned per training seed (spawn_key) and per env (spawn): every
    (training seed, env) pair gets its own well-mixed seed, so no two training seeds share an
    evaluation episode (with `seed + 10000 + i`, seed 0's env 1 was seed 1's env 0).
    """
    root = np.random.SeedSequence(EVAL_ENV_ENTROPY, spawn_key=(int(seed),))
    return [int(child.generate_state(1)[0]) for child in root.spawn(episodes)]


def init_generators(seeds: list[int]) -> list[torch.Generator]:
    """CPU generators for network initialisation (the same init on CPU and CUDA)."""
    return [torch.Generator().manual_seed(INIT_STREAM + s) for s in seeds]


class SeedRNG:
    """N generators on `device`; randn / rand / randint return (N, *shape)."""

    def __init__(self, seeds: list[int], device: torch.device | str, stream: int = NOISE_STREAM):
        self.device = torch.device(device)
        self.generators = [torch.Generator(device=self.device).manual_seed(stream + s) for s in seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def _stack(self, draw) -> torch.Tensor:
        if len(self.generators) == 1:
            return draw(self.generators[0]).unsqueeze(0)
        return torch.stack([draw(g) for g in self.generators])

    def randn(self, *shape: int) -> torch.Tensor:
        return self._stack(lambda g: torch.randn(shape, generator=g, device=self.device))

    def rand(self, *shape: int) -> torch.Tensor:
        return self._stack(lambda g: torch.rand(shape, generator=g, device=self.device))

    def randint(self, high: int, *shape: int) -> torch.Tensor:
        return self._stack(lambda g: torch.randint(0, high, shape, generator=g, device=self.device))

    def state_dict(self) -> list[torch.Tensor]:
        return [g.get_state() for g in self.generators]

    def load_state_dict(self, states: list[torch.Tensor]) -> None:
        for g, s in zip(self.generators, states):
            g.set_state(s)
