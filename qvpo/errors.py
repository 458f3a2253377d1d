"""The one exception type that means "the user's input is wrong"."""


class ConfigError(ValueError):
    """Bad user input (gin file, binding, CLI flag, value out of range).

    The CLI prints its message as a single line and exits non-zero before any MLflow run is
    created, so the message must name what is wrong and what would be right.
    """


def require(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless condition holds (validation of constructor arguments)."""
    if not condition:
        raise ConfigError(message)


def require_int(value, name: str, minimum: int) -> None:
    """Raise ConfigError unless value is an integer (not a bool) >= minimum."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    require(ok, f"{name} must be an integer >= {minimum}, got {value!r}")
