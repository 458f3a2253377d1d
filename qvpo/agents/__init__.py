"""The algorithm registry: one file per algorithm, one line per algorithm in `REGISTRY`.

`REGISTRY` maps the CLI's --algo name to where its agent class lives ("module:Class"); the class
is imported when it is first asked for (`agent_class`, or `from qvpo.agents import QVPO`), so the
trainer, which needs only the contract (qvpo.agents.base), loads no algorithm. `import_all()`
imports every algorithm, which registers their gin configurables (qvpo.config calls it before
parsing a gin file).
"""

from __future__ import annotations

import importlib

from qvpo.errors import ConfigError

REGISTRY: dict[str, str] = {
    "qvpo": "qvpo.agents.qvpo:QVPO",
    "sac": "qvpo.agents.sac:SAC",
    "td3": "qvpo.agents.td3:TD3",
    "qsm": "qvpo.agents.qsm:QSM",
    "dipo": "qvpo.agents.dipo:DIPO",
    "ppo": "qvpo.agents.ppo:PPO",
    "spo": "qvpo.agents.spo:SPO",
    "random": "qvpo.agents.random_policy:Random",  # uniform actions: the 0 of normalised scores
}

# --algo name -> gin configurable name (the class's name): 'qvpo' -> 'QVPO'
ALGORITHMS: dict[str, str] = {name: where.rsplit(":", 1)[1] for name, where in REGISTRY.items()}
_BY_CLASS = {cls: REGISTRY[name] for name, cls in ALGORITHMS.items()}

__all__ = ["REGISTRY", "ALGORITHMS", "agent_class", "import_all", "check_agent_bindings", "Agent",
           "AgentContext", "OnPolicyAgent", *ALGORITHMS.values()]


def _load(where: str) -> type:
    module, cls = where.rsplit(":", 1)
    return getattr(importlib.import_module(module), cls)


def agent_class(name: str) -> type:
    """The agent class of an --algo name ('qvpo' -> QVPO)."""
    if name not in REGISTRY:
        raise ConfigError(f"unknown algorithm {name!r}; expected one of {', '.join(sorted(REGISTRY))}")
    return _load(REGISTRY[name])


def import_all() -> None:
    """Import every registered algorithm (registers its gin configurable)."""
    for where in REGISTRY.values():
        _load(where)


def check_agent_bindings(agent_name: str) -> None:
    """Refuse bindings of another algorithm's parameters (`--algo sac --bind 'QVPO.T = 5'`): they
    would do nothing, and the run would silently not be the one asked for. `agent_name` is the
    configurable name of the agent that runs."""
    from gin import config as gin_config

    agents = set(ALGORITHMS.values())
    stray = sorted({selector.split(".")[-1] for (_, selector) in gin_config._CONFIG
                    if selector.split(".")[-1] in agents and selector.split(".")[-1] != agent_name})
    if stray:
        params = ", ".join(f"{s}.*" for s in stray)
        raise ConfigError(f"bindings of {params} do nothing in a {agent_name} run; drop them, or run "
                          f"{' / '.join(stray)} instead (--algo {stray[0].lower()})")


def __getattr__(name: str):
    """`from qvpo.agents import QVPO` (or Agent, AgentContext, OnPolicyAgent) imports it on demand."""
    if name in _BY_CLASS:
        return _load(_BY_CLASS[name])
    if name in ("Agent", "AgentContext", "OnPolicyAgent"):
        return _load(f"qvpo.agents.base:{name}")
    raise AttributeError(f"module 'qvpo.agents' has no attribute {name!r}")
