"""One file per algorithm. `ALGORITHMS` maps the CLI's --algo names to gin configurable names."""

from qvpo.agents.base import Agent
from qvpo.agents.qvpo import QVPO
from qvpo.agents.sac import SAC
from qvpo.agents.td3 import TD3

ALGORITHMS: dict[str, str] = {
    "qvpo": "QVPO",
    "sac": "SAC",
    "td3": "TD3",
}

__all__ = ["Agent", "QVPO", "SAC", "TD3", "ALGORITHMS"]
