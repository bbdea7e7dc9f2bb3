"""Coroutine tasks: the engine's event loop, and how a coroutine's run ends.

A Task whose ``process`` is ``async def`` runs here, as an asyncio task on an
event loop that the engine owns, in a thread of its own (``tempest-loop``),
never on a worker thread. Up to ``coroutines`` of them run at once.

The path of a message
---------------------
The dispatching worker (the leader, see :mod:`tempest.runtime`) dequeues only
while a coroutine slot is free, takes one slot per coroutine message at once
and hands the messages to the loop (:meth:`Coroutines.start`). On the loop
each becomes an asyncio task running :meth:`Coroutines._drive`: it awaits
``process`` and, once that ended, hands the outcome to a *settler* thread,
which runs exactly what a worker thread runs after its ``process``: the
outcome line, the callbacks, the result, then ``ack``/``retry``/``fail``. The
slot is freed only after that, so no more than ``coroutines`` messages are
ever held in any state, and settling (blocking queue calls) never runs on the
loop. Async callbacks are awaited on the loop by the settler thread, which
waits for them.

Who decides a run's outcome
---------------------------
As with threads (:mod:`tempest.pool`), each run is claimed once, under
``Coroutines._lock``: by ``_drive`` when ``process`` ended (WORKER), by the
deadline timer (TIMEOUT), by the engine's stop (INTERRUPTED). A timeout
cancels the asyncio task: at the await where the coroutine is suspended it
sees :class:`~tempest.TaskTimeout` (the cancellation is turned into it by
:class:`_Guarded`, and the task uncancelled), so ``except TaskTimeout``
cleans up as in a thread task. If the coroutine ends any other way than by
letting that TaskTimeout out -- it returned, or raised something else -- it
*swallowed* its timeout: logged as a warning and counted (``swallowed`` in
stats); the outcome stays the timeout. One still running ``grace`` seconds
after its deadline is left to run on, detached: counted as swallowed, its
outcome settled, its slot freed.

Where a message can be lost or run twice
----------------------------------------
As for threads: the message is settled after the outcome is logged and the
callbacks ran, so a crash (kill -9) before that leaves it with the queue,
which delivers it again (at-least-once queues). A coroutine still running
when the drain ends is interrupted: claimed, its message given back
(``requeue``), then cancelled; it may have done part of its work, so it can
run twice. A detached coroutine's message is settled as timed out: whatever
it still does later is not a new outcome.

The loop is watched from outside
--------------------------------
A callback on the loop notes the time every ``loop_block_warning / 2``
seconds; a watcher thread checks it. When the loop has not come back for
``loop_block_warning`` seconds, a coroutine is holding it (blocking code
inside ``async def``): the watcher names the asyncio task the loop runs, its
task id and the line it is at, in one WARNING of the main log per blocking
spell, and counts it (``loop_blocked``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Generator
from logging import DEBUG, WARNING
from typing import TYPE_CHECKING, Any

from tempest.exceptions import TaskTimeout
from tempest.logs import task_scope
from tempest.retries import thread_frame

if TYPE_CHECKING:
    from tempest.runtime import Runtime
    from tempest.task import Task

__all__ = ["Coroutines", "is_awaitable"]

WORKER, TIMEOUT, DETACHED, INTERRUPTED = "worker", "timeout", "detached", "interrupted"

SETTLERS = 8
"""Settler threads at most: enough for the queues' acks to share round trips."""

STOP_WAIT = 5.0
"""Seconds close() waits for the loop to end the cancelled coroutines and stop."""


def is_awaitable(value: Any) -> bool:
    """Whether a callback's return value is to be awaited (it was ``async def``)."""
    return inspect.isawaitable(value)


class _Run:
    """One coroutine message on the loop: its task, its claim, its timers."""

    __slots__ = (
        "atask",
        "claim",
        "delivered",
        "limit",
        "message",
        "started",
        "task",
        "timeout",
        "timers",
    )

    def __init__(self, task: Task, message: Any, limit: float | None) -> None:
        self.task = task
        self.message = message
        self.atask: asyncio.Task[None] | None = None
        self.claim: str | None = None
        self.started = time.monotonic()
        self.limit = limit
        self.timeout: TaskTimeout | None = None
        """The TaskTimeout thrown into the coroutine, once its deadline passed."""
        self.delivered = False
        """The cancellation for the timeout is on its way to the coroutine."""
        self.timers: list[asyncio.TimerHandle] = []


class _Guarded:
    """Await *coro* as ``await coro`` would, but turn the engine's timeout into TaskTimeout.

    The asyncio task can only be cancelled (CancelledError at the coroutine's
    await); this passes every step through unchanged, except that a
    cancellation the deadline asked for is thrown into the coroutine as the
    run's TaskTimeout instead, and the task uncancelled, so asyncio's own
    bookkeeping (``asyncio.timeout``, task groups inside the task) stays right.
    """

    __slots__ = ("coro", "run")

    def __init__(self, coro: Any, run: _Run) -> None:
        self.coro = coro
        self.run = run

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, run = self.coro, self.run
        send, throw = coro.send, coro.throw
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                step = send(value) if error is None else throw(error)
            except StopIteration as stop:
                return stop.value
            try:
                value = yield step
                error = None
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # noqa: BLE001 - handed to the coroutine
                value, error = None, exc
                if run.delivered and isinstance(exc, asyncio.CancelledError):
                    run.delivered = False
                    # Python 3.11 counts cancellations (uncancel); 3.10 does not.
                    uncancel = getattr(asyncio.current_task(), "uncancel", None)
                    if uncancel is not None:
                        uncancel()
                    error = run.timeout


class Coroutines:
    """The engine's event loop thread, its coroutine slots and its settler threads."""

    def __init__(self, runtime: Runtime, limit: int, block_warning: float,
                 grace: float) -> None:
        self.runtime = runtime
        self.limit = limit
        self.block_warning = block_warning
        self.grace = grace
        self.busy = 0
        """Slots taken: from the hand-off to the loop until the message is settled."""
        self.swallowed = 0
        self.loop_blocked = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._free = threading.Condition(self._lock)
        self._runs: set[_Run] = set()
        """Runs handed to the loop and not yet claimed for good (started or not)."""
        self._settlers: concurrent.futures.ThreadPoolExecutor | None = None
        self._beat = 0.0
        self._closing = threading.Event()
        self._watcher: threading.Thread | None = None

    # -- life cycle -----------------------------------------------------------------

    def ensure_started(self) -> asyncio.AbstractEventLoop:
        """Start the loop thread, its watcher and the settlers (once); the loop.

        RuntimeError once the engine is closing and no loop was ever started.
        """
        with self._lock:
            if self.loop is None:
                if self._closing.is_set():
                    raise RuntimeError("the engine is stopping: no event loop any more")
                name = self.runtime.name
                loop = asyncio.new_event_loop()
                ready = threading.Event()
                self.thread = threading.Thread(target=self._run_loop, args=(loop, ready),
                                               daemon=True, name=f"tempest-loop:{name}")
                self.thread.start()
                ready.wait()
                self._settlers = concurrent.futures.ThreadPoolExecutor(
                    max_workers=min(self.limit, SETTLERS),
                    thread_name_prefix=f"tempest-settle:{name}")
                self._beat = time.monotonic()
                self._watcher = threading.Thread(target=self._watch, daemon=True,
                                                 name=f"tempest-loop-watch:{name}")
                self._watcher.start()
                self.loop = loop
            return self.loop

    def _run_loop(self, loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        loop.call_soon(self._tick)
        try:
            loop.run_forever()
        finally:
            loop.close()

    def owns(self, thread: threading.Thread) -> bool:
        """Whether *thread* is the loop's or a settler (a stop from it cannot wait)."""
        return thread is self.thread or thread.name.startswith("tempest-settle:")

    def close(self) -> None:
        """End of the drain: interrupt what still runs, stop the loop and the threads."""
        with self._lock:
            self._closing.set()  # start() hands over nothing from now on
            runs = list(self._runs)
            loop = self.loop
        if loop is None:
            return
        for run in runs:
            self._interrupt(run)
        stopped = threading.Event()

        def stop() -> None:
            # Let the cancelled coroutines unwind, then stop the loop.
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            if not pending:
                loop.stop()
                stopped.set()
                return
            waiter = asyncio.ensure_future(asyncio.wait(pending, timeout=STOP_WAIT / 2))

            def done(_: Any) -> None:
                loop.stop()
                stopped.set()

            waiter.add_done_callback(done)

        try:
            loop.call_soon_threadsafe(stop)
        except RuntimeError:  # closed already
            pass
        if not stopped.wait(STOP_WAIT):
            self.runtime.logs.always.warning(
                "event loop did not stop", waited=STOP_WAIT,
                where=_where(self.thread.ident if self.thread else None))
        if self._settlers is not None:
            self._settlers.shutdown(wait=False)
        if self._watcher is not None:
            self._watcher.join(1.0)

    # -- slots ----------------------------------------------------------------------

    def free(self) -> int:
        """Slots free right now."""
        return self.limit - self.busy

    def wait_free(self, timeout: float) -> bool:
        """Wait up to *timeout* seconds for a free slot; whether there is one."""
        with self._free:
            if self.busy < self.limit:
                return True
            self._free.wait(timeout)
            return self.busy < self.limit

    def _release(self) -> None:
        with self._free:
            self.busy -= 1
            self._free.notify()
        self.runtime.room_opened()
        if self.runtime.stopping:
            self.runtime.wake()

    # -- running --------------------------------------------------------------------

    def start(self, items: list[tuple[Task, Any, float | None]]) -> bool:
        """Run each (task, message, timeout) as a coroutine; a slot each, taken now.

        False, taking nothing, once the engine is closing: the caller gives the
        messages back.
        """
        if self._closing.is_set():
            return False
        loop = self.ensure_started()
        runs = [_Run(task, message, limit) for task, message, limit in items]
        with self._lock:
            # Under the lock: close() either sees these runs (and interrupts
            # them, started or not) or has shut the door before them.
            if self._closing.is_set():
                return False
            self.busy += len(runs)
            self._runs.update(runs)
            loop.call_soon_threadsafe(self._start_all, runs)
        return True

    def _start_all(self, runs: list[_Run]) -> None:
        loop = asyncio.get_running_loop()
        for run in runs:
            with self._lock:
                if run.claim is not None:  # interrupted before it could start
                    continue
                run.atask = loop.create_task(self._drive(run))

    async def _drive(self, run: _Run) -> None:
        """The asyncio task of one message: await process, then hand the outcome on."""
        runtime, task = self.runtime, run.task
        task_scope(runtime.logs, task.task_id)  # this asyncio task's own context
        if runtime.logs.level <= DEBUG:
            task.task_logger.debug("started", task=task.task_name, args=list(task.args),
                                   attempt=task.attempt)
        loop = asyncio.get_running_loop()
        run.started = time.monotonic()
        if run.limit is not None:
            run.timers.append(loop.call_later(run.limit, self._expire, run))
        result: Any = None
        error: BaseException | None = None
        try:
            task.__init__()  # type: ignore[misc]  # deliberately after task_id is set
            result = await _Guarded(task.process(*task.args), run)
        except BaseException as exc:  # noqa: BLE001 - every outcome is reported
            error = exc
        duration = time.monotonic() - run.started
        for timer in run.timers:
            timer.cancel()
        with self._lock:
            claim = run.claim
            if claim is None:
                run.claim = WORKER
            elif claim == TIMEOUT:
                run.claim = DETACHED  # settled below: the grace timer has nothing to do
            self._runs.discard(run)
        if claim is None:
            self._settle(runtime._finish, task, run.message, result, error, duration)
        elif claim == TIMEOUT:
            if error is not run.timeout:
                self._swallowed(run, ended=True)
            self._settle(runtime._after_timeout, task, run.message)
        elif claim == DETACHED:
            runtime.logs.main.info("detached coroutine ended", task_id=task.task_id,
                                   task=task.task_name, duration=round(duration, 6))

    def _settle(self, settle: Callable[..., None], task: Task, *args: Any) -> None:
        """Run *settle* in a settler thread, in the task's log scope; then free the slot."""

        def run() -> None:
            task_scope(self.runtime.logs, task.task_id)
            try:
                settle(task, *args)
            except BaseException as exc:  # noqa: BLE001 - a bug of ours must not pass silently
                self.runtime.logs.always.critical("settling crashed", task_id=task.task_id,
                                                  error=repr(exc), exc_info=exc)
            finally:
                task_scope(None)
                self._release()

        assert self._settlers is not None
        try:
            self._settlers.submit(run)
        except RuntimeError:  # shut down (the engine is closing): settle right here
            run()

    def _expire(self, run: _Run) -> None:
        """On the loop, at the deadline: claim the run, log the timeout, cancel."""
        with self._lock:
            if run.claim is not None:
                return
            run.claim = TIMEOUT
        runtime, task = self.runtime, run.task
        timeout = TaskTimeout(f"the task outran its timeout of {run.limit:g}s")
        run.timeout = timeout
        stack = None
        if runtime._fail is not None and run.atask is not None:
            stack = _coroutine_stack(run.atask)
        runtime._timed_out(task, timeout, round(time.monotonic() - run.started, 6),
                           run.limit, stack)
        run.delivered = True
        if run.atask is not None:
            run.atask.cancel()
        loop = asyncio.get_running_loop()
        run.timers.append(loop.call_later(self.grace, self._detach, run))

    def _detach(self, run: _Run) -> None:
        """On the loop, *grace* after the deadline: a coroutine still running swallowed it."""
        with self._lock:
            if run.claim != TIMEOUT:
                return
            run.claim = DETACHED
            self._runs.discard(run)
        self._swallowed(run, ended=False)
        self._settle(self.runtime._after_timeout, run.task, run.message)

    def _swallowed(self, run: _Run, *, ended: bool) -> None:
        with self._lock:
            self.swallowed += 1
            count = self.swallowed
        task = run.task
        self.runtime.logs.main.warning(
            "coroutine swallowed its timeout", task_id=task.task_id, task=task.task_name,
            timeout=run.limit, swallowed=count,
            state="ended after it" if ended else f"still running {self.grace:g}s after it",
            hint="let TaskTimeout (and asyncio.CancelledError) propagate out of process()")
        task.task_logger.warning("swallowed its timeout", timeout=run.limit)

    def _interrupt(self, run: _Run) -> None:
        """The drain ended while *run* still ran (any thread)."""
        with self._lock:
            claim = run.claim
            if claim is None or claim == TIMEOUT:
                run.claim = INTERRUPTED if claim is None else DETACHED
            self._runs.discard(run)
        task = run.task
        if claim is None:
            self.runtime._interrupted(None, task, run.message, run.started)
            self._release()
        elif claim == TIMEOUT:
            # Timed out and logged, but it never unwound: its outcome is final.
            self._swallowed(run, ended=False)
            task_scope(self.runtime.logs, task.task_id)
            try:
                self.runtime._after_timeout(task, run.message)
            finally:
                task_scope(None)
                self._release()
        else:
            return
        loop, atask = self.loop, run.atask
        if loop is not None and atask is not None:
            try:
                loop.call_soon_threadsafe(atask.cancel)
            except RuntimeError:  # the loop is closed
                pass

    def await_on_loop(self, awaitable: Awaitable[Any], task: Task) -> Any:
        """Await *awaitable* (an async callback's) on the loop, in *task*'s log scope,
        from a thread other than the loop's; its result, or its exception raised."""
        loop = self.ensure_started()
        if threading.current_thread() is self.thread:
            raise RuntimeError("an async callback cannot be awaited from the event loop")
        logs = self.runtime.logs

        async def scoped() -> Any:
            task_scope(logs, task.task_id)
            return await awaitable

        return asyncio.run_coroutine_threadsafe(scoped(), loop).result()

    # -- the watcher ----------------------------------------------------------------

    def _tick(self) -> None:
        """On the loop: note that it came round; again in half the warning time."""
        self._beat = time.monotonic()
        if not self._closing.is_set():
            asyncio.get_running_loop().call_later(self.block_warning / 2, self._tick)

    def _watch(self) -> None:
        """Watcher thread: warn once per spell in which the loop did not come round."""
        warned = False
        while not self._closing.wait(self.block_warning / 4):
            late = time.monotonic() - self._beat
            if late <= self.block_warning:
                warned = False
                continue
            if warned:
                continue
            warned = True
            loop = self.loop
            atask = asyncio.current_task(loop) if loop is not None else None
            with self._lock:
                run = next((r for r in self._runs if r.atask is atask), None)
                self.loop_blocked += 1
            fields: dict[str, Any] = {"blocked_for": round(late, 3),
                                      "loop_block_warning": self.block_warning}
            if run is not None:
                fields.update(task_id=run.task.task_id, task=run.task.task_name)
            self.runtime.logs.main_line(
                WARNING, "event loop blocked", **fields,
                where=_where(self.thread.ident if self.thread else None),
                hint="blocking code in an async def task holds every coroutine up; "
                     "await it, or run it with asyncio.to_thread")

    def running(self) -> list[tuple[Task, float]]:
        """(task, started: monotonic seconds) of each coroutine message running now."""
        with self._lock:
            return [(run.task, run.started) for run in self._runs
                    if run.claim is None or run.claim == TIMEOUT]

    def stats(self) -> dict[str, Any]:
        """The coroutine counters for Runtime.stats()."""
        return {"coroutines": self.limit, "swallowed": self.swallowed,
                "loop_blocked": self.loop_blocked}


def _coroutine_stack(atask: asyncio.Task[Any]) -> str:
    """The suspended coroutine's stack as traceback text (the failed store's "traceback")."""
    frames = atask.get_stack()
    if not frames:
        return ""
    summary = traceback.StackSummary.extract((f, f.f_lineno) for f in frames)
    return "Stack of the task's coroutine when its time ran out:\n" + "".join(
        summary.format())


def _where(ident: int | None) -> str:
    """The innermost line the thread *ident* runs: ``file:line in function``."""
    frame = thread_frame(ident)
    if frame is None:
        return ""
    return f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"

