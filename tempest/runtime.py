"""One run of an engine: its threads, its counters, its logs.

Dispatch: leader and followers
------------------------------
Worker threads take turns at the queue: the one holding ``_dequeue_lock``
(the leader) dequeues, counts the message as running while it still holds
the lock, releases it and runs the message itself; the free workers wait for
the lock. So

- a message is dequeued only when a worker is free to run it (no prefetch:
  waiting messages stay where other engines can take them), unless the
  ``prefetch`` option asks otherwise (see "Prefetch");
- there is no hand-off between a dispatcher and a worker;
- one dequeue at a time reaches the queue, so an outage is retried with one
  shared backoff, and a queue without a blocking ``dequeue`` is polled by one
  thread with one backoff;
- ``burst`` can tell "drained" exactly: the leader saw ``running == 0`` before
  a dequeue that came back empty, and no one else could have taken a message
  meanwhile because only the leader dequeues.

Batches
-------
A queue with ``dequeue_many(count, timeout=)`` lets the leader take, in one
call, a message for itself and one for each other free worker, waiting for
the lock or on its way there (never more: each has a worker). It keeps the
extra ones in ``_taken``, counted as running, and each free worker pops one,
before it would queue for the lock or once it holds it. A stop gives back
whatever is still in ``_taken``, like a message dequeued just as the engine
closed. One round trip to a server then serves several workers, instead of
each waiting its turn for its own.

Acks with the next dequeue
--------------------------
A queue with ``ack_and_dequeue(messages, count)`` settles messages and
leases the next ones in one round trip (one transaction). A worker whose
task succeeded keeps its ack (``Slot.settling``) for its next dequeue:

- It gets the dispatcher lock without waiting and no batch message is left
  for it: it leads, and sends its ack together with a non-blocking take of
  as many messages as could start now (see ``_take``), handed out as a batch
  is.
- The lock is held by a leader in a queue call: it hands its ack to the next
  leader (``_handed``) and queues for the lock itself. Whoever holds the lock
  next sends every handed ack with its own call, before anything else, so a
  handed ack waits at most for the call in progress: there is always a next
  holder, the worker that handed it at the latest. Under load one round trip
  then carries the acks of several workers and the take for all of them.
- The leader waits on an empty queue, backs off after an error or waits for
  a free coroutine slot (``_idle_wait``), the engine is stopping, or a batch
  message is left for it: it acks alone, as a worker that cannot know when
  the next call goes. A leader about to wait sends what was handed
  first; a worker that handed its ack as the wait began takes it back
  (whoever pops an entry from ``_handed`` sends it: never twice, never not).

Until its ack is stored a message is still counted as running and not yet
processed, so ``stats()``, ``burst`` and a stop never see it settled before
it is; the outcome is logged and the callbacks ran before, exactly as with a
separate ack. A crash before the call returns leaves the message leased: it
runs again after its lease, as after a crash just before a separate ack.
What the take leased and a crash then strands comes back the same way. So
between two tasks a worker pays at most one round trip instead of two, and no
message is ever taken before a worker is free for it.

Prefetch
--------
With ``prefetch = N`` (default 0) the engine also holds up to N messages
beyond its free workers, so that a worker that finishes a task starts the
next one without a round trip to the queue:

- Every take asks for the free workers' messages plus N minus what is held
  (``_free``); the extra ones wait in ``_taken``, leased and counted as
  running (stats() shows them as ``prefetched``), and a worker that finishes
  pops the oldest before it would queue for the lock.
- That worker hands its ack to the next holder of the lock (``_hand``) and
  wakes the prefetcher thread (``_prefetch_loop``), which takes the lock,
  sends every handed ack and takes what makes the held count whole again:
  one round trip, with ``ack_and_dequeue`` where the queue has it, off every
  worker's path. With ``_taken`` empty a worker leads as without prefetch.
- Only worker threads' messages are held. Where coroutine tasks are
  registered too, a take is also bounded by the free coroutine slots, as
  without prefetch, and what it brings for a coroutine task starts on the
  loop at once: the next message may be of either kind. With coroutine
  tasks alone nothing is held.
- What is held is leased like a running message: the heartbeat renews it, a
  crash leaves it to come back after its lease (it never ran, so it runs
  once), and a stop makes the prefetcher give it back (``requeue``) at once,
  while the running tasks drain.

So N messages per engine are taken before a worker is free for them: other
engines on the queue cannot take those meanwhile, and a held message waits
for this engine's next free worker (at most one task's time) instead. An ack
waits for the prefetcher's call in progress, a round trip at most, as a
handed ack does; it is counted processed once sent.

Where a message can be lost or run twice
----------------------------------------
Between ``dequeue`` returning and the outcome: a crash there loses the message
on an at-most-once queue and redelivers it on a queue with ``ack``. The ack is
sent after the outcome is logged and the callbacks ran, so a crash in between
runs the task again (at-least-once, never at-most-once, where the queue acks).
A task still running when a drain ends is *interrupted*: not acked, given back
(``requeue`` where the queue has it, else left for the queue's redelivery, or
for a queue with neither re-enqueued), so at worst it runs twice.

Retries and the failed store
----------------------------
A failed or timed-out attempt with retries left is settled by the queue's
``retry`` instead of ``ack``: in one step the leased message is replaced by
the same message, delayed, one attempt more. A final failure is settled by
``fail``: in one step the leased message becomes an entry of the failed
store. Both run after the outcome is logged and the callbacks ran, like an
ack. So a crash before the step leaves the message leased: it is delivered
again after its lease with the count it had (the crash is not a failed
attempt), and that attempt runs again. A crash after it leaves the retry or
the entry. Where ``retry`` or ``fail`` itself raises (the server is gone),
the message is left leased, with the same result. Nothing is lost between
a failure and its retry or entry; an attempt can run twice.
"""

from __future__ import annotations

import collections
import inspect
import os
import threading
import time
from collections.abc import Callable
from logging import DEBUG, ERROR, WARNING
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tempest import config, metrics
from tempest.aio import Coroutines, is_awaitable
from tempest.announce import Announcer, new_engine_id
from tempest.exceptions import ConfigurationError, TaskTimeout, TooManyAbandoned
from tempest.logs import Logs, install_capture, task_scope, uninstall_capture
from tempest.messages import BadMessage, new_task_id, parse, shown
from tempest.periodic import Scheduler
from tempest.pool import ABANDONED, INTERRUPTED, TIMEOUT, WORKER, Slot, Supervisor
from tempest.queues.protocol import (
    DEFAULT_HEARTBEAT,
    ENGINE_METHODS,
    FAILED_METHODS,
    RESULT_METHODS,
    RETRY_METHODS,
)
from tempest.results import failure, json_value, success
from tempest.retries import Policy, failed_record, thread_stack
from tempest.tally import (
    BUCKET,
    FAILED,
    FIRST_BOUND,
    REJECTED,
    RETRIED,
    SUCCEEDED,
    SUM,
    TIMED_OUT,
    Tallies,
    bucket,
)
from tempest.task import UNSET, Task, _registry, registered_kinds

if TYPE_CHECKING:
    from tempest.engine import Engine

__all__ = ["Runtime", "queue_counts"]

DEQUEUE_WAIT = 0.25
"""Seconds one blocking dequeue waits before the leader looks for a stop request."""

BURST_WAIT = 0.01
"""Seconds a burst run's blocking dequeue waits while tasks still run (see _next_message)."""

POLL_MIN, POLL_MAX = 0.001, 0.5
"""Backoff between polls of a queue whose dequeue cannot block (doubles while empty)."""

ERROR_MIN, ERROR_MAX = 0.1, 5.0
"""Backoff after a dequeue raised (doubles per consecutive failure)."""

HEARTBEAT_JOIN = 5.0
"""Seconds finish() waits for a heartbeat (or an announce) in progress before closing
the logs."""

UNKNOWN_TASK = "<unknown>"
"""The task name a rejected message is counted under when it names no registered task."""

START_FAILED_WAIT = 10.0
"""Seconds a start that failed half-way waits for the workers it started to exit."""

ABANDON_GRACE = 1.0
"""Seconds after its deadline a task's thread has to unwind before it is abandoned."""


def _accepts_timeout(dequeue: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(dequeue).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "timeout" or p.kind is p.VAR_KEYWORD for p in params)


def _describe(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:  # noqa: BLE001 - a task's broken __str__ must not kill the worker
        text = "<exception str() failed>"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def missing(queue: Any, methods: tuple[str, ...]) -> list[str]:
    """Which of *methods* the queue lacks."""
    return [name for name in methods if not callable(getattr(queue, name, None))]


def _heartbeat_interval(queue: Any) -> float:
    """The queue's ``heartbeat_interval`` (seconds), checked; see tempest.queues.protocol."""
    interval = getattr(queue, "heartbeat_interval", DEFAULT_HEARTBEAT)
    if (isinstance(interval, bool) or not isinstance(interval, (int, float))
            or not interval > 0 or interval == float("inf")):
        raise ConfigurationError(
            f"{type(queue).__name__}.heartbeat_interval must be a positive number of "
            f"seconds, not {interval!r}")
    return float(interval)


class Runtime:
    """The state of one started engine; made by Engine.run/start, used once."""

    def __init__(self, engine: type[Engine], *, burst: bool,
                 overrides: dict[str, Any] | None = None) -> None:
        self.engine = engine
        options = dict(engine._options)
        if overrides:  # validated like a configure block; only the named options change
            checked = config.read_block(
                engine.__name__, type("overrides", (), overrides), engine._OPTIONS, options)
            options.update({key: checked[key] for key in overrides})
        self.options = options
        self.name: str = options["name"]
        self.threads: int = options["threads"]
        self.prefetch: int = options["prefetch"]
        self.coroutines = Coroutines(self, options["coroutines"],
                                     options["loop_block_warning"], ABANDON_GRACE)
        self.queue = options["queue"]
        self.default_timeout: float | None = options["timeout"]
        self.burst = burst
        self.wake: Callable[[], None] = lambda: None
        """Set by the engine's loop: wakes it to look at the state."""

        self.logs: Logs = None  # type: ignore[assignment]  # set in start()
        self._dequeue = self.queue.dequeue
        self._blocking = _accepts_timeout(self._dequeue)
        many = getattr(self.queue, "dequeue_many", None)
        self._dequeue_many = many if callable(many) and self._blocking else None
        # Taken for workers that were waiting for the leader (see "Batches" in
        # the module docstring); appended under _dequeue_lock, popped by anyone.
        self._taken: collections.deque[Any] = collections.deque()
        # Acks handed to the next leader, and whether the leader waits on an
        # empty queue (see "Acks with the next dequeue").
        self._handed: collections.deque[_Handed] = collections.deque()
        self._idle_wait = False
        self._ack = getattr(self.queue, "ack", None)
        both = getattr(self.queue, "ack_and_dequeue", None)
        # Only with a blocking dequeue_many: a leader of a polling queue sleeps
        # between polls, holding the lock, where handed acks would wait.
        self._ack_and_dequeue = (both if callable(both) and callable(self._ack)
                                 and self._dequeue_many is not None else None)
        if self.prefetch and self._dequeue_many is None:
            raise ConfigurationError(
                f"{engine.__name__}.configure.prefetch = {self.prefetch}: the queue "
                f"{type(self.queue).__name__} has no dequeue_many(count, timeout=) method, "
                f"so messages cannot be taken ahead; use a built-in queue, or add it to "
                f"yours (see tempest.queues.protocol)")
        # A success's ack waits for the next call (Slot.settling): one that carries
        # it together with a take, or the prefetcher's (see "Prefetch").
        self._settles_later = callable(self._ack) and (
            self._ack_and_dequeue is not None or bool(self.prefetch))
        self._refill = threading.Event()
        """Set when a worker handed an ack or popped a held message: see "Prefetch"."""
        self._prefetch_done = False
        self._prefetch_thread: threading.Thread | None = None
        self._reject_to = getattr(self.queue, "reject", None)
        self.guarantee = "at-least-once" if callable(self._ack) else "at-most-once"
        lacking = missing(self.queue, RETRY_METHODS)
        if options["retries"] and lacking:
            raise ConfigurationError(
                f"{engine.__name__}.configure.retries = {options['retries']}: the queue "
                f"{type(self.queue).__name__} has no "
                f"{' or '.join(name + '()' for name in lacking)} method, so a failed task "
                f"cannot be stored to run again; use a built-in queue, or add attempts() "
                f"and retry() to yours (see tempest.queues.protocol)")
        self._attempts = None if lacking else self.queue.attempts
        self._retry = None if lacking else self.queue.retry
        self._fail = None if missing(self.queue, FAILED_METHODS) else self.queue.fail
        stores = not missing(self.queue, RESULT_METHODS)
        self._result_ttl = self.queue.result_ttl if stores else None
        self._store_result = self.queue.store_result if stores else None
        both = getattr(self.queue, "store_result_and_ack", None)
        # A success's result and its ack in one step, where the queue has it.
        self._store_result_and_ack = both if stores and callable(both) else None
        self._policies: dict[type[Task], Policy] = {}
        self._heartbeat = getattr(self.queue, "heartbeat", None)
        self.heartbeat_interval = _heartbeat_interval(self.queue)
        self._heartbeat_thread: threading.Thread | None = None
        self._scheduler: Scheduler | None = None
        self.engine_id = new_engine_id(self.name)
        """This run's id in the queue's engine registry (see tempest.announce)."""
        lacking = missing(self.queue, ENGINE_METHODS)
        self._announcer: Announcer | None = None
        if options["announce_every"] is not None and not lacking:
            self._announcer = Announcer(self, options["announce_every"])
        self._registry_lacking = lacking if len(lacking) < len(ENGINE_METHODS) else []
        if options["metrics_port"] is not None:
            metrics.require(f"{engine.__name__}.configure.metrics_port = "
                            f"{options['metrics_port']}")
        self._metrics: metrics.MetricsServer | None = None

        # Lock order: a Slot's lock may be held while taking _lock (the timeout
        # is counted under the slot lock), never the other way round.
        self._lock = threading.Lock()  # counters, slots, closed
        self._dequeue_lock = threading.Lock()
        self._stop_event = threading.Event()
        self._heartbeat_stop = threading.Event()
        self._poll = POLL_MIN
        self._errors = 0
        self.stopping = False
        self.stop_reason = ""
        self.immediate = False
        self.closed = False
        self.error: BaseException | None = None
        self.half_started = False
        """Set by start() when it failed after starting threads: see abort()."""

        self.started_at = time.monotonic()
        self.started_wall = time.time()
        """When the run started, in POSIX seconds (the engine record's ``started_at``)."""
        self.stopped_at: float | None = None  # set by finish(): uptime stops growing
        self.last_progress = self.started_at
        # Outcomes are counted in per-thread tallies (see tempest.tally); the
        # Tallies' own lock is the innermost of all (taken once per thread).
        self.tallies = Tallies()
        self.running = self.abandoned = self.failed_dropped = 0
        self.slots: list[Slot] = []
        self.supervisor = Supervisor(self._on_timeout, self._on_abandon, ABANDON_GRACE)

    # -- start and stop ------------------------------------------------------------

    def start(self) -> None:
        """before_initialize, open the logs, after_initialize, start the threads.

        An exception from a hook or a bad callable option propagates to the
        caller of run()/start() after whatever was opened is closed again.
        """
        options = self.options
        if options["before_initialize"] is not None:
            options["before_initialize"](self.engine)
        log_dir = options["log_dir"]
        level = options["log_level"]
        try:
            log_dir = log_dir() if callable(log_dir) else log_dir
            config.log_dir(log_dir)
            level = config.log_level(level() if callable(level) else level)
            if callable(level):
                raise ConfigurationError(f"returned a callable: {level!r}")
        except ConfigurationError as exc:
            raise ConfigurationError(f"{self.engine.__name__}.configure: {exc}") from None
        self.logs = Logs(self.name, Path(os.fspath(log_dir)), str(level),
                         options["log_format"])
        install_capture()
        try:
            self.logs.always.info(
                "starting", engine=self.name, pid=os.getpid(), threads=self.threads,
                coroutines=self.coroutines.limit, prefetch=self.prefetch,
                queue=type(self.queue).__name__, guarantee=self.guarantee,
                timeout=self.default_timeout, burst=self.burst,
                log_dir=str(Path(os.fspath(log_dir)).resolve()), log_level=level)
            if options["after_initialize"] is not None:
                options["after_initialize"](self.engine)
            if options["metrics_port"] is not None:
                self._metrics = metrics.MetricsServer(
                    self.engine, options["metrics_host"], options["metrics_port"])
        except BaseException as exc:
            self.logs.always.error("start-up failed", error=_describe(exc), exc_info=exc)
            self.finish()
            raise
        self.started_at = self.last_progress = time.monotonic()
        self.started_wall = time.time()
        self.logs.always.info("started", engine=self.name, threads=self.threads,
                              queue=type(self.queue).__name__, guarantee=self.guarantee,
                              engine_id=self.engine_id)
        if self._metrics is not None:
            self.logs.always.info("metrics served", url=self._metrics.url)
        if self._registry_lacking and self.options["announce_every"] is not None:
            self.logs.always.warning(
                "engine record unavailable", queue=type(self.queue).__name__,
                missing=self._registry_lacking,
                effect="this engine is not listed among the queue's engines")
        if self._retry is None:
            cannot = sorted(name for name, cls in list(_registry.items())
                            if self._policy(cls).retries)
            if cannot:
                self.logs.always.warning(
                    "retries unavailable", tasks=cannot, queue=type(self.queue).__name__,
                    missing=missing(self.queue, RETRY_METHODS),
                    effect="their failures are final on this engine")
        if self._store_result is None:
            cannot = sorted(name for name, cls in list(_registry.items())
                            if cls._options.get("store_result"))
            if cannot:
                self.logs.always.warning(
                    "results unavailable", tasks=cannot, queue=type(self.queue).__name__,
                    missing=missing(self.queue, RESULT_METHODS),
                    effect="their return values are not kept on this engine")
        try:
            self._start_threads()
        except BaseException as exc:
            # A thread that could not start (the process is at its limit): what did
            # start is stopped by abort(), once the caller opened the gate.
            self.logs.always.error("start-up failed", error=_describe(exc), exc_info=exc)
            self.request_stop("start-up failed", immediate=True, error=exc)
            self.half_started = True
            raise

    def abort(self) -> None:
        """After a start that failed half-way (``half_started``), the dispatcher's gate
        open again: wait for the workers started to see the stop, then finish, so
        that no announcer, metrics port or worker outlives the failed start."""
        deadline = time.monotonic() + START_FAILED_WAIT
        while not self.workers_done() and time.monotonic() < deadline:
            self._heartbeat_stop.wait(0.01)  # bounded: they see the stop within a take
        self.finish()

    def _start_threads(self) -> None:
        """The supervisor, the event loop (if needed), heartbeat, scheduler, announcer,
        then the workers."""
        self.supervisor.start()
        if registered_kinds()[1]:
            self.coroutines.ensure_started()  # else at the first coroutine message
        if callable(self._heartbeat):
            self._heartbeat_thread = threading.Thread(
                target=self._beat, daemon=True, name=f"tempest-heartbeat:{self.name}")
            self._heartbeat_thread.start()
        if self.options["periodic"]:
            self._scheduler = Scheduler(self.options["periodic"], self.queue, self.logs,
                                        self._stop_event, self.name)
            self._scheduler.start()
        if self._announcer is not None:
            self._announcer.start()
        if self.prefetch:
            self._prefetch_thread = threading.Thread(
                target=self._prefetch_loop, daemon=True, name=f"tempest-prefetch:{self.name}")
            self._prefetch_thread.start()
        for _ in range(self.threads):
            self._spawn(Slot())

    def request_stop(self, reason: str, *, immediate: bool = False,
                     error: BaseException | None = None) -> None:
        """Stop dequeuing; *immediate*: do not wait for running tasks."""
        with self._lock:
            if error is not None and self.error is None:
                self.error = error
            if not self.stopping:
                self.stopping = True
                self.stop_reason = reason
            if immediate:
                self.immediate = True
        self._stop_event.set()
        self._refill.set()  # the prefetcher gives back what it holds at once
        if self._announcer is not None:
            self._announcer.wake()  # the record says "stopping" at once
        self.wake()

    def workers_done(self) -> bool:
        """True once every worker thread (abandoned ones aside) has exited and no
        coroutine message is left (running or settling)."""
        with self._lock:
            threads_done = all(not s.thread.is_alive() for s in self.slots
                               if s.thread is not None)
        return threads_done and self.coroutines.busy == 0

    def finish(self) -> None:
        """End of the drain: interrupt what still runs, write the last lines, close."""
        self._stop_prefetching()  # before the looks below: it takes and hands no more
        self._give_back_taken()  # by a worker normally; here if none came back for them
        handed = self._take_handed()  # sent by the next leader normally: never left behind
        if handed:
            self._settle_all(handed, 0)
        with self._lock:
            self.closed = True
            slots = list(self.slots)
        for slot in slots:
            taken = slot.interrupt()
            if taken is not None:
                self._interrupted(*taken)
        self.coroutines.close()
        self.supervisor.stop()
        if self._scheduler is not None:
            # Bounded like the heartbeat: a fire stuck on a dead server is let go.
            self._scheduler.join(HEARTBEAT_JOIN)
        self._heartbeat_stop.set()
        if self._heartbeat_thread is not None:
            # Bounded: a heartbeat stuck on a dead server must not hold up the
            # exit (the thread is a daemon; the leases simply run out).
            self._heartbeat_thread.join(HEARTBEAT_JOIN)
        self.stopped_at = time.monotonic()
        if self._announcer is not None:
            # The last counts added and the record forgotten, bounded like a heartbeat.
            self._announcer.finish(HEARTBEAT_JOIN)
        if self._metrics is not None:
            self._metrics.close()
        logs = self.logs
        if logs is not None:
            logs.always.info("stopped", engine=self.name, reason=self.stop_reason or None,
                             **self.stats())
            uninstall_capture()
            logs.close()

    def _beat(self) -> None:
        """Heartbeat thread: renew the queue's leases until the run has finished.

        Its own thread, not the control loop's: a heartbeat waiting on a slow
        server must delay neither signals nor the watchdog. It beats through
        the drain too (tasks still running keep their leases) and stops only
        in finish(), once they are done or given back. The first beat is at
        once: it also recovers what dead consumers of the queue left leased.
        """
        failures = 0
        while True:
            try:
                self._heartbeat()  # type: ignore[misc]
            except Exception as exc:  # noqa: BLE001 - retried at the next beat
                failures += 1
                self.logs.main.error("heartbeat failed", error=_describe(exc),
                                     attempt=failures, retry_in=self.heartbeat_interval)
            else:
                if failures:
                    self.logs.main.info("heartbeat recovered", attempts=failures)
                    failures = 0
            if self._heartbeat_stop.wait(self.heartbeat_interval):
                return

    # -- worker threads --------------------------------------------------------------

    def _spawn(self, slot: Slot) -> None:
        thread = threading.Thread(target=self._work, args=(slot,), daemon=True,
                                  name=f"tempest-worker:{self.name}")
        slot.thread = thread
        with self._lock:
            self.slots.append(slot)
        thread.start()

    def _work(self, slot: Slot) -> None:
        slot.ident = threading.get_ident()
        slot.tally = self.tallies.mine()
        try:
            if slot.handover is not None:
                task, message = slot.handover
                slot.handover = None
                self._after_timeout(task, message)
            while True:
                message = self._next_message(slot)
                if message is None:
                    return
                claim = self._handle(slot, message)
                if claim in (ABANDONED, INTERRUPTED):
                    return  # the replacement thread or the drain took over
        except BaseException as exc:  # noqa: BLE001 - a bug of ours must not pass silently
            self.logs.always.critical("worker crashed", error=_describe(exc), exc_info=exc)
            self.request_stop("a worker crashed", error=exc)
        finally:
            if slot.settling is not None:  # never left behind, whatever ended the loop
                self._settle(slot)
            task_scope(None)
            if self.stopping:
                self.wake()

    def _next_message(self, slot: Slot) -> Any:
        """Dequeue as the leader; None once stopping (see the module docstring).

        Coroutine messages the leader dequeues go to the event loop at once
        (see :mod:`tempest.aio`), and it dequeues on; it returns with the first
        message for a thread, which it runs itself. The ack *slot* kept for
        this dequeue goes with it where it can, else first, alone (see "Acks
        with the next dequeue").
        """
        if slot.settling is not None:
            if not self.stopping and not self._taken:
                if self._dequeue_lock.acquire(blocking=False):
                    try:
                        return self._lead(slot)
                    finally:
                        self._dequeue_lock.release()
                if self._hand(slot):
                    with self._dequeue_lock:  # the next holder sends it: maybe this one
                        return self._lead(slot)
            # A held message waits for this worker (see "Prefetch"): the
            # prefetcher sends the ack, unless a leader waits on an empty queue,
            # which then has nothing held.
            if slot.settling is not None and not (
                    self.prefetch and not self.stopping and self._hand(slot)):
                self._settle(slot)
        if not self.stopping:
            # One taken for a free worker in a batch: no need to queue for the lock.
            message = self._pop_taken()
            if message is not None:
                if self.prefetch:
                    self._refill.set()  # room for one more, and perhaps an ack to send
                return message
        with self._dequeue_lock:
            return self._lead(slot)

    def _hand(self, slot: Slot) -> bool:
        """Hand *slot*'s ack to the next leader (see "Acks with the next dequeue").

        False, the ack kept, while the leader waits on an empty queue: then
        the next call may be a wait away. The check comes after the append,
        and the leader's before its wait after it raises ``_idle_wait``: so
        either the leader sees the entry, or this worker sees the flag and
        takes the entry back; whoever pops it sends it.
        """
        entry = _Handed(slot.settling)
        slot.settling = None
        self._handed.append(entry)
        if self._idle_wait:
            try:
                self._handed.remove(entry)
            except ValueError:
                return True  # the leader took it: it sends it before its wait
            slot.settling = entry.settling
            return False
        return True

    def _lead(self, slot: Slot) -> Any:
        """The leader's loop, ``_dequeue_lock`` held: see _next_message."""
        handed = self._take_handed()
        if slot.settling is not None or handed:
            threads, coroutines = registered_kinds()
            # Their messages still count as running: their workers are free too.
            mine = [slot.settling] if slot.settling is not None else []
            slot.settling = None
            settling = mine + handed
            free = self._free(threads, coroutines, self.running - len(settling))
            served = self._taken and not self.prefetch  # its workers pop what is there
            taken = self._settle_all(settling, 0 if self.stopping or served else free, slot)
            message = self._hand_out(taken, coroutines) if taken else None
            if message is not None:
                return message
        while not self.stopping:
            message = self._pop_taken()
            if message is not None:
                return message
            self.last_progress = time.monotonic()
            threads, coroutines = registered_kinds()
            if coroutines and not self._idle(slot, self.coroutines.wait_free, DEQUEUE_WAIT):
                # Every coroutine slot is busy: what came now might not start.
                continue
            idle = self.running == 0
            try:
                if self._blocking:
                    # Burst: with the queue empty, the run ends when the last
                    # task does, so do not sleep through that in a long wait.
                    wait = (DEQUEUE_WAIT if not self.burst
                            else 0 if idle else BURST_WAIT)
                    messages = self._take_handed_and_wait(wait, threads, coroutines, slot)
                else:
                    message = self._dequeue()
                    messages = [] if message is None else [message]
            except Exception as exc:  # noqa: BLE001 - any queue error is retried
                self._errors += 1
                delay = min(ERROR_MIN * 2 ** (self._errors - 1), ERROR_MAX)
                self.logs.main.error("dequeue failed", error=_describe(exc),
                                     attempt=self._errors, retry_in=delay)
                # A backoff is progress (healthy() must not stop the watchdog
                # during a queue outage): the dispatcher is due back after it.
                self.last_progress = time.monotonic() + delay
                self._idle(slot, self._stop_event.wait, delay)
                continue
            if self._errors:
                self.logs.main.info("dequeue recovered", attempts=self._errors)
                self._errors = 0
            if not messages:
                if self.burst and idle:
                    self.request_stop("drained")
                    return None
                if not self._blocking:
                    self._stop_event.wait(self._poll)
                    self._poll = min(self._poll * 2,
                                     BURST_WAIT if self.burst else POLL_MAX)
                continue
            self._poll = POLL_MIN
            message = self._hand_out(messages, coroutines)
            if message is not None:
                return message
        self._give_back_taken()
        return None

    def _idle(self, slot: Slot, wait: Callable[[float], bool], seconds: float) -> bool:
        """``wait(seconds)`` as a leader that makes no queue call meanwhile (a backoff,
        every coroutine slot busy): the acks handed to it are sent first, and none
        is handed while it waits (see _hand)."""
        self._idle_wait = True
        try:
            handed = self._take_handed()
            if handed:
                self._settle_all(handed, 0, slot)
            return wait(seconds)
        finally:
            self._idle_wait = False

    def _take_handed(self) -> list[Any]:
        """The acks handed to this leader (see _hand): popped, so sent by it alone."""
        handed = []
        while self._handed:
            try:
                handed.append(self._handed.popleft().settling)
            except IndexError:  # taken back meanwhile
                break
        return handed

    def _take_handed_and_wait(self, wait: float, threads: bool, coroutines: bool,
                              slot: Slot) -> list[Any]:
        """_take(wait), sending the acks handed meanwhile first, with a take of their own."""
        self._idle_wait = True  # before the look at _handed: see _hand
        try:
            handed = self._take_handed()
            if handed:
                free = self._free(threads, coroutines, self.running - len(handed))
                taken = self._settle_all(handed, free, slot)
                if taken:
                    return taken
            return self._take(wait, threads, coroutines)
        finally:
            self._idle_wait = False

    def _take(self, wait: float, threads: bool, coroutines: bool) -> list[Any]:
        """Dequeue for this worker and for the other free ones, in one call.

        Only as many as can start right now: one per worker not running a
        message (each is waiting for the dispatcher lock or on its way to it,
        having just finished a task, and pops its message from ``_taken`` at
        once) where thread tasks are registered, one per free coroutine slot
        where coroutine tasks are; where both are, the fewer of the two, as
        the next message may be of either kind. So nothing is prefetched.
        """
        free = self._free(threads, coroutines, self.running)
        if self._dequeue_many is None or free < 2:
            message = self._dequeue(timeout=wait)
            return [] if message is None else [message]
        taken: list[Any] = self._dequeue_many(free, timeout=wait)
        return taken

    def _free(self, threads: bool, coroutines: bool, running: int) -> int:
        """How many messages can start right now (see _take), *running* counted running;
        for worker threads, ``prefetch`` more (see "Prefetch": *running* counts what
        is held, so this tops it up)."""
        free = self.threads + self.prefetch - (running - self.coroutines.busy)
        if coroutines:
            free = min(free, self.coroutines.free()) if threads else self.coroutines.free()
        return free

    def _hand_out(self, messages: list[Any], coroutines: bool) -> Any:
        """Count the dequeued *messages* running and hand them out: coroutine tasks' to
        the loop, the first other one to the caller (returned), the rest to ``_taken``
        for the other free workers; None if none is left for a thread."""
        if coroutines:
            with self._lock:  # before any of them can end
                self.running += len(messages)
            messages = self._start_coroutines(messages)
            if not messages:
                return None
            with self._lock:
                self._taken.extend(messages[1:])
        else:
            with self._lock:  # stats() sees them counted and queued together
                self.running += len(messages)
                if self._taken:  # held ahead (see "Prefetch"): the oldest first
                    self._taken.extend(messages)
                    return self._taken.popleft()
                self._taken.extend(messages[1:])
        return messages[0]

    def _start_coroutines(self, messages: list[Any]) -> list[Any]:
        """Hand the coroutine tasks' messages of *messages* to the loop; the others.

        What is not a well-formed message of a coroutine task stays for a
        worker thread (which rejects it, if bad).
        """
        rest: list[Any] = []
        items: list[tuple[Task, Any, float | None]] = []
        for message in messages:
            cls = None
            if isinstance(message, list) and len(message) >= 2 and type(message[1]) is str:
                cls = _registry.get(message[1])
            if cls is None or not cls._is_async:
                rest.append(message)
                continue
            try:
                task_id, cls, args = parse(message)
            except BadMessage:
                rest.append(message)
                continue
            task = self._new_task(cls, task_id, args, message)
            timeout = self.default_timeout if cls.timeout is UNSET else cls.timeout
            items.append((task, message, timeout))
        if items and not self.coroutines.start(items):
            for _, message, _ in items:  # closing: like a message dequeued as it closed
                self.logs.main.info("given back", message=shown(message),
                                    how=self._give_back(message))
                self._done()
        return rest

    def _take_now(self, count: int) -> list[Any]:
        """Up to *count* messages waiting now (``dequeue_many``, no wait); none if the
        queue fails, logged: the leader's next take retries with its backoff."""
        try:
            taken: list[Any] = self._dequeue_many(count, timeout=0)  # type: ignore[misc]
        except Exception as exc:  # noqa: BLE001 - any queue error is retried
            self.logs.main.error("dequeue failed", error=_describe(exc))
            return []
        return taken

    def _prefetch_loop(self) -> None:
        """The prefetcher thread (see "Prefetch"): woken by a worker that handed an ack
        or popped a held message, it sends the handed acks and tops up what is held,
        holding the dispatcher lock like a leader, until _stop_prefetching."""
        try:
            while True:
                self._refill.wait()
                self._refill.clear()  # before the look: a later wake is kept
                if self._prefetch_done:
                    return
                if not self._dequeue_lock.acquire(timeout=DEQUEUE_WAIT):
                    self._refill.set()  # a leader waits on the queue: look again
                    continue
                try:
                    if self.stopping:
                        # At once, not when the drain ends: other engines can take
                        # them while this one's running tasks finish.
                        self._give_back_taken()
                    self._top_up()
                finally:
                    self._dequeue_lock.release()
        except BaseException as exc:  # noqa: BLE001 - a bug of ours must not pass silently
            self.logs.always.critical("prefetcher crashed", error=_describe(exc),
                                      exc_info=exc)
            self.request_stop("the prefetcher crashed", error=exc)

    def _top_up(self) -> None:
        """One call of the prefetcher, the dispatcher lock held: the handed acks, and
        a take that holds ``prefetch`` messages beyond the free workers again (none
        while stopping, while the leader backs off after errors, or with coroutine
        tasks alone); a coroutine task's message starts on the loop at once."""
        handed = self._take_handed()
        threads, coroutines = registered_kinds()
        room = 0
        if threads and not (self.stopping or self._errors):
            room = self._free(threads, coroutines, self.running - len(handed))
        if handed:
            taken = self._settle_all(handed, room)
        elif room > 0:
            taken = self._take_now(room)
        else:
            return
        if taken:
            with self._lock:  # counted before any of them can end
                self.running += len(taken)
            rest = self._start_coroutines(taken) if coroutines else taken
            with self._lock:
                self._taken.extend(rest)

    def room_opened(self) -> None:
        """A coroutine slot is free again: with ``prefetch``, wake the prefetcher, for
        the take it bounds (see "Prefetch")."""
        if self.prefetch:
            self._refill.set()

    def _stop_prefetching(self) -> None:
        """Stop the prefetcher and wait for its call in progress (bounded like a
        heartbeat): what it took is in ``_taken`` then, given back by finish()."""
        self._prefetch_done = True
        self._refill.set()
        thread = self._prefetch_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(HEARTBEAT_JOIN)

    def _pop_taken(self) -> Any:
        """A message taken in a batch (counted as running already), or None.

        Any thread may pop, with or without the dispatcher lock: popleft is
        atomic, so each message goes to exactly one worker or back to the queue.
        """
        try:
            return self._taken.popleft()
        except IndexError:
            return None

    def _give_back_taken(self) -> None:
        """Stopping: return what was taken for workers that will not run it now."""
        while (message := self._pop_taken()) is not None:
            self.logs.main.info("given back", message=shown(message),
                                how=self._give_back(message))
            self._done()

    def _handle(self, slot: Slot, message: Any) -> str:
        """Run one message in this worker; return who claimed its outcome."""
        try:
            task_id, cls, args = parse(message)
        except BadMessage as bad:
            self._reject(message, bad.reason, bad.detail)
            return WORKER
        task = self._new_task(cls, task_id, args, message)
        timeout = self.default_timeout if cls.timeout is UNSET else cls.timeout
        if cls._is_async:
            # A coroutine task's message that reached a worker (its class was
            # registered after the dequeue looked): it still runs on the loop.
            if not self.coroutines.start([(task, message, timeout)]):
                self._give_back(message)
                self._done()
                return INTERRUPTED
            return WORKER
        run = slot.begin(task, message, timeout, self)
        if run is None:  # the drain ended between dequeue and start
            self._give_back(message)
            self._done()
            return INTERRUPTED
        task_scope(self.logs, task.task_id)
        if self.logs.level <= DEBUG:
            task.task_logger.debug("started", task=cls.task_name, args=list(args),
                                   attempt=task.attempt)
        started = time.perf_counter()
        try:
            try:
                # Armed inside the try: from here on a TaskTimeout may fire at any
                # bytecode, and outside these handlers it would kill the worker.
                if slot.deadline is not None:
                    self.supervisor.watch(slot, slot.deadline)
                task.__init__()  # type: ignore[misc]  # deliberately after task_id is set
                result, error = task.process(*args), None
            except BaseException as exc:  # noqa: BLE001 - every outcome is reported
                result, error = None, exc
            claim = slot.settle()
        except TaskTimeout as late:  # injected, fired after process had ended
            result, error = None, late
            claim = slot.settle()
        duration = time.perf_counter() - started
        if claim == WORKER:
            self._finish(task, message, result, error, duration, slot=slot)
        elif claim == TIMEOUT:
            self._after_timeout(task, message)
        task_scope(None)
        return claim

    def _new_task(self, cls: type[Task], task_id: str | None, args: tuple[Any, ...],
                  message: Any) -> Task:
        """A fresh *cls* for *message*, its attributes set (``__init__`` runs later)."""
        task = cls.__new__(cls)
        task.task_id = task_id or new_task_id()
        task.args = args
        task.engine = self.engine
        task._logs = self.logs
        if self._attempts is not None:
            task.attempt = self._attempts(message) + 1
        return task

    # -- outcomes ------------------------------------------------------------------------

    def _finish(self, task: Task, message: Any, result: Any, error: BaseException | None,
                duration: float, *, slot: Slot | None = None) -> None:
        """Log, call back, store and settle one outcome; count it once settled.

        With *slot* (a worker thread's) and a queue with ``ack_and_dequeue`` (or
        ``prefetch`` on), a success's ack is left in ``slot.settling`` for the
        next call, and
        counted there once sent (see "Acks with the next dequeue"); a success
        whose result is kept goes with its ack instead, where the queue has
        ``store_result_and_ack``.
        """
        name = task.task_name
        outcome = SUCCEEDED
        keep, value = self._keeps_result(task, message), None
        if error is None and keep is not None:
            try:
                value = json_value(task, result)
            except TypeError as exc:  # the attempt fails: not JSON, cannot be stored
                error = exc
        if error is None:
            self.logs.success_line(task.task_id, name, duration, task.attempt)
            self._callback(task, "after_success", result)
            if keep is not None and self._store_result_and_ack is not None:
                self._keep_result_and_ack(task, message, success(task, value), keep)
            elif keep is None or self._keep_result(task, success(task, value), keep):
                if slot is not None and self._settles_later:
                    slot.settling = (task.task_id, message, name, duration)
                    return
                self._acknowledge(task.task_id, message)
        else:
            delay = self._retry_in(task, error)
            fields = {"task_id": task.task_id, "task": name, "outcome": "failure",
                      "duration": round(duration, 6), "attempt": task.attempt}
            if delay is not None:
                outcome = RETRIED
                self.logs.main_line(WARNING, "task ended", **fields, retry_in=round(delay, 3),
                                    error=_describe(error))
                task.task_logger.warning("failed, will retry", attempt=task.attempt,
                                         retry_in=round(delay, 3), error=_describe(error),
                                         exc_info=error)
                self._callback(task, "after_retry", error, delay)
                self._send_retry(task, message, delay)
            else:
                outcome = FAILED
                self.logs.main_line(ERROR, "task ended", **fields, error=_describe(error))
                task.task_logger.error("failed", attempt=task.attempt, error=_describe(error),
                                       exc_info=error)
                self._callback(task, "after_failure", error)
                if keep is None or self._keep_result(task, failure(task, error), keep):
                    self._final_failure(task, message, error)
        self._count_settled(outcome, name, duration, slot)

    def _count_settled(self, outcome: int, name: str, duration: float | None,
                       slot: Slot | None = None) -> None:
        """Count a message of task *name* settled with *outcome* (see tempest.tally), in
        the tally of *slot* (this worker thread's), else of the calling thread.

        Counted once everything about the message is done, so that a stats()
        reader never sees it processed while its callbacks still run or its
        ack is unsent. The outcome is counted under ``_lock`` (taken here anyway),
        with the running count, so stats() sees both change at once; the
        duration outside it, to keep the section as short as it was.
        """
        tally = self.tallies.mine() if slot is None else slot.tally
        # Tally.count, written out: once per message, where a call costs a share
        # that shows on a no-op task.
        row = tally.tasks.get(name)
        if row is None:
            row = tally.add(name)
        if duration is not None:  # None: a rejected message, which did not run
            row[SUM] += duration
            if duration <= FIRST_BOUND:
                row[BUCKET] += 1
            else:
                row[BUCKET + bucket(duration)] += 1
            if duration < tally.low:  # noqa: PLR1730 - compared: no builtin call
                tally.low = duration
            if duration > tally.high:  # noqa: PLR1730
                tally.high = duration
        with self._lock:
            row[outcome] += 1
            self.running -= 1

    def _settle(self, slot: Slot) -> None:
        """Send the ack *slot* kept, alone."""
        settling, slot.settling = slot.settling, None
        self._settle_all([settling], 0, slot)

    def _settle_all(self, settling: list[tuple[str, Any, str, float]], take: int,
                    slot: Slot | None = None) -> list[Any]:
        """Send the kept acks *settling* (task id, message, task name, duration) of
        successes, with a take of up to *take* messages; what it took (not yet counted
        running: see _hand_out). Counted in the tally of *slot*, the caller's: a
        thread writes only its own (acks handed to it are counted by it)."""
        taken: list[Any] = []
        if self._ack_and_dequeue is None or (take <= 0 and len(settling) == 1):
            for task_id, message, _, _ in settling:
                self._acknowledge(task_id, message)
            if take > 0:  # settling later without ack_and_dequeue: prefetch
                taken = self._take_now(take)
        else:
            try:
                taken = self._ack_and_dequeue(
                    [message for _, message, _, _ in settling], max(take, 0))
            except Exception as exc:  # noqa: BLE001
                # Left leased: they run again after their lease (what a take leased too).
                for task_id, _, _, _ in settling:
                    self.logs.main.error("ack failed", task_id=task_id, error=_describe(exc))
        for _, _, name, duration in settling:
            self._count_settled(SUCCEEDED, name, duration, slot)
        return taken

    # -- results ----------------------------------------------------------------------------

    def _keeps_result(self, task: Task, message: Any) -> float | None:
        """Seconds to keep *task*'s result: as its message asked (``call``), else as its
        class says (``store_result``); None: no result is kept."""
        if self._result_ttl is None:
            return None  # warned at start: "results unavailable"
        try:
            asked = self._result_ttl(message)
        except Exception as exc:  # noqa: BLE001 - then as if nothing was asked
            self.logs.main.error("result_ttl failed", task_id=task.task_id, error=_describe(exc))
            asked = None
        if asked is not None:
            return float(asked)
        own = type(task)._options
        if not own.get("store_result"):
            return None
        ttl = own.get("result_ttl", UNSET)
        return float(self.options["result_ttl"] if ttl is UNSET else ttl)

    def _keep_result(self, task: Task, record: dict[str, Any], ttl: float) -> bool:
        """Store *task*'s final result; False if that failed, and then the message stays
        leased: a reliable queue runs it again after its lease, and that run stores
        its result (at-least-once, like the task). The outcome is logged already."""
        try:
            self._store_result(task.task_id, record, ttl=ttl)  # type: ignore[misc]
        except Exception as exc:  # noqa: BLE001
            self.logs.main.error("result store failed", task_id=task.task_id,
                                 task=task.task_name, error=_describe(exc),
                                 redelivery=self.guarantee)
            return False
        return True

    def _keep_result_and_ack(self, task: Task, message: Any, record: dict[str, Any],
                             ttl: float) -> None:
        """_keep_result, then the ack, in one step: the queue's ``store_result_and_ack``
        stores the result and settles *message* atomically (one round trip for a
        success of ``call``). If it raised, the message stays leased here, as after a
        failed _keep_result (a reply lost after the step leaves it acked in the queue,
        its result stored: nothing runs twice for it)."""
        try:
            self._store_result_and_ack(  # type: ignore[misc]
                message, task.task_id, record, ttl=ttl)
        except Exception as exc:  # noqa: BLE001
            self.logs.main.error("result store failed", task_id=task.task_id,
                                 task=task.task_name, error=_describe(exc),
                                 redelivery=self.guarantee)

    # -- retries and the failed store ------------------------------------------------------

    def _policy(self, cls: type[Task]) -> Policy:
        """*cls*'s retry options, the engine's where the task sets none (cached)."""
        policy = self._policies.get(cls)
        if policy is None:
            own, engine = cls._options, self.options

            def pick(key: str) -> Any:
                value = own.get(key, UNSET)
                return engine[key] if value is UNSET else value

            policy = Policy(pick("retries"), pick("retry_on"), pick("retry_delay"),
                            pick("retry_max_delay"))
            self._policies[cls] = policy
        return policy

    def _retry_in(self, task: Task, error: BaseException) -> float | None:
        """Seconds until *task*'s next attempt after *error*, or None: this one was final."""
        policy = self._policy(type(task))
        if not policy.retries:
            return None
        if self._retry is None:
            return None  # warned at start: "retries unavailable"
        return policy.decide(task.attempt, error, lambda text: self.logs.main.error(
            "retry_delay failed", task_id=task.task_id, task=task.task_name, error=text,
            using="the backoff formula with retry_delay 1"))

    def _send_retry(self, task: Task, message: Any, delay: float) -> None:
        """Hand *message* back to the queue for its next attempt in *delay* seconds."""
        _fill_id(message, task.task_id)
        try:
            self._retry(message, delay=delay, failed_at=time.time())  # type: ignore[misc]
        except Exception as exc:  # noqa: BLE001
            # Left leased: a reliable queue delivers it again after its lease,
            # with the attempt count it had; that attempt then runs again.
            self.logs.main.error("retry failed", task_id=task.task_id, task=task.task_name,
                                 error=_describe(exc), redelivery=self.guarantee)

    def _final_failure(self, task: Task, message: Any, error: BaseException,
                       stack: str | None = None) -> None:
        """Settle the last attempt's *message*: into the failed store, or acked."""
        if self._fail is None or not type(task)._options.get("keep_failed", True):
            self._acknowledge(task.task_id, message)
            return
        _fill_id(message, task.task_id)
        record = failed_record(task, error, stack)
        try:
            dropped = self._fail(message, record, keep=self.options["failed_max"],
                                 ttl=self.options["failed_ttl"])
        except Exception as exc:  # noqa: BLE001 - left leased, like a failed retry
            self.logs.main.error("failed store write failed", task_id=task.task_id,
                                 task=task.task_name, error=_describe(exc),
                                 redelivery=self.guarantee)
            return
        if dropped:
            with self._lock:
                self.failed_dropped += dropped

    def _on_timeout(self, slot: Slot) -> None:
        """Supervisor thread, under the slot lock: log the timeout outcome."""
        task = slot.task
        limit = None if slot.deadline is None else round(slot.deadline - slot.started, 6)
        timeout = TaskTimeout(f"the task outran its timeout of {limit:g}s"
                              if limit is not None else "")
        stack = None
        if self._fail is not None:
            stack = thread_stack(slot.ident)  # the failed store's "traceback"
        self._timed_out(task, timeout, round(time.monotonic() - slot.started, 6), limit,
                        stack)

    def _timed_out(self, task: Task, timeout: TaskTimeout, duration: float,
                   limit: float | None, stack: str | None) -> None:
        """Decide (retry or not), count and log a timeout, for a thread or a coroutine;
        ``_after_timeout`` settles it once the task's code has unwound."""
        delay = self._retry_in(task, timeout)
        task._timeout = timeout
        task._retry_delay = delay
        if delay is None:
            task._stack = stack
        # Counted once settled (_after_timeout), with the running count, as a success.
        task._timed_out_as = (TIMED_OUT if delay is None else RETRIED, duration)
        retry = {} if delay is None else {"retry_in": round(delay, 3)}
        self.logs.main_line(WARNING, "task ended", task_id=task.task_id, task=task.task_name,
                            outcome="timeout", duration=duration, attempt=task.attempt,
                            timeout=limit, **retry)
        task.task_logger.warning("timed out", timeout=limit, attempt=task.attempt, **retry)

    def _after_timeout(self, task: Task, message: Any) -> None:
        task_scope(self.logs, task.task_id)
        if task._retry_delay is not None:
            self._callback(task, "after_retry", task._timeout, task._retry_delay)
            self._send_retry(task, message, task._retry_delay)
        else:
            self._callback(task, "after_timeout")
            error = task._timeout or TaskTimeout()
            keep = self._keeps_result(task, message)
            if keep is None or self._keep_result(task, failure(task, error, task._stack), keep):
                self._final_failure(task, message, error, task._stack)
        outcome, duration = task._timed_out_as
        self._count_settled(outcome, task.task_name, duration)

    def _on_abandon(self, slot: Slot, task: Task, message: Any) -> None:
        """Supervisor thread: *slot*'s thread ignored its TaskTimeout."""
        limit = self.options["max_abandoned"]
        with self._lock:
            self.abandoned += 1
            count = self.abandoned
            self.slots.remove(slot)
        self.logs.main.error(
            "thread abandoned", task_id=task.task_id, task=task.task_name,
            thread=slot.thread.name if slot.thread else None, abandoned=count,
            max_abandoned=limit,
            hint="the task is blocked in C code or a system call; give it a timeout of its own")
        if count > limit:
            self.request_stop("too many abandoned threads", error=TooManyAbandoned(
                f"{count} task threads ignored their timeout (max_abandoned={limit}); "
                f"restart the process to get rid of them"))
        replacement = Slot()
        replacement.handover = (task, message)
        self._spawn(replacement)

    def _interrupted(self, previous: str | None, task: Task, message: Any,
                     started: float) -> None:
        """The drain ended while *task* still ran."""
        duration = round(time.monotonic() - started, 6)
        if previous == TIMEOUT:
            # Timed out and logged, but its thread never unwound: its outcome is
            # final, so it is acked; after_timeout runs here, in the stopping thread.
            # It ignored its timeout like any abandoned thread: stats count it.
            with self._lock:
                self.abandoned += 1
                count = self.abandoned
            self.logs.main.error("thread abandoned", task_id=task.task_id,
                                 task=task.task_name, during="drain", abandoned=count)
            self._after_timeout(task, message)
            return
        self.logs.always.warning("interrupted", task_id=task.task_id, task=task.task_name,
                                 duration=duration, redelivery=self._give_back(message))
        self._done()

    def _reject(self, message: Any, reason: str, detail: str) -> None:
        self.logs.main.error("rejected", reason=reason, detail=detail, message=shown(message))
        # Kept aside by the queue's reject where it has one. A queue that acks
        # but cannot reject gets an ack: the message is logged whole above, and
        # left unacked its lease would bring it back to be rejected forever.
        if callable(self._reject_to) or callable(self._ack):
            try:
                if callable(self._reject_to):
                    self._reject_to(message, reason)
                else:
                    self._ack(message)  # type: ignore[misc]
            except Exception as exc:  # noqa: BLE001
                self.logs.main.error("reject failed", reason=reason, error=_describe(exc),
                                     message=shown(message))
        self._count_settled(REJECTED, _rejected_name(message), None)

    def _give_back(self, message: Any) -> str:
        """Return an unstarted or interrupted message to the queue; say how."""
        requeue = getattr(self.queue, "requeue", None)
        try:
            if callable(requeue):
                requeue(message)
                return "requeued"
            if callable(self._ack):
                return "after the queue's lease"
            self.queue.enqueue(list(message))
            return "enqueued again"
        except Exception as exc:  # noqa: BLE001
            self.logs.always.error("give back failed", error=_describe(exc),
                                   message=repr(message))
            return "failed"

    def _acknowledge(self, task_id: str, message: Any) -> None:
        if callable(self._ack):
            try:
                self._ack(message)
            except Exception as exc:  # noqa: BLE001
                self.logs.main.error("ack failed", task_id=task_id, error=_describe(exc))

    def _callback(self, task: Task, which: str, *args: Any) -> None:
        """The task's own callback, then the engine-wide one; failures are logged."""
        own = getattr(task, which)
        # Task's own no-op default is skipped: most tasks define no callbacks.
        if own is not None and getattr(type(task), which) is not getattr(Task, which):
            try:
                value = own(*args)
                if is_awaitable(value):  # async def: awaited on the engine's loop
                    self.coroutines.await_on_loop(value, task)
            except BaseException as exc:  # noqa: BLE001 - a callback never stops the engine
                self._callback_failed(task, f"{task.task_name}.{which}", exc)
        engine_cb = self.options[which]
        if engine_cb is not None:
            try:
                value = engine_cb(task, *args)
                if is_awaitable(value):
                    self.coroutines.await_on_loop(value, task)
            except BaseException as exc:  # noqa: BLE001 - logged with its traceback
                self._callback_failed(task, f"{self.engine.__name__}.configure.{which}", exc)

    def _callback_failed(self, task: Task, label: str, exc: BaseException) -> None:
        self.logs.main.error("callback failed", task_id=task.task_id, task=task.task_name,
                             callback=label, error=_describe(exc))
        task.task_logger.error("callback failed", callback=label, exc_info=exc)

    def _done(self) -> None:
        with self._lock:
            self.running -= 1

    def healthy(self, now: float, limit: float) -> bool:
        """Whether the dispatcher made progress within *limit* seconds.

        Every worker busy with a task counts as progress: nobody needs to dequeue.
        """
        return now - self.last_progress < limit or self.running >= self.threads

    # -- stats ---------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """The counters and the queue's counts; see Engine.stats."""
        stats = self.counters()
        stats.update(queue_counts(self.queue))
        return stats

    def counters(self) -> dict[str, Any]:
        """The counters of stats(), without asking the queue anything."""
        with self._lock:
            # Taken in a batch but not yet popped by a worker: not running
            # yet (a stop gives them back), so not shown as running.
            prefetched = len(self._taken)
            running = self.running - prefetched
            abandoned, failed_dropped = self.abandoned, self.failed_dropped
            # Under the lock the settled messages are counted in: a snapshot.
            totals = self.tallies.totals()
        return {
            "processed": totals["processed"], "succeeded": totals["succeeded"],
            "failed": totals["failed"], "timed_out": totals["timed_out"],
            "rejected": totals["rejected"], "running": running, "prefetched": prefetched,
            "retried": totals["retried"], "failed_dropped": failed_dropped,
            "threads": self.threads, "abandoned": abandoned,
            **self.coroutines.stats(),
            "uptime": round((self.stopped_at or time.monotonic()) - self.started_at, 3),
        }

    def busy_threads(self) -> int:
        """Worker threads running a task's code now (a sample for the stats line)."""
        return sum(1 for slot in list(self.slots) if slot.busy)

    def running_tasks(self, limit: int) -> list[dict[str, Any]]:
        """Up to *limit* tasks running now, the oldest first: ``task_id``, ``task`` and
        ``started_at`` (POSIX seconds)."""
        offset = time.time() - time.monotonic()
        found: list[tuple[float, str, str]] = []
        for slot in list(self.slots):
            with slot.lock:
                if slot.busy and slot.task is not None:
                    found.append((slot.started, slot.task.task_id, slot.task.task_name))
        found.extend((started, task.task_id, task.task_name)
                     for task, started in self.coroutines.running())
        found.sort()
        return [{"task_id": task_id, "task": name, "started_at": round(started + offset, 6)}
                for started, task_id, name in found[:limit]]


def _rejected_name(message: Any) -> str:
    """The task a rejected *message* is counted under: the registered task it names, else
    UNKNOWN_TASK (so that made-up names cannot grow the metrics without bound)."""
    if isinstance(message, (list, tuple)) and len(message) >= 2:
        name = message[1]
        if type(name) is str and name in _registry:
            return name
    return UNKNOWN_TASK


class _Handed:
    """A kept ack handed to the next leader; compared by identity (see _hand)."""

    __slots__ = ("settling",)

    def __init__(self, settling: tuple[str, Any, str, float]) -> None:
        self.settling = settling


def _fill_id(message: Any, task_id: str) -> None:
    """Write the id the engine gave a message that came without one into the message."""
    if isinstance(message, list) and message and message[0] is None:
        message[0] = task_id


def queue_counts(queue: Any) -> dict[str, Any]:
    """``queued``, ``scheduled`` and ``failed_stored`` for stats(), where the queue counts
    them (None: the count failed)."""
    counts: dict[str, Any] = {}
    for key, count in (("queued", getattr(type(queue), "__len__", None)),
                       ("scheduled", getattr(type(queue), "scheduled_count", None)),
                       ("failed_stored", getattr(type(queue), "failed_count", None))):
        if callable(count):
            try:
                counts[key] = count(queue)
            except Exception:  # noqa: BLE001 - stats must not fail on a flaky queue
                counts[key] = None
    return counts
