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


def one_line(e: BaseException) -> str:
    """The first line of an exception's message (gin, MLflow and torch append long context)."""
    text = str(e).strip()
    if isinstance(e, SyntaxError) and e.msg:
        where = f" ({e.filename or 'bindings'}, line {e.lineno})" if e.lineno else ""
        return f"syntax error: {e.msg}{where}: {(e.text or '').strip()}"
    return text.splitlines()[0] if text else type(e).__name__
