"""gin set-up: registration of every configurable, parsing of files and bindings, shorthands.

Dopamine's convention: every hyperparameter is a keyword argument with a default on a
`@gin.configurable` constructor; files and bindings are parsed with skip_unknown=False, so a
misspelled name is an error, never silently ignored.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import gin

# importing these registers their configurables with gin
import qvpo.buffers  # noqa: F401
import qvpo.diffusion  # noqa: F401
import qvpo.envs  # noqa: F401
import qvpo.nets  # noqa: F401
import qvpo.optim  # noqa: F401
import qvpo.research.adaptive_entropy  # noqa: F401
import qvpo.research.adaptive_k  # noqa: F401
import qvpo.research.gradient_variance  # noqa: F401
import qvpo.research.mpo  # noqa: F401
import qvpo.schedules  # noqa: F401
import qvpo.tracking  # noqa: F401
import qvpo.train  # noqa: F401
import qvpo.weights  # noqa: F401
from qvpo.agents import ALGORITHMS, import_all
from qvpo.errors import ConfigError, one_line

import_all()  # every algorithm's configurable

# the configs and reproduce specs ship inside the package (also in a wheel): qvpo/gin/ and
# qvpo/reproduce/ (the checkout links gin/ and reproduce/ at its top level to them)
PACKAGE_DIR = Path(str(resources.files("qvpo")))
GIN_DIR = PACKAGE_DIR / "gin"
REPRODUCE_DIR = PACKAGE_DIR / "reproduce"


def find_file(name: str, what: str = "gin file") -> Path:
    """A path as given (from the working directory), else one shipped with the package: relative
    to its gin/ ('algos/sac.gin') or to the package ('reproduce/cpu_scale/qvpo_reduced.gin')."""
    for candidate in (Path(name), GIN_DIR / name, PACKAGE_DIR / name):
        if candidate.is_file():
            return candidate.resolve()  # absolute: gin's own include prefixes are not searched
    raise ConfigError(f"{what} {name!r} not found (looked in the working directory, {GIN_DIR} and {PACKAGE_DIR})")


def find_gin_file(name: str) -> Path:
    return find_file(name, "gin file")


def find_spec(name: str) -> Path:
    """A sweep spec: a path, or the name of a shipped one ('table1' = reproduce/table1/sweep.gin)."""
    shipped = REPRODUCE_DIR / name / "sweep.gin"
    if not Path(name).is_file() and shipped.is_file():
        return shipped
    try:
        return find_file(name, "sweep spec")
    except ConfigError:
        names = sorted(p.parent.name for p in REPRODUCE_DIR.glob("*/sweep.gin"))
        raise ConfigError(f"sweep spec {name!r} not found: give a path to a spec file or one of the shipped "
                          f"specs: {', '.join(names)}") from None


def use_gin_dir_for_includes() -> None:
    """Let `include 'algos/qvpo.gin'` find the repository's gin/ from any working directory.

    gin tries its search prefixes in order and logs an error for each miss, so gin/ goes first.
    """
    from gin import config as gin_config

    prefixes = gin_config._LOCATION_PREFIXES
    if str(GIN_DIR) not in prefixes:
        prefixes.insert(0, str(GIN_DIR))


def check_algo(algo: str) -> str:
    """The gin configurable name of an --algo name (ConfigError for an unknown one)."""
    if algo not in ALGORITHMS:
        raise ConfigError(f"unknown --algo {algo!r}; expected one of {', '.join(sorted(ALGORITHMS))}")
    return ALGORITHMS[algo]


def algo_files(algo: str | None, gin_files: list[str]) -> list[str]:
    """The gin files of a run: `--algo X` always starts from gin/algos/X.gin (X's own settings,
    whatever else is given); without --algo the files as given, or gin/algos/qvpo.gin if none."""
    if algo is not None:
        check_algo(algo)
        return [f"algos/{algo}.gin", *gin_files]
    return list(gin_files) or ["algos/qvpo.gin"]


def bound_agent() -> str | None:
    """The configurable name that the parsed config binds Trainer.agent to (None if unbound)."""
    try:
        ref = gin.query_parameter("Trainer.agent")
    except ValueError:
        return None
    return getattr(getattr(ref, "configurable", None), "name", None)


def parse(gin_files: list[str], bindings: list[str], algo: str | None = None) -> None:
    """Clear gin, then parse files (in order) and bindings (after them, so they override).

    With `algo` (the CLI's --algo), gin/algos/<algo>.gin is parsed first, so the algorithm runs
    with its own settings for everything the other files and bindings do not set; a file or
    binding that chooses another agent is a contradiction (ConfigError), not an override.
    Every failure becomes a ConfigError whose first line names the problem.
    """
    gin_files = algo_files(algo, gin_files)
    paths = [str(find_gin_file(f)) for f in gin_files]
    gin.clear_config()
    use_gin_dir_for_includes()
    try:
        gin.parse_config_files_and_bindings(paths, bindings, skip_unknown=False,
                                            finalize_config=False)
    except ConfigError:
        raise
    except (ValueError, SyntaxError, TypeError, KeyError, NameError, IOError) as e:
        raise ConfigError(f"gin config: {one_line(e)}") from None
    if algo is not None and bound_agent() != ALGORITHMS[algo]:
        raise ConfigError(f"--algo {algo} contradicts the gin files or bindings, which choose "
                          f"Trainer.agent = @{bound_agent()} (e.g. through include 'algos/...gin'); "
                          f"drop --algo or the file that picks another algorithm")


def parse_text(text: str, bindings: list[str]) -> None:
    """Clear gin and parse a config given as text (a checkpoint's operative config), then bindings."""
    gin.clear_config()
    use_gin_dir_for_includes()
    try:
        gin.parse_config(text, skip_unknown=False)
        gin.parse_config(bindings, skip_unknown=False)
    except (ValueError, SyntaxError, TypeError, KeyError, NameError, IOError) as e:
        raise ConfigError(f"gin config: {one_line(e)}") from None


def shorthand_bindings(env: str | None = None, steps: int | None = None,
                       seed: int | None = None, experiment: str | None = None,
                       tracking_uri: str | None = None, device: str | None = None) -> list[str]:
    """The CLI's shorthand flags as the gin bindings they stand for (--algo is not one: it picks
    the algorithm's gin file, see parse)."""
    out = []
    for target, value in [("Trainer.env_id", env), ("Trainer.total_steps", steps),
                          ("Trainer.seed", seed), ("MlflowTracker.experiment", experiment),
                          ("MlflowTracker.tracking_uri", tracking_uri), ("Trainer.device", device)]:
        if value is not None:
            out.append(f"{target} = {value!r}")
    return out
