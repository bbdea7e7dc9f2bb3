"""The declarative ``class configure:`` block shared by engines and tasks.

A configure block is a plain nested class whose public attributes are options::

    class MathTempest(Engine):
        class configure:
            threads = 2
            timeout = 1.5

Each option has a validator that runs when the owning class is created, so a
typo or a wrong value fails at import time with a message saying what is
allowed. A subclass starts from its parent's resolved options and overrides
the ones its own block names.
"""

from __future__ import annotations

import difflib
import numbers
import os
from collections.abc import Callable, Mapping
from typing import Any

from tempest import periodic as periodic_schedules
from tempest.exceptions import ConfigurationError
from tempest.queues import protocol

__all__ = ["Option", "read_block"]

Validator = Callable[[Any], Any]


class Option:
    """One option of a configure block: its name, default and validator."""

    __slots__ = ("default", "inherited", "name", "validate")

    def __init__(
        self, name: str, default: Any, validate: Validator, *, inherited: bool = True
    ) -> None:
        self.name = name
        self.default = default
        self.validate = validate
        self.inherited = inherited


def read_block(
    owner: str,
    block: type | None,
    options: Mapping[str, Option],
    inherited: Mapping[str, Any],
) -> dict[str, Any]:
    """Resolve *block* into a dict of every option's value.

    *owner* names the class in error messages; *inherited* holds the parent's
    resolved values, used for options the block does not name.
    """
    values = {
        name: inherited[name] if opt.inherited and name in inherited else opt.default
        for name, opt in options.items()
    }
    if block is None:
        return values
    if not isinstance(block, type):
        raise ConfigurationError(
            f"{owner}.configure must be a nested class (class configure: ...), "
            f"not {type(block).__name__}"
        )
    for name, raw in vars(block).items():
        if name.startswith("_"):
            continue
        if name not in options:
            raise ConfigurationError(_unknown(owner, name, options))
        value = raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw
        try:
            values[name] = options[name].validate(value)
        except ConfigurationError as exc:
            raise ConfigurationError(f"{owner}.configure.{name}: {exc}") from None
    return values


def _unknown(owner: str, name: str, options: Mapping[str, Option]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}?" if close else "valid options: " + ", ".join(
        sorted(options)
    )
    return f"{owner}.configure has no option {name!r}; {hint}"


# -- validators -------------------------------------------------------------
# Each returns the (possibly normalised) value or raises ConfigurationError
# with a message saying what is allowed; read_block prefixes the option name.


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def positive_int(value: Any) -> int:
    """An int of at least 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"must be a whole number of at least 1, not {value!r}")
    return value


def non_negative_int(value: Any) -> int:
    """An int of at least 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigurationError(f"must be a whole number of at least 0, not {value!r}")
    return value


def boolean(value: Any) -> bool:
    """True or False."""
    if not isinstance(value, bool):
        raise ConfigurationError(f"must be True or False, not {value!r}")
    return value


def seconds_or_none(value: Any) -> float | None:
    """None, or a positive number of seconds."""
    if value is None:
        return None
    if not _is_number(value) or not value > 0 or value == float("inf"):
        raise ConfigurationError(
            f"must be a positive number of seconds or None, not {value!r}"
        )
    return float(value)


def positive_seconds(value: Any) -> float:
    """A positive number of seconds (not None)."""
    if not _is_number(value) or not value > 0 or value == float("inf"):
        raise ConfigurationError(f"must be a positive number of seconds, not {value!r}")
    return float(value)


def non_negative_seconds(value: Any) -> float:
    """A number of seconds of at least 0."""
    if not _is_number(value) or not value >= 0 or value == float("inf"):
        raise ConfigurationError(f"must be a number of seconds of at least 0, not {value!r}")
    return float(value)


def callable_or_none(value: Any) -> Callable[..., Any] | None:
    """None, or something callable."""
    if value is not None and not callable(value):
        raise ConfigurationError(f"must be a callable or None, not {value!r}")
    return value  # type: ignore[no-any-return]


def name(value: Any) -> str:
    """A non-empty string usable in a file name."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigurationError(f"must be a non-empty string, not {value!r}")
    if os.sep in value or (os.altsep and os.altsep in value) or "\0" in value:
        raise ConfigurationError(
            f"is used in log file names and may not contain a path separator: {value!r}"
        )
    return value


def task_name(value: Any) -> str:
    """A non-empty string."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigurationError(f"must be a non-empty string, not {value!r}")
    return value


def priority(value: Any) -> int:
    """A message priority: an int in the 32-bit range."""
    try:
        return protocol.priority(value, "a priority")
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"must be {str(exc).partition(' must be ')[2]}") from None


def periodic(value: Any) -> Any:
    """A list of every(...) and cron(...) schedules with distinct names."""
    return periodic_schedules.check(value)


def port_or_none(value: Any) -> int | None:
    """None, or a TCP port number (0: any free port, chosen when the engine starts)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ConfigurationError(
            f"must be a TCP port number from 0 to 65535 (0: any free port) or None, "
            f"not {value!r}"
        )
    return value


def host(value: Any) -> str:
    """A host name or IP address to listen on (a non-empty str without spaces)."""
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        raise ConfigurationError(
            f"must be a host name or IP address such as '127.0.0.1', not {value!r}"
        )
    return value


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")


def log_level(value: Any) -> str | Callable[[], Any]:
    """One of LOG_LEVELS (any case), or a callable returning one at start."""
    if callable(value):
        return value  # type: ignore[no-any-return]
    if isinstance(value, str) and value.upper() in LOG_LEVELS:
        return value.upper()
    raise ConfigurationError(
        f"must be one of {', '.join(map(repr, LOG_LEVELS))} "
        f"(or a callable returning one), not {value!r}"
    )


def log_format(value: Any) -> str:
    """One of LOG_FORMATS."""
    if isinstance(value, str) and value.lower() in LOG_FORMATS:
        return value.lower()
    raise ConfigurationError(
        f"must be one of {', '.join(map(repr, LOG_FORMATS))}, not {value!r}"
    )


def log_dir(value: Any) -> str | os.PathLike[str] | Callable[[], Any]:
    """A folder path, or a callable returning one at start."""
    if callable(value) or isinstance(value, (str, os.PathLike)):
        return value  # type: ignore[no-any-return]
    raise ConfigurationError(
        f"must be a folder path (str or os.PathLike) or a callable returning one, "
        f"not {value!r}"
    )


def queue(value: Any) -> Any:
    """Any object with callable ``enqueue`` and ``dequeue`` methods."""
    missing = [m for m in ("enqueue", "dequeue") if not callable(getattr(value, m, None))]
    if isinstance(value, type) or missing:
        what = f"the class {value.__name__}" if isinstance(value, type) else repr(value)
        hint = " (did you forget the parentheses?)" if isinstance(value, type) else ""
        raise ConfigurationError(
            f"must be a queue object with enqueue(message) and dequeue() methods; "
            f"got {what}{hint}"
        )
    return value
