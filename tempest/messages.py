"""Messages: ``[task_id, task_name, *args]``, their ids and their checks."""

from __future__ import annotations

import json
import os
import reprlib
import sys
from typing import Any

from tempest.exceptions import UnknownTask
from tempest.task import Task, _registry, lookup

__all__ = ["BadMessage", "encode", "new_task_id", "parse", "shown"]


def new_task_id() -> str:
    """A new task id: 12 characters of base32, 60 random bits.

    Random rather than sequential so that producers in many processes and on
    many machines never coordinate; 60 bits keeps a collision unlikely across
    billions of ids while the id stays short enough to type into grep.
    """
    bits = int.from_bytes(os.urandom(8), "big")
    pairs = _PAIRS  # six 10-bit groups, two base32 letters each
    return (pairs[bits & 1023] + pairs[bits >> 10 & 1023] + pairs[bits >> 20 & 1023]
            + pairs[bits >> 30 & 1023] + pairs[bits >> 40 & 1023] + pairs[bits >> 50 & 1023])


_BASE32 = "abcdefghijklmnopqrstuvwxyz234567"
_PAIRS = [a + b for a in _BASE32 for b in _BASE32]
"""Every two-letter string of RFC 4648 base32, lowercased: new_task_id's lookup table."""


class BadMessage(Exception):
    """A message that cannot be run. ``reason`` is a short CamelCase word."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def shown(value: Any) -> str:
    """``repr(value)``, for a log line about bad input; never raises.

    What a queue hands over can be nested deeper than ``repr`` can recurse (a
    MemoryQueue holds any object: 10,000 nested lists raise RecursionError),
    or hold an object whose ``__repr__`` raises. Such a value is shown
    abridged by :mod:`reprlib`, which stops a few levels down.
    """
    try:
        return repr(value)
    except Exception as exc:  # noqa: BLE001 - RecursionError, or any user __repr__
        try:
            short = reprlib.repr(value)
        except Exception:  # noqa: BLE001 - reprlib shields instances, not every type
            short = f"<{type(value).__name__}>"
        return f"{short} (abridged: repr() raised {type(exc).__name__})"


def encode(task_id: str, name: str, args: tuple[Any, ...]) -> str:
    """The message as JSON; TypeError naming the first argument that isn't JSON
    (or is nested deeper than Python's json follows, about 1,000 levels)."""
    message = [task_id, name, *args]
    try:
        return json.dumps(message, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        pass
    for index, arg in enumerate(args):
        try:
            json.dumps(arg, allow_nan=False)
        except RecursionError:
            raise TypeError(
                f"argument {index} of {name} ({type(arg).__name__}) is nested too deep "
                f"for JSON: Python's json follows about {sys.getrecursionlimit()} levels"
            ) from None
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"argument {index} of {name} ({type(arg).__name__}: {shown(arg):.80}) is not "
                f"JSON-serializable: {exc}. Messages must be JSON (str, int, float, bool, "
                f"None, list, dict with str keys); pass an id and load the object in the task."
            ) from None
    raise TypeError(f"the message for {name} is not JSON-serializable")  # pragma: no cover


def parse(raw: Any) -> tuple[str | None, type[Task], tuple[Any, ...]]:
    """Check a dequeued message; return its id (None: assign one), class and args.

    Raises BadMessage with the reason the engine logs and passes to ``reject``.
    """
    # The common case in a few steps: a list, a string id, a registered
    # name, an argument count that process() takes. Anything else is looked
    # at closely below, to say what is wrong.
    if type(raw) is list and len(raw) >= 2:
        task_id, name = raw[0], raw[1]
        if type(task_id) is str and task_id and type(name) is str:
            cls = _registry.get(name)
            arity = cls._arity if cls is not None else None
            if arity is not None and arity[0] <= len(raw) - 2 <= arity[1]:
                return task_id, cls, tuple(raw[2:])  # type: ignore[return-value]
    return _parse_closely(raw)


def _parse_closely(raw: Any) -> tuple[str | None, type[Task], tuple[Any, ...]]:
    if isinstance(raw, (str, bytes, bytearray)):
        raise BadMessage("Undecodable", "the queue could not decode this message")
    if not isinstance(raw, (list, tuple)):
        raise BadMessage("NotAList", f"a message is a list, not {type(raw).__name__}")
    if len(raw) < 2:
        raise BadMessage("TooShort", "a message is [task_id, task_name, *args]")
    task_id, name = raw[0], raw[1]
    if task_id is not None and (not isinstance(task_id, str) or not task_id):
        raise BadMessage("BadTaskId", f"the task id must be a non-empty string or null, "
                                      f"not {shown(task_id)}")
    if not isinstance(name, str):
        raise BadMessage("UnknownTask", f"the task name must be a string, not {shown(name)}")
    try:
        cls = lookup(name)
    except UnknownTask as exc:
        raise BadMessage("UnknownTask", str(exc)) from None
    args = tuple(raw[2:])
    try:
        cls.check_args(args)
    except TypeError as exc:
        raise BadMessage("BadArguments", f"{name}.process{cls._signature}: {exc}") from None
    return task_id, cls, args
