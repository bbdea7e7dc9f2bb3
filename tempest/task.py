"""Task: the unit of work, and the registry that maps names to Task classes.

A message names its task by a string. That string is resolved *only* through
the registry filled by defining Task subclasses, so a message can never import
or instantiate anything that is not a registered Task.
"""

from __future__ import annotations

import inspect
import threading
from typing import TYPE_CHECKING, Any, ClassVar

import structlog

from tempest import config, retries
from tempest.exceptions import ConfigurationError, UnknownTask

if TYPE_CHECKING:
    from tempest.engine import Engine
    from tempest.logs import Logs

__all__ = ["Task", "lookup"]


class _Unset:
    """The engine's default timeout applies (distinct from None: no limit)."""

    def __repr__(self) -> str:
        return "<engine default>"


UNSET: Any = _Unset()

_OPTIONS = {
    "name": config.Option("name", None, config.task_name, inherited=False),
    "timeout": config.Option(
        "timeout",
        UNSET,
        lambda v: UNSET if v is UNSET else config.seconds_or_none(v),
    ),
    "priority": config.Option("priority", 0, config.priority),
    # UNSET: the engine's option applies (see tempest.retries).
    "retries": config.Option(
        "retries", UNSET, lambda v: UNSET if v is UNSET else config.non_negative_int(v)),
    "retry_on": config.Option(
        "retry_on", UNSET, lambda v: UNSET if v is UNSET else retries.retry_on(v)),
    "retry_delay": config.Option(
        "retry_delay", UNSET, lambda v: UNSET if v is UNSET else retries.retry_delay(v)),
    "retry_max_delay": config.Option(
        "retry_max_delay", UNSET,
        lambda v: UNSET if v is UNSET else config.non_negative_seconds(v)),
    "keep_failed": config.Option("keep_failed", True, config.boolean),
    # Results (see tempest.results): kept only for tasks and calls that ask.
    "store_result": config.Option("store_result", False, config.boolean),
    "result_ttl": config.Option(
        "result_ttl", UNSET, lambda v: UNSET if v is UNSET else config.positive_seconds(v)),
}

_registry: dict[str, type[Task]] = {}
_registry_lock = threading.Lock()
_kinds = [0, 0]
"""How many registered classes have a plain ``process`` and how many an ``async def`` one."""


def registered_kinds() -> tuple[bool, bool]:
    """(any thread task registered, any coroutine task registered): what may arrive."""
    return _kinds[0] > 0, _kinds[1] > 0


def lookup(name: str) -> type[Task]:
    """Return the Task class registered under *name*, or raise UnknownTask."""
    try:
        return _registry[name]
    except (KeyError, TypeError):
        raise UnknownTask(f"no Task class is registered under the name {name!r}") from None


class Task:
    """Base class of tasks: subclass it and define ``process``.

    Defining a subclass registers it under its name (the class name, or the
    ``name`` option of its configure block). A fresh instance handles each
    message; inside ``process`` and the callbacks these are set:

    - ``self.task_id``: the message's id (a str);
    - ``self.args``: the message's arguments (a tuple);
    - ``self.engine``: the Engine class running the task;
    - ``self.attempt``: which attempt this is, from 1 (see ``retries``);
    - ``self.task_logger``: a structlog logger writing to the task log, every
      line prefixed with the task id.

    ``process`` may be ``async def``: the engine then runs it as a coroutine
    on its event loop instead of a worker thread (see the README, "Coroutine
    tasks"); the callbacks may be ``async def`` too, for either kind.

    Options of the ``class configure:`` block: ``name`` (default: the class
    name), ``timeout`` (seconds, overriding the engine's default; ``None``
    means no limit even where the engine sets one) and ``priority`` (the
    default of ``submit(priority=)`` for this task, an int; default 0).
    ``retries``, ``retry_on``, ``retry_delay`` and ``retry_max_delay``
    override the engine's options of those names (see :mod:`tempest.retries`);
    ``keep_failed = False`` keeps the task's final failures out of the failed
    store (they are logged all the same). ``store_result = True`` keeps the
    return value of each run for ``Engine.result(task_id)``, for
    ``result_ttl`` seconds (default: the engine's, one day); ``Engine.call``
    keeps it whatever the option says.
    """

    task_name: ClassVar[str]
    """The name under which the class is registered and that messages carry."""

    timeout: ClassVar[float | None]
    """Resolved timeout option (UNSET: the engine's default applies)."""

    priority: ClassVar[int]
    """Resolved priority option: the priority its messages get unless submit says."""

    task_id: str
    args: tuple[Any, ...]
    engine: type[Engine]
    attempt: int = 1
    """Which attempt this is: 1, then 2 on the first retry, and so on."""

    _options: ClassVar[dict[str, Any]] = {}
    _is_async: ClassVar[bool] = False
    """``process`` is ``async def``: the engine runs it on its event loop."""
    _signature: ClassVar[inspect.Signature | None] = None
    _arity: ClassVar[tuple[int, float] | None] = None
    _logs: Logs | None = None
    _task_logger: Any = None
    # Set by the engine's supervisor when the attempt timed out (see Runtime._on_timeout).
    _timeout: BaseException | None = None
    _retry_delay: float | None = None
    _stack: str | None = None
    _timed_out_as: tuple[int, float] = (0, 0.0)  # the outcome counted once it is settled

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        block = cls.__dict__.get("configure")
        options = config.read_block(cls.__qualname__, block, _OPTIONS, cls._options)
        cls._options = options
        cls.task_name = options["name"] or cls.__name__
        cls.timeout = options["timeout"]
        cls.priority = options["priority"]
        cls._is_async = inspect.iscoroutinefunction(cls.process)
        try:
            cls._signature = inspect.signature(cls.process)
        except (TypeError, ValueError):  # a builtin without a signature: accept anything
            cls._signature = None
        cls._arity = _arity(cls._signature)
        _register(cls)

    @property
    def task_logger(self) -> Any:
        """A structlog logger bound to this task's id, writing to the task log.

        Outside a running engine (a unit test calling ``process`` directly) it
        is structlog's default logger with the same ``task_id`` binding.
        """
        if self._task_logger is None:
            task_id = getattr(self, "task_id", None)
            if self._logs is not None:
                self._task_logger = self._logs.task_logger(task_id)
            else:
                self._task_logger = structlog.get_logger("tempest.task").bind(
                    task_id=task_id
                )
        return self._task_logger

    @classmethod
    def check_args(cls, args: tuple[Any, ...]) -> None:
        """Raise TypeError if ``process`` cannot be called with *args*."""
        arity = cls._arity
        if arity is not None and arity[0] <= len(args) <= arity[1]:
            return  # the common case, without Signature.bind's cost
        if cls._signature is not None:
            cls._signature.bind(None, *args)

    def process(self, *args: Any) -> Any:
        """Do the work. Called with the message's arguments; return a result."""
        raise NotImplementedError(f"{type(self).__name__} must define process()")

    def after_success(self, result: Any) -> None:
        """Called after ``process`` returned *result*. Does nothing by default."""

    def after_failure(self, exc: BaseException) -> None:
        """Called after ``process`` raised *exc*. Does nothing by default."""

    def after_timeout(self) -> None:
        """Called after ``process`` outran its timeout. Does nothing by default."""

    def after_retry(self, exc: BaseException, delay: float) -> None:
        """Called when this attempt failed (*exc*; a TaskTimeout for a timeout) and
        another is scheduled in *delay* seconds. Does nothing by default.

        ``after_failure`` and ``after_timeout`` run only for the final attempt.
        """


def _arity(signature: inspect.Signature | None) -> tuple[int, float] | None:
    """(fewest, most) positional arguments ``process`` takes after self.

    None where a quick count cannot decide (keyword-only parameters without
    defaults): then Signature.bind decides.
    """
    if signature is None:
        return None
    params = list(signature.parameters.values())[1:]  # drop self
    low, high = 0, 0.0
    for p in params:
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            high += 1
            if p.default is p.empty:
                low += 1
        elif p.kind is p.VAR_POSITIONAL:
            high = float("inf")
        elif p.kind is p.KEYWORD_ONLY and p.default is p.empty:
            return None
    return low, high


def _register(cls: type[Task]) -> None:
    name = cls.task_name
    with _registry_lock:
        existing = _registry.get(name)
        # Re-running a class statement (a module reloaded, or the same test
        # defining its task twice) replaces the entry; a *different* class
        # claiming the name is a configuration error.
        if existing is not None and (
            existing.__module__,
            existing.__qualname__,
        ) != (cls.__module__, cls.__qualname__):
            raise ConfigurationError(
                f"two Task classes are named {name!r}: "
                f"{existing.__module__}.{existing.__qualname__} and "
                f"{cls.__module__}.{cls.__qualname__}; give one of them "
                f"another name (class configure: name = '...')"
            )
        if existing is not None:
            _kinds[existing._is_async] -= 1
        _kinds[cls._is_async] += 1
        _registry[name] = cls
