"""The exceptions tempest raises.

::

    BaseException
     ├── TaskTimeout            raised inside a task's thread when it outruns its limit
     └── Exception
          └── TempestError      base of the library's own errors
               ├── ConfigurationError   a bad configure block, option or extra
               ├── UnknownTask          a task name that no Task class registered
               ├── TooManyAbandoned     more stuck threads than ``max_abandoned``
               ├── Unsupported          the queue lacks what a call needs (scheduling)
               ├── Retry                raised by a task: run me again later
               └── TaskFailed           result(): the task failed or timed out for good

``TaskTimeout`` derives from ``BaseException`` on purpose: task code that says
``except Exception`` must not swallow the engine's request to stop.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ConfigurationError",
    "Retry",
    "TaskFailed",
    "TaskTimeout",
    "TempestError",
    "TooManyAbandoned",
    "UnknownTask",
    "Unsupported",
]


class TempestError(Exception):
    """Base class of every error that tempest itself raises."""


class ConfigurationError(TempestError):
    """A configure block, an option value or an optional dependency is wrong.

    Raised when the offending class is created, so a typo fails at import time
    and not hours later in production. The message names the option and, for an
    unknown one, the closest valid name.
    """


class UnknownTask(TempestError):
    """No registered Task has the given name."""


class TooManyAbandoned(TempestError):
    """More task threads ignored their timeout than ``max_abandoned`` allows.

    The engine drains and stops so that its supervisor (systemd, a container
    runtime) can start a clean process: threads stuck in C code cannot be
    killed from inside Python.
    """


class Unsupported(TempestError):
    """The configured queue lacks the optional methods a call needs.

    ``submit(..., delay=, at=, priority=)`` on a queue without ``schedule``,
    say. The message names the queue and the methods; nothing was enqueued.
    """


class Retry(TempestError):
    """Raise it in ``process`` to run the task again later: ``raise Retry(delay=5)``.

    It counts against the task's ``retries`` like any failed attempt, whatever
    ``retry_on`` says; *delay* (seconds >= 0) replaces the backoff's delay for
    this retry (None: the backoff decides). With no retries left the attempt
    is a failure like another, and the task goes to the failed store.
    """

    def __init__(self, delay: float | None = None, reason: str = "") -> None:
        if delay is not None:
            if isinstance(delay, bool) or not isinstance(delay, (int, float)):
                raise TypeError(f"Retry(delay=) takes seconds or None, not {delay!r}")
            if not 0 <= delay < float("inf"):
                raise ValueError(f"Retry(delay=) must be a finite number >= 0, not {delay!r}")
            delay = float(delay)
        super().__init__(reason or ("retry asked for" if delay is None
                                    else f"retry asked for in {delay:g}s"))
        self.delay = delay
        self.reason = reason


class TaskFailed(TempestError):
    """``Engine.result()`` / ``Engine.call()``: the task ended in failure or timeout
    after its last attempt.

    Attributes: ``task_id``, ``error_type`` (the exception's class name, or
    ``"TaskTimeout"``), ``error`` (its message), ``traceback`` (text, as the
    worker saw it) and ``attempts`` (how many attempts ran, the last included).
    """

    def __init__(self, task_id: str, error_type: str, error: str, traceback: str = "",
                 attempts: int = 1) -> None:
        plural = "" if attempts == 1 else "s"
        super().__init__(f"task {task_id} failed after {attempts} attempt{plural}: "
                         f"{error_type}: {error}" if error else
                         f"task {task_id} failed after {attempts} attempt{plural}: {error_type}")
        self.task_id = task_id
        self.error_type = error_type
        self.error = error
        self.traceback = traceback
        self.attempts = attempts

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.task_id, self.error_type, self.error, self.traceback,
                             self.attempts))


class TaskTimeout(BaseException):
    """Raised inside a task's thread when ``process`` outruns its timeout.

    A ``BaseException``, so ``except Exception`` in task code does not swallow it.
    """

    def __str__(self) -> str:
        return super().__str__() or "the task outran its timeout"
