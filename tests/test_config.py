import inspect

import gin
import pytest
from gin import config as gin_config

from qvpo import config
from qvpo.agents import ALGORITHMS, agent_class
from qvpo.errors import ConfigError
from qvpo.train import Trainer

TINY_RUN = ["Trainer.env_id = 'Pendulum-v1'", "Trainer.total_steps = 10", "Trainer.progress = False",
            "Trainer.eval_episodes = 1", "ReplayBuffer.capacity = 1000", "QVPO.batch_size = 8",
            "QVPO.T = 3", "Denoiser.hidden = (16, 16)", "TwinQ.hidden = (16, 16)"]


def test_operative_config_round_trip():
    config.parse(["algos/qvpo.gin"], TINY_RUN)
    t = Trainer()
    first = gin.operative_config_str()
    t.close()
    assert "QVPO.train_candidates = 64" in first and "Trainer.env_id = 'Pendulum-v1'" in first
    gin.clear_config()
    gin.parse_config(first)
    t2 = Trainer()
    assert gin.operative_config_str() == first
    assert t2.agent.Nd == 64 and t2.agent.policy.T == 3 and t2.agent.batch_size == 8
    t2.close()


def test_shorthands_override_files():
    config.parse(["algos/qvpo.gin"], config.shorthand_bindings(env="Pendulum-v1", steps=7, seed=3))
    assert gin.query_parameter("Trainer.total_steps") == 7
    assert gin.query_parameter("Trainer.seed") == 3
    assert gin.query_parameter("Trainer.env_id") == "Pendulum-v1"


def test_unknown_names_are_errors():
    with pytest.raises(ConfigError, match="Nope"):
        config.parse([], ["Nope.x = 1"])
    with pytest.raises(ConfigError, match="batchsize"):
        config.parse([], ["QVPO.batchsize = 1"])


def _defaults(selector):
    fn = gin_config._REGISTRY.get_match(selector).wrapped
    target = fn.__init__ if inspect.isclass(fn) else fn
    return {k: p.default for k, p in inspect.signature(target).parameters.items()}


ALGO_NAMES = sorted(ALGORITHMS)


@pytest.mark.parametrize("algo", ALGO_NAMES)
def test_gin_file_restates_the_constructor_defaults(algo):
    """Running without the gin file runs the algorithm's settings too: file == code defaults,
    for every configurable the file binds, shared ones (Trainer, DiffusionPolicy, TwinQ, ...)
    included: what differs between algorithms is each algorithm's own parameter."""
    config.parse([f"algos/{algo}.gin"], [])
    checked = 0
    for (scope, selector), params in gin_config._CONFIG.items():
        defaults = _defaults(selector)
        for name, value in params.items():
            if selector.endswith("Trainer") and name == "agent":
                continue  # the choice of algorithm itself
            if selector.endswith(".SPO"):
                continue  # SPO's settings live only in its file (test_spo_settings_live_in_its_gin_file)
            if isinstance(value, gin_config.ConfigurableReference):
                if defaults[name] is None:
                    continue  # a `None = X()` default (QVPO.q_weight: QAdv()): the docstring says which
                value = value.configurable.wrapped
            if algo == "random" and selector.endswith("Trainer") and name in ("total_steps", "eval_every",
                                                                              "checkpoint_every"):
                continue  # the baseline's one evaluation: its own protocol, not an algorithm setting
            default = defaults[name]
            assert default == value or (callable(value) and getattr(default, "__name__", None) ==
                                        getattr(value, "__name__", "")), \
                f"{selector}.{name}: gin file {value!r} != code default {default!r}"
            checked += 1
    # the file states every setting of the algorithm's constructor (so each carries its source)
    agent = ALGORITHMS[algo]
    settings = [p for p in inspect.signature(agent_class(algo).__init__).parameters if p not in ("self", "context")]
    bound = {name for (_, selector), params in gin_config._CONFIG.items()
             if selector.split(".")[-1] == agent for name in params}
    assert [p for p in settings if p not in bound] == [], f"algos/{algo}.gin leaves settings of {agent} unstated"
    assert checked >= 3  # Trainer's protocol at least


def test_spo_settings_live_in_its_gin_file():
    """SPO's constructor is PPO's: built without spo.gin it would run PPO's settings, so it refuses;
    with the file every one of its settings is bound there."""
    from qvpo.agents import SPO
    from qvpo.agents.base import AgentContext
    from qvpo.agents.spo import SETTINGS

    with pytest.raises(ConfigError, match="spo.gin"):
        SPO(AgentContext(3, 2))
    config.parse(["algos/spo.gin"], [])
    assert set(gin_config._CONFIG[("", "qvpo.agents.spo.SPO")]) == set(SETTINGS)
    assert SPO(AgentContext(3, 2)).minibatch_size == 512  # the SPO reference's, not PPO's 64


def _operative(gin_files, algo=None):
    config.parse(gin_files, ["Trainer.progress = False"], algo=algo)
    t = Trainer()
    text = gin.operative_config_str()
    t.close()
    return text


@pytest.mark.parametrize("algo", ALGO_NAMES)
def test_algo_flag_means_the_algorithms_settings(algo):
    """`--algo X --gin envs/hopper.gin` runs exactly what `--gin algos/X.gin --gin envs/hopper.gin`
    runs (it once ran X with QVPO's shared settings: DIPO with T = 20, TD3 with 10k warm-up)."""
    by_flag = _operative(["envs/hopper.gin"], algo=algo)
    by_file = _operative([f"algos/{algo}.gin", "envs/hopper.gin"])
    assert by_flag == by_file
    assert f"Trainer.agent = @{ALGORITHMS[algo]}" in by_flag


def test_python_entry_point_uses_the_algorithms_own_defaults():
    """Trainer(agent=X) with no gin file: X's settings, not QVPO's."""
    gin.clear_config()
    gin.parse_config(["Trainer.env_id = 'Pendulum-v1'", "Trainer.progress = False", "Trainer.eval_episodes = 1",
                      "ReplayBuffer.capacity = 1000"])
    from qvpo.agents import DIPO, TD3
    dipo = Trainer(agent=DIPO)
    assert dipo.agent.policy.T == 100 and dipo.warmup_steps == 10_000
    dipo.close()
    td3 = Trainer(agent=TD3)
    assert td3.warmup_steps == 25_000
    td3.close()


def test_binding_overrides_the_algorithms_warmup_for_any_agent():
    config.parse(["envs/hopper.gin"], ["Trainer.warmup_steps = 123", "Trainer.progress = False"], algo="td3")
    t = Trainer()
    assert t.warmup_steps == 123
    t.close()


def test_contradicting_algo_and_file_is_one_line_error():
    with pytest.raises(ConfigError, match="--algo sac contradicts .* @QVPO"):
        config.parse(["algos/qvpo.gin"], [], algo="sac")
    with pytest.raises(ConfigError, match="--algo td3 contradicts"):
        config.parse(["demo.gin"], [], algo="td3")  # through demo.gin's include
    with pytest.raises(ConfigError, match="--algo sac contradicts"):
        config.parse([], ["Trainer.agent = @TD3"], algo="sac")


def test_another_algorithms_bindings_are_refused():
    config.parse([], ["QVPO.T = 5", "Trainer.env_id = 'Pendulum-v1'", "Trainer.progress = False"], algo="sac")
    with pytest.raises(ConfigError, match=r"bindings of QVPO\.\* do nothing in a SAC run"):
        Trainer()


def test_diffusion_steps_are_the_algorithms_parameter():
    """DiffusionPolicy.T is not a gin parameter (each algorithm passes its own T)."""
    with pytest.raises(ConfigError, match="DiffusionPolicy"):
        config.parse([], ["DiffusionPolicy.T = 5"])
