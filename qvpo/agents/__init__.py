"""One file per algorithm. `ALGORITHMS` maps the CLI's --algo names to gin configurable names."""

from qvpo.agents.base import Agent
from qvpo.agents.qvpo import QVPO

ALGORITHMS: dict[str, str] = {
    "qvpo": "QVPO",
}

__all__ = ["Agent", "QVPO", "ALGORITHMS"]
