"""Retries: which failures run again, after how long, and what the failed store keeps.

A task's retry policy comes from its configure block, falling back to the
engine's (``retries``, ``retry_on``, ``retry_delay``, ``retry_max_delay``).
The engine asks :meth:`Policy.decide` once per failed or timed-out attempt:
a delay in seconds (retry) or None (the attempt was the last one).

Backoff
-------
The n-th retry (n = 1 after the first failed attempt) waits
``retry_delay * 2 ** (n - 1)`` seconds times a random factor from 1 to 1.5,
at most ``retry_max_delay``. The jitter only ever adds: a task never retries
sooner than its configured delay, and tasks that failed together (a database
went away) spread out instead of coming back together. A callable
``retry_delay(attempt, exc)`` replaces the formula; what it returns is checked
(a number of seconds >= 0), and a callable that raises or returns something
else falls back to the formula with a logged error. ``raise Retry(delay=...)``
gives the delay itself.
"""

from __future__ import annotations

import gc
import math
import random
import sys
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tempest.exceptions import ConfigurationError, Retry, TaskTimeout

if TYPE_CHECKING:
    from tempest.task import Task

__all__ = ["Policy", "backoff", "failed_record", "retry_delay", "retry_on", "thread_frame",
           "thread_stack"]

JITTER = 1.5
"""The largest random factor a backoff delay is multiplied by (the smallest is 1)."""


def retry_on(value: Any) -> tuple[type[BaseException], ...] | None:
    """None (any failure and timeouts), or exception classes: as a tuple."""
    if value is None:
        return None
    classes = value if isinstance(value, (tuple, list)) else (value,)
    for cls in classes:
        if not (isinstance(cls, type) and issubclass(cls, BaseException)):
            raise ConfigurationError(
                f"must be an exception class, a tuple of them, or None (any failure and "
                f"timeouts), not {cls!r}")
    if not classes:
        raise ConfigurationError("must name at least one exception class, or be None")
    return tuple(classes)


def retry_delay(value: Any) -> float | Callable[[int, BaseException], Any]:
    """Seconds >= 0, or a callable ``f(attempt, exc) -> seconds``."""
    if callable(value):
        return value  # type: ignore[no-any-return]
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not 0 <= value < math.inf:
        raise ConfigurationError(
            f"must be a number of seconds >= 0 or a callable f(attempt, exc) -> seconds, "
            f"not {value!r}")
    return float(value)


def backoff(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """The delay before retry number *attempt* (1-based): see the module docstring."""
    factor = (rng or random).uniform(1.0, JITTER)
    # 2 ** 1100 overflows a float: past the cap long before, so stop doubling there.
    exponent = min(attempt - 1, 1000)
    return min(cap, base * 2.0 ** exponent * factor)


class Policy:
    """One task's resolved retry options, as an engine applies them."""

    __slots__ = ("cap", "delay", "on", "retries", "timeouts")

    def __init__(self, retries: int, on: tuple[type[BaseException], ...] | None,
                 delay: float | Callable[[int, BaseException], Any], cap: float) -> None:
        self.retries = retries
        self.on = on
        self.delay = delay
        self.cap = cap
        self.timeouts = on is None or issubclass(TaskTimeout, on)

    def retryable(self, exc: BaseException) -> bool:
        """Whether a failure with *exc* (a TaskTimeout for a timeout) is retried at all."""
        if isinstance(exc, Retry):
            return True
        if isinstance(exc, TaskTimeout):
            return self.timeouts
        return self.on is None or isinstance(exc, self.on)

    def decide(self, attempt: int, exc: BaseException,
               on_error: Callable[[str], None]) -> float | None:
        """Seconds until the next attempt after attempt *attempt* failed, or None.

        *on_error* is told, in one line, when a ``retry_delay`` callable fails.
        """
        if attempt > self.retries or not self.retryable(exc):
            return None
        if isinstance(exc, Retry) and exc.delay is not None:
            return exc.delay
        if callable(self.delay):
            try:
                chosen = self.delay(attempt, exc)
            except Exception as error:  # noqa: BLE001 - a user's callable must not lose the task
                on_error(f"retry_delay raised {type(error).__name__}: {error}")
            else:
                if not isinstance(chosen, bool) and isinstance(chosen, (int, float)) \
                        and 0 <= chosen < math.inf:
                    return float(chosen)
                on_error(f"retry_delay returned {chosen!r}, not a number of seconds >= 0")
            return backoff(attempt, 1.0, self.cap)
        return backoff(attempt, self.delay, self.cap)


def failed_record(task: Task, exc: BaseException, stack: str | None = None
                  ) -> dict[str, Any]:
    """The failed-store entry for *task*'s attempt that ended with *exc* (see the protocol).

    *stack* (text) stands in for the traceback of a timed-out task: where its
    thread was when the time ran out.
    """
    if stack is None:
        stack = "".join(traceback.format_exception(exc))
    try:
        message = str(exc)
    except Exception:  # noqa: BLE001 - a broken __str__ must not lose the task
        message = "<exception str() failed>"
    return {"task_id": task.task_id, "task": task.task_name, "args": list(task.args),
            "attempts": task.attempt,
            "error_type": type(exc).__name__, "error": message, "traceback": stack,
            "last_failed_at": time.time()}


def thread_stack(ident: int | None) -> str:
    """The Python stack of thread *ident* right now, as traceback text ("" if gone)."""
    frame = thread_frame(ident)
    if frame is None:
        return ""
    return "Stack of the task's thread when its time ran out:\n" + "".join(
        traceback.format_stack(frame))


def thread_frame(ident: int | None) -> Any:
    """The frame thread *ident* runs now, or None (no such thread)."""
    if ident is None:
        return None
    # CPython before 3.11.9 and 3.12.3 can deadlock the whole process here: the
    # dict sys._current_frames() builds may start a garbage collection while the
    # interpreter's thread-list lock is held, and a finalizer or a thread exiting
    # meanwhile needs that lock (python/cpython#106883, seen in this project's
    # tests with a timeout firing as threads came and went). The fix CPython
    # made: no collection during the call.
    collecting = gc.isenabled()
    if collecting:
        gc.disable()
    try:
        return sys._current_frames().get(ident)
    finally:
        if collecting:
            gc.enable()
