"""One file per algorithm. `ALGORITHMS` maps the CLI's --algo names to gin configurable names."""

from qvpo.agents.base import Agent, OnPolicyAgent
from qvpo.agents.dipo import DIPO
from qvpo.agents.ppo import PPO
from qvpo.agents.qsm import QSM
from qvpo.agents.qvpo import QVPO
from qvpo.agents.random_policy import Random
from qvpo.agents.sac import SAC
from qvpo.agents.spo import SPO
from qvpo.agents.td3 import TD3

ALGORITHMS: dict[str, str] = {
    "qvpo": "QVPO",
    "sac": "SAC",
    "td3": "TD3",
    "qsm": "QSM",
    "dipo": "DIPO",
    "ppo": "PPO",
    "spo": "SPO",
    "random": "Random",  # uniform actions: the 0 of normalised scores
}

__all__ = ["Agent", "OnPolicyAgent", "agent_class", "QVPO", "SAC", "TD3", "PPO", "SPO", "DIPO", "QSM", "Random", "ALGORITHMS"]


def agent_class(name: str) -> type:
    """The agent class of an --algo name ('qvpo' -> QVPO)."""
    from qvpo.errors import ConfigError

    if name not in ALGORITHMS:
        raise ConfigError(f"unknown algorithm {name!r}; expected one of {', '.join(sorted(ALGORITHMS))}")
    return globals()[ALGORITHMS[name]]
