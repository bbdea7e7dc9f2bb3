"""Engine: the configure block, submit, and run/start/stop/stats."""

from __future__ import annotations

import datetime
import functools
import json
import math
import threading
import time
from typing import Any, ClassVar

from tempest import config, periodic, results, retries
from tempest.control import Control
from tempest.exceptions import ConfigurationError, TempestError, Unsupported
from tempest.messages import encode, new_task_id
from tempest.queues import protocol
from tempest.queues.memory import MemoryQueue
from tempest.runtime import Runtime, queue_counts
from tempest.task import UNSET, Task

__all__ = ["Engine"]

_SCALARS = frozenset({str, int, float, bool, type(None)})
"""Argument types that JSON gives back unchanged (floats: finite ones)."""


class Engine:
    """Base class of engines: subclass it and give it a ``class configure:`` block.

    ::

        class MathTempest(Engine):
            class configure:
                threads = 2
                queue = MemoryQueue()

    Every method is a class method: an engine class *is* the engine, so
    ``MathTempest.submit(...)`` works anywhere the class can be imported.
    Options: see ``Engine._OPTIONS`` and the README.
    """

    _OPTIONS: ClassVar[dict[str, config.Option]] = {
        o.name: o
        for o in (
            config.Option("name", None, config.name, inherited=False),
            config.Option("threads", 10, config.positive_int),
            config.Option("coroutines", 100, config.positive_int),
            config.Option("prefetch", 0, config.non_negative_int),
            config.Option("loop_block_warning", 0.1, config.positive_seconds),
            config.Option("queue", None, config.queue),
            config.Option("timeout", None, config.seconds_or_none),
            config.Option("log_dir", ".", config.log_dir),
            config.Option("log_level", "INFO", config.log_level),
            config.Option("log_format", "text", config.log_format),
            config.Option("shutdown_timeout", 30.0, config.non_negative_seconds),
            config.Option("report_every", 60.0, config.seconds_or_none),
            config.Option("announce_every", 5.0, config.seconds_or_none),
            config.Option("metrics_port", None, config.port_or_none),
            config.Option("metrics_host", "127.0.0.1", config.host),
            config.Option("max_abandoned", 10, config.non_negative_int),
            config.Option("before_initialize", None, config.callable_or_none),
            config.Option("after_initialize", None, config.callable_or_none),
            config.Option("after_success", None, config.callable_or_none),
            config.Option("after_failure", None, config.callable_or_none),
            config.Option("after_timeout", None, config.callable_or_none),
            config.Option("after_retry", None, config.callable_or_none),
            config.Option("retries", 0, config.non_negative_int),
            config.Option("retry_on", None, retries.retry_on),
            config.Option("retry_delay", 1.0, retries.retry_delay),
            config.Option("retry_max_delay", 3600.0, config.non_negative_seconds),
            config.Option("failed_max", 10_000, config.positive_int),
            config.Option("failed_ttl", 30 * 86400.0, config.positive_seconds),
            config.Option("periodic", (), config.periodic),
            config.Option("result_ttl", 86400.0, config.positive_seconds),
        )
    }

    _options: ClassVar[dict[str, Any]] = {}
    _own_queue: ClassVar[bool] = False
    _state: ClassVar[_EngineState]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        block = cls.__dict__.get("configure")
        options = config.read_block(cls.__qualname__, block, cls._OPTIONS, cls._options)
        options["name"] = options["name"] or cls.__name__
        # A queue set in a configure block (here or in a parent) is shared by
        # subclasses; a class that sets none gets a MemoryQueue of its own.
        sets_queue = block is not None and "queue" in vars(block)
        if not sets_queue and (options["queue"] is None or cls._own_queue):
            options["queue"] = MemoryQueue()
            cls._own_queue = True
        else:
            cls._own_queue = False
        lacking = periodic.missing_methods(options["queue"]) if options["periodic"] else []
        if lacking:
            raise ConfigurationError(
                f"{cls.__qualname__}.configure.periodic: the queue "
                f"{type(options['queue']).__name__} has no "
                f"{' or '.join(name + '()' for name in lacking)} method, "
                f"so engines sharing it cannot fire each slot once; use a built-in queue, or "
                f"add fire() and last_fired() to yours (see tempest.queues.protocol)")
        cls._options = options
        cls._state = _EngineState()

    def __init__(self) -> None:
        raise TypeError(
            f"{type(self).__name__} is used through its class: "
            f"{type(self).__name__}.submit(...), {type(self).__name__}.run()"
        )

    # -- producer side -----------------------------------------------------------------

    @classmethod
    def submit(cls, task: type[Task] | str, *args: Any, task_id: str | None = None,
               delay: float | datetime.timedelta | None = None,
               at: float | datetime.datetime | None = None,
               priority: int | None = None) -> str:
        """Enqueue a message for *task* with *args*; return its task id.

        *task* is a Task subclass or a task name (a producer need not import
        the task's code). Raises TypeError, enqueuing nothing, if an argument
        is not JSON-serializable or, for a Task class, if ``process`` cannot
        take these arguments. Works whether or not the engine is running.

        *delay* (seconds, or a ``datetime.timedelta``) or *at* (a timezone-aware
        ``datetime``, or a POSIX timestamp) holds the message in the queue until
        then (a time in the past: now); *priority* (an int, higher first; default
        the task's ``priority`` option, 0) orders it among ready messages. These
        need a queue with ``schedule`` (every built-in one): on another,
        ``tempest.Unsupported``. A bad value raises TypeError or ValueError
        naming the argument; nothing is enqueued.
        """
        return cls._submit(task, args, task_id=task_id, delay=delay, at=at, priority=priority,
                           result_ttl=None)

    @classmethod
    async def asubmit(cls, task: type[Task] | str, *args: Any, task_id: str | None = None,
                      delay: float | datetime.timedelta | None = None,
                      at: float | datetime.datetime | None = None,
                      priority: int | None = None) -> str:
        """``submit()`` for a coroutine: the enqueue runs in a thread (of the pool
        ``aresult`` uses), so a queue's round trip never blocks the event loop."""
        return await results.in_thread(functools.partial(
            cls._submit, task, args, task_id=task_id, delay=delay, at=at, priority=priority,
            result_ttl=None))

    @classmethod
    def _submit(cls, task: type[Task] | str, args: tuple[Any, ...], *, task_id: str | None,
                delay: float | datetime.timedelta | None,
                at: float | datetime.datetime | None, priority: int | None,
                result_ttl: float | None) -> str:
        """submit(), asking for the result to be kept *result_ttl* seconds unless None."""
        if isinstance(task, type) and issubclass(task, Task) and task is not Task:
            name = task.task_name
            try:
                task.check_args(args)
            except TypeError as exc:
                raise TypeError(f"{name}.process{task._signature}: {exc}") from None
            default_priority = task.priority
        elif isinstance(task, str) and task:
            name = task
            default_priority = 0
        else:
            raise TypeError(f"submit() takes a Task subclass or a task name, not {task!r}")
        if task_id is None:
            task_id = new_task_id()
        elif not isinstance(task_id, str) or not task_id:
            raise TypeError(f"task_id must be a non-empty string, not {task_id!r}")
        when = None if delay is None and at is None else _when(delay, at)
        if priority is not None:
            priority = protocol.priority(priority)
        elif default_priority:
            priority = default_priority
        # The queue gets the message as JSON would give it back (tuples become
        # lists, dict keys strings), so MemoryQueue behaves like durable queues.
        # Plain scalars come back from JSON as they are: no round trip for them.
        if all(type(arg) in _SCALARS and (type(arg) is not float or math.isfinite(arg))
               for arg in args):
            message: list[Any] = [task_id, name, *args]
        else:
            message = json.loads(encode(task_id, name, args))
        queue = cls._options["queue"]
        if when is None and priority is None and result_ttl is None:
            queue.enqueue(message)
            return task_id
        schedule = getattr(queue, "schedule", None)
        if not callable(schedule):
            asked = ", ".join(f"{key}=" for key, value in
                              (("delay", delay), ("at", at), ("priority", priority))
                              if value is not None)
            raise Unsupported(
                f"{cls.__name__}.submit({asked}...): the queue {type(queue).__name__} has "
                f"no schedule() method, so it cannot hold a message until a time or order "
                f"it by priority; nothing was enqueued. Use a built-in queue, or add "
                f"schedule() and scheduled_count() to yours (see tempest.queues.protocol)")
        options: dict[str, Any] = {} if result_ttl is None else {"result_ttl": result_ttl}
        schedule(message, delay=when[0] if when else None, at=when[1] if when else None,
                 priority=priority or 0, **options)
        return task_id

    # -- results -------------------------------------------------------------------------

    @classmethod
    def result(cls, task_id: str, timeout: float | None = None) -> Any:
        """The return value of task *task_id* once it succeeded (as JSON gives it back).

        Waits up to *timeout* seconds (None: no limit; 0: looks once) and
        raises the builtin ``TimeoutError`` if no result came by then -- the
        task has not finished, its result expired (``result_ttl``), or none
        was asked for (``store_result``, ``call``). Raises
        ``tempest.TaskFailed`` if the task ended in failure or timeout after
        its last attempt. Any process that reaches the queue may ask, any
        number of times until the result expires.
        """
        queue = cls._options["queue"]
        results.require(cls.__name__, queue, "result()")
        return results.wait(queue, _task_id(task_id), results.check_timeout(timeout))

    @classmethod
    def call(cls, task: type[Task] | str, *args: Any, timeout: float | None = None,
             **submit_options: Any) -> Any:
        """Submit *task* with *args* and wait for its result: ``submit``, then ``result``.

        A synchronous call through the queue: whichever engine takes the
        message runs it (another process or machine on a shared queue) and its
        return value comes back here. *submit_options* are ``submit``'s
        (``task_id``, ``delay``, ``at``, ``priority``); *timeout* bounds the
        wait, from the submit on (TimeoutError: the task may still run later).
        The result is kept ``result_ttl`` seconds (the task's option, else the
        engine's), whatever ``store_result`` says.
        """
        return results.wait(cls._options["queue"], *cls._call(task, args, timeout,
                                                              submit_options))

    @classmethod
    async def aresult(cls, task_id: str, timeout: float | None = None) -> Any:
        """``result()`` for a coroutine: awaits without blocking the event loop.

        The wait runs in a thread of a pool shared by all awaiting calls (64
        threads; more waiters take their turn), in slices of at most a second,
        so cancelling the awaiting task frees its thread within a second.
        """
        queue = cls._options["queue"]
        results.require(cls.__name__, queue, "aresult()")
        return await results.await_result(queue, _task_id(task_id),
                                          results.check_timeout(timeout))

    @classmethod
    async def acall(cls, task: type[Task] | str, *args: Any, timeout: float | None = None,
                    **submit_options: Any) -> Any:
        """``call()`` for a coroutine: the submit and the wait run in threads (see
        ``aresult``), so neither blocks the event loop."""
        task_id, wait = await results.in_thread(cls._call, task, args, timeout,
                                                submit_options)
        return await results.await_result(cls._options["queue"], task_id, wait)

    @classmethod
    def _call(cls, task: type[Task] | str, args: tuple[Any, ...], timeout: object,
              submit_options: dict[str, Any]) -> tuple[str, float | None]:
        """call()'s submit: (task id, seconds left to wait)."""
        wait = results.check_timeout(timeout)
        queue = cls._options["queue"]
        results.require(cls.__name__, queue, "call()")
        unknown = set(submit_options) - {"task_id", "delay", "at", "priority"}
        if unknown:
            raise TypeError(f"{cls.__name__}.call() got unexpected keyword argument(s) "
                            f"{', '.join(sorted(unknown))}")
        ttl = cls._options["result_ttl"]
        if isinstance(task, type) and issubclass(task, Task):
            own = task._options.get("result_ttl", UNSET)
            ttl = ttl if own is UNSET else own
        began = time.monotonic()
        task_id = cls._submit(task, args, task_id=submit_options.get("task_id"),
                              delay=submit_options.get("delay"), at=submit_options.get("at"),
                              priority=submit_options.get("priority"), result_ttl=ttl)
        return task_id, None if wait is None else max(0.0, wait - (time.monotonic() - began))

    # -- running -----------------------------------------------------------------------

    @classmethod
    def run(cls, burst: bool = False) -> None:
        """Run the engine in the calling thread until it is stopped.

        SIGTERM and SIGINT stop it gracefully (a second SIGINT at once) and
        SIGHUP reopens the log files; these handlers are installed only when
        run() is called in the main thread, and restored when it returns.
        With ``burst=True`` it returns once the queue is empty and no task runs.
        Raises TooManyAbandoned, after draining, past ``max_abandoned``.
        """
        cls._run(burst=burst)

    @classmethod
    def _run(cls, burst: bool = False, overrides: dict[str, Any] | None = None) -> None:
        """run(), with option *overrides* (the command line's --threads, ...)."""
        control = cls._begin(burst, overrides)
        try:
            control.loop(signals=threading.current_thread() is threading.main_thread())
        finally:
            cls._end(control)
        if control.runtime.error is not None:
            raise control.runtime.error

    @classmethod
    def start(cls, burst: bool = False) -> None:
        """Run the engine in background threads and return at once.

        For embedding in a web application or a test. Installs no signal
        handlers. Stop it with :meth:`stop`.
        """
        control = cls._begin(burst, None)

        def loop() -> None:
            try:
                control.loop(signals=False)
            finally:
                cls._end(control, keep_error=True)

        thread = threading.Thread(target=loop, name=f"tempest-engine:{control.runtime.name}",
                                  daemon=True)
        control.thread = thread
        thread.start()

    @classmethod
    def stop(cls, wait: bool = True, timeout: float | None = None) -> bool:
        """Stop the engine gracefully, from any thread; True once it has stopped.

        *timeout* bounds the wait in seconds. Called from inside a task, it
        only requests the stop (a task cannot wait for itself to end). For an
        engine started with start(), raises TooManyAbandoned if it stopped
        because of abandoned threads (run() raises it itself).
        """
        state = cls._state
        with state.lock:
            control = state.control
        if control is not None:
            control.runtime.request_stop("stop() called")
            if not wait or control.cannot_wait():
                return control.stopped.is_set()
            if not control.stopped.wait(timeout):
                return False
            # Forget the run here rather than wait for the loop's own thread to:
            # once stop() returns, start() may be called again at once.
            cls._end(control, keep_error=control.thread is not None)
        with state.lock:
            error, state.error = state.error, None
        if error is not None:
            raise error
        return True

    @classmethod
    def stats(cls) -> dict[str, Any]:
        """Counters of the running engine, or of its last run.

        Keys: ``processed`` (attempts that ended), ``succeeded``, ``failed`` and
        ``timed_out`` (final attempts), ``retried`` (attempts that failed or
        timed out with another one scheduled), ``rejected`` (bad input),
        ``running`` (messages a worker or a coroutine has in hand: not those
        taken in a batch for workers still on their way), ``prefetched``
        (messages held ahead of a free worker: see the ``prefetch`` option),
        ``threads``,
        ``abandoned`` (cumulative), ``coroutines`` (the option),
        ``swallowed`` (coroutines that swallowed their timeout), ``loop_blocked``
        (spells in which a coroutine blocked the event loop), ``failed_dropped``
        (failed-store entries this run's failures pushed out past ``failed_max``
        or ``failed_ttl``), ``uptime``
        (seconds); ``queued`` (ready messages) where the queue has ``__len__``,
        ``scheduled`` (messages waiting for their time) where it has
        ``scheduled_count``, ``failed_stored`` (failed-store entries) where it
        has ``failed_count``.
        """
        state = cls._state
        runtime = state.control.runtime if state.control else state.last
        if runtime is None:
            stats: dict[str, Any] = dict.fromkeys(
                ("processed", "succeeded", "failed", "timed_out", "rejected", "running",
                 "prefetched", "abandoned", "retried", "failed_dropped"), 0)
            stats.update(threads=cls._options["threads"], uptime=0.0,
                         coroutines=cls._options["coroutines"], swallowed=0, loop_blocked=0)
            stats.update(queue_counts(cls._options["queue"]))
            return stats
        return runtime.stats()

    @classmethod
    def _current_runtime(cls) -> Runtime | None:
        """The run in progress in this process, or None."""
        control = cls._state.control
        return control.runtime if control is not None else None

    # -- the failed store ----------------------------------------------------------------

    @classmethod
    def failed(cls, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """Entries of the queue's failed store, the latest failure first.

        Each is a dict: ``task_id``, ``task``, ``args``, ``attempts``,
        ``error_type``, ``error``, ``traceback``, ``first_failed_at``,
        ``last_failed_at``, ``expires_at`` (POSIX seconds) and ``priority``.
        """
        for name, value in (("limit", limit), ("offset", offset)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, not {value!r}")
        return cls._store("failed")(limit=limit, offset=offset)  # type: ignore[no-any-return]

    @classmethod
    def failed_count(cls) -> int:
        """How many entries the failed store holds."""
        return cls._store("failed_count")()  # type: ignore[no-any-return]

    @classmethod
    def failed_task(cls, task_id: str) -> dict[str, Any]:
        """The failed-store entry of *task_id* (see :meth:`failed`); KeyError if none."""
        entry = cls._store("find_failed")(_task_id(task_id))
        if entry is None:
            raise KeyError(f"no failed task {task_id!r} in the failed store")
        return entry  # type: ignore[no-any-return]

    @classmethod
    def retry_failed(cls, task_id: str) -> None:
        """Run a failed task again: enqueued now, same id, attempts counted from 1.

        KeyError if the failed store has no entry for *task_id*.
        """
        if not cls._store("retry_failed")(_task_id(task_id)):
            raise KeyError(f"no failed task {task_id!r} in the failed store")

    @classmethod
    def retry_failed_all(cls) -> int:
        """Run every failed task again (see :meth:`retry_failed`); return how many."""
        return cls._store("retry_failed_all")()  # type: ignore[no-any-return]

    @classmethod
    def delete_failed(cls, task_id: str) -> None:
        """Forget a failed task; KeyError if the failed store has no entry for it."""
        if not cls._store("delete_failed")(_task_id(task_id)):
            raise KeyError(f"no failed task {task_id!r} in the failed store")

    @classmethod
    def purge_failed(cls) -> int:
        """Forget every failed task; return how many."""
        return cls._store("purge_failed")()  # type: ignore[no-any-return]

    @classmethod
    def _store(cls, method: str) -> Any:
        """The queue's failed-store *method*; Unsupported where the queue lacks it."""
        queue = cls._options["queue"]
        found = getattr(queue, method, None)
        if not callable(found):
            raise Unsupported(
                f"{cls.__name__}.{method}(): the queue {type(queue).__name__} has no "
                f"{method}() method, so it keeps no failed tasks. Use a built-in queue, or "
                f"add the failed-store methods to yours (see tempest.queues.protocol)")
        return found

    # -- lifecycle ---------------------------------------------------------------------

    @classmethod
    def _begin(cls, burst: bool, overrides: dict[str, Any] | None) -> Control:
        state = cls._state
        with state.lock:
            if state.control is not None:
                raise TempestError(f"{cls.__name__} is already running")
            runtime = Runtime(cls, burst=burst, overrides=overrides)
            control = Control(runtime, report_every=runtime.options["report_every"])
            state.control = control
        control.holding.add(threading.current_thread())  # after_initialize may call stop()
        try:
            runtime.start()
        except BaseException:
            control.discard()  # the gate opened: workers already started see the stop
            if runtime.half_started:
                runtime.abort()
            with state.lock:
                state.control = None
            raise
        finally:
            control.holding.discard(threading.current_thread())
        return control

    @classmethod
    def _end(cls, control: Control, keep_error: bool = False) -> None:
        """Forget a finished run, keeping its stats (and, for start(), its error)."""
        state = cls._state
        with state.lock:
            if state.control is control:
                state.control = None
                state.last = control.runtime
                if keep_error and control.runtime.error is not None:
                    state.error = control.runtime.error


def _task_id(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(f"a task id is a non-empty string, not {value!r}")
    return value


def _when(delay: object, at: object) -> tuple[float | None, float | None]:
    """submit()'s *delay* and *at*, checked: (seconds from now, None) or (None, timestamp)."""
    if delay is not None and at is not None:
        raise ValueError("submit() takes delay= or at=, not both")
    if delay is not None:
        if isinstance(delay, datetime.timedelta):
            seconds = delay.total_seconds()
        elif isinstance(delay, bool) or not isinstance(delay, (int, float)):
            raise TypeError(f"delay must be a number of seconds or a datetime.timedelta, "
                            f"not {delay!r}")
        else:
            seconds = float(delay)
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"delay must be a finite number of seconds >= 0, not {delay!r}")
        return seconds, None
    if isinstance(at, datetime.datetime):
        if at.utcoffset() is None:
            raise ValueError(f"at must be a timezone-aware datetime (naive datetimes are "
                             f"ambiguous across machines), not {at!r}; e.g. "
                             f"datetime.now(timezone.utc)")
        return None, at.timestamp()
    if isinstance(at, bool) or not isinstance(at, (int, float)):
        raise TypeError(f"at must be a timezone-aware datetime or a POSIX timestamp, "
                        f"not {at!r}")
    if not math.isfinite(at):
        raise ValueError(f"at must be a finite POSIX timestamp, not {at!r}")
    return None, float(at)


class _EngineState:
    """Per engine class: the run in progress, if any, and the last one."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.control: Control | None = None
        self.last: Runtime | None = None
        self.error: BaseException | None = None  # a start()ed run's, for stop()
