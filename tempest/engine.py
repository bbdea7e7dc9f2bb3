"""Engine: the configure block, submit, and run/start/stop/stats."""

from __future__ import annotations

import json
import math
import threading
from typing import Any, ClassVar

from tempest import config
from tempest.control import Control
from tempest.exceptions import TempestError
from tempest.messages import encode, new_task_id
from tempest.queues.memory import MemoryQueue
from tempest.runtime import Runtime
from tempest.task import Task

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
            config.Option("queue", None, config.queue),
            config.Option("timeout", None, config.seconds_or_none),
            config.Option("log_dir", ".", config.log_dir),
            config.Option("log_level", "INFO", config.log_level),
            config.Option("log_format", "text", config.log_format),
            config.Option("shutdown_timeout", 30.0, config.non_negative_seconds),
            config.Option("report_every", 60.0, config.seconds_or_none),
            config.Option("max_abandoned", 10, config.non_negative_int),
            config.Option("before_initialize", None, config.callable_or_none),
            config.Option("after_initialize", None, config.callable_or_none),
            config.Option("after_success", None, config.callable_or_none),
            config.Option("after_failure", None, config.callable_or_none),
            config.Option("after_timeout", None, config.callable_or_none),
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
        cls._options = options
        cls._state = _EngineState()

    def __init__(self) -> None:
        raise TypeError(
            f"{type(self).__name__} is used through its class: "
            f"{type(self).__name__}.submit(...), {type(self).__name__}.run()"
        )

    # -- producer side -----------------------------------------------------------------

    @classmethod
    def submit(cls, task: type[Task] | str, *args: Any, task_id: str | None = None) -> str:
        """Enqueue a message for *task* with *args*; return its task id.

        *task* is a Task subclass or a task name (a producer need not import
        the task's code). Raises TypeError, enqueuing nothing, if an argument
        is not JSON-serializable or, for a Task class, if ``process`` cannot
        take these arguments. Works whether or not the engine is running.
        """
        if isinstance(task, type) and issubclass(task, Task) and task is not Task:
            name = task.task_name
            try:
                task.check_args(args)
            except TypeError as exc:
                raise TypeError(f"{name}.process{task._signature}: {exc}") from None
        elif isinstance(task, str) and task:
            name = task
        else:
            raise TypeError(f"submit() takes a Task subclass or a task name, not {task!r}")
        if task_id is None:
            task_id = new_task_id()
        elif not isinstance(task_id, str) or not task_id:
            raise TypeError(f"task_id must be a non-empty string, not {task_id!r}")
        # The queue gets the message as JSON would give it back (tuples become
        # lists, dict keys strings), so MemoryQueue behaves like durable queues.
        # Plain scalars come back from JSON as they are: no round trip for them.
        if all(type(arg) in _SCALARS and (type(arg) is not float or math.isfinite(arg))
               for arg in args):
            message: list[Any] = [task_id, name, *args]
        else:
            message = json.loads(encode(task_id, name, args))
        cls._options["queue"].enqueue(message)
        return task_id

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

        Keys: ``processed``, ``succeeded``, ``failed``, ``timed_out``,
        ``rejected`` (bad input), ``running`` (messages a worker has in hand:
        not those taken in a batch for workers still on their way), ``threads``,
        ``abandoned`` (cumulative), ``uptime`` (seconds), and ``queued`` where
        the queue has ``__len__``.
        """
        state = cls._state
        runtime = state.control.runtime if state.control else state.last
        if runtime is None:
            stats: dict[str, Any] = dict.fromkeys(
                ("processed", "succeeded", "failed", "timed_out", "rejected", "running",
                 "abandoned"), 0)
            stats.update(threads=cls._options["threads"], uptime=0.0)
            queue = cls._options["queue"]
            if hasattr(type(queue), "__len__"):
                stats["queued"] = len(queue)
            return stats
        return runtime.stats()

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
            control.discard()
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


class _EngineState:
    """Per engine class: the run in progress, if any, and the last one."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.control: Control | None = None
        self.last: Runtime | None = None
        self.error: BaseException | None = None  # a start()ed run's, for stop()
