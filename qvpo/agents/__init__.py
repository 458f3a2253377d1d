"""One file per algorithm. `ALGORITHMS` maps the CLI's --algo names to gin configurable names."""

from qvpo.agents.base import Agent
from qvpo.agents.qvpo import QVPO
from qvpo.agents.sac import SAC

ALGORITHMS: dict[str, str] = {
    "qvpo": "QVPO",
    "sac": "SAC",
}

__all__ = ["Agent", "QVPO", "SAC", "ALGORITHMS"]
