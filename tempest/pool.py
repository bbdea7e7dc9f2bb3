"""Worker slots, the deadline supervisor and timeout injection.

Who decides a message's outcome
-------------------------------
Each worker thread owns a :class:`Slot`. While the thread runs a task, three
parties may want to decide how that run ends:

- the worker itself, when ``process`` returns or raises (success/failure);
- the :class:`Supervisor`, when the deadline passes (timeout);
- the engine's stop, when the drain deadline passes (interrupted).

Each decision is a *claim* made under the slot's lock: the first claim of a
run wins and the others see it and back off. That is what makes the outcome
exactly-once whatever order the threads get to run in.

Raising TaskTimeout in another thread
-------------------------------------
The supervisor raises :class:`TaskTimeout` in the worker with CPython's
``PyThreadState_SetAsyncExc``. The exception is delivered the next time the
worker executes Python bytecode, which may be *after* ``process`` has already
returned. So:

- the supervisor injects only while holding the slot lock and only if nobody
  claimed the run yet, and marks the claim in the same critical section;
- the worker, once ``process`` is over, claims under the lock (see
  :meth:`Slot.settle`): after that, no new injection can happen, and it clears
  a pending one that has not fired yet. A TaskTimeout firing anywhere in that
  window is caught and the settle simply retried, so an injection can never
  escape into the worker's own code or into the next task.

A thread blocked in C code (``time.sleep``, a socket read without a timeout)
only sees the exception when it returns to Python. If it has not unwound
``grace`` seconds after the deadline it is *abandoned*: the engine counts it,
starts a replacement, and discards whatever the old thread does later.
"""

from __future__ import annotations

import ctypes
import heapq
import itertools
import threading
import time
from collections.abc import Callable
from typing import Any

from tempest.exceptions import TaskTimeout

__all__ = ["ABANDONED", "INTERRUPTED", "TIMEOUT", "WORKER", "Slot", "Supervisor"]

# Claims on a run.
WORKER = "worker"
TIMEOUT = "timeout"
INTERRUPTED = "interrupted"
ABANDONED = "abandoned"

# Two prototypes of the same C function: one passes an exception type, the
# other NULL (which clears a pending exception). PYFUNCTYPE keeps the GIL held.
_set_async_exc = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.py_object)(
    ("PyThreadState_SetAsyncExc", ctypes.pythonapi))
_clear_async_exc = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)(
    ("PyThreadState_SetAsyncExc", ctypes.pythonapi))


def inject(thread_id: int, exc_type: type[BaseException]) -> bool:
    """Ask thread *thread_id* to raise *exc_type* at its next bytecode."""
    return bool(_set_async_exc(thread_id, exc_type) == 1)


def clear_pending(thread_id: int) -> None:
    """Drop an exception injected into *thread_id* that has not fired yet."""
    _clear_async_exc(thread_id, None)


class Slot:
    """One worker thread's state, guarded by its lock.

    ``run`` counts the runs; a supervisor entry names the run it was made for,
    so an entry for an earlier run never touches a later one.
    """

    __slots__ = (
        "armed",
        "busy",
        "claim",
        "deadline",
        "handover",
        "ident",
        "lock",
        "message",
        "run",
        "scheduled",
        "settling",
        "started",
        "tally",
        "task",
        "thread",
    )

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ident = 0
        self.thread: threading.Thread | None = None
        self.run = 0
        self.busy = False
        self.claim: str | None = None
        self.task: Any = None
        self.message: Any = None
        self.started = 0.0
        self.deadline: float | None = None
        self.handover: Any = None
        """Work a replacement thread finishes first: the abandoned run's timeout."""
        self.scheduled: float | None = None
        """When the supervisor will look at this slot next (its lock guards this)."""
        self.armed = False
        """Whether the current run asked to be watched (only then may it time out)."""
        self.settling: Any = None
        """A finished run whose ack waits for this thread's next dequeue, to travel with
        it (see "Acks with the next dequeue" in tempest.runtime); only its thread uses it."""
        self.tally: Any = None
        """The outcome counts of this slot's thread (a tempest.tally.Tally, set by it)."""

    def begin(self, task: Any, message: Any, timeout: float | None, engine: Any
              ) -> int | None:
        """Mark a run as started; None if *engine* (a Runtime) closed meanwhile."""
        with self.lock:
            if engine.closed:
                return None
            self.run += 1
            self.busy = True
            self.armed = False
            self.claim = None
            self.task = task
            self.message = message
            self.started = time.monotonic()
            self.deadline = None if timeout is None else self.started + timeout
            return self.run

    def settle(self) -> str:
        """Claim the finished run for the worker; return whoever claimed it.

        Safe against a TaskTimeout fired at any point inside: the body is
        idempotent and simply runs again.
        """
        while True:
            try:
                with self.lock:
                    self.busy = False
                    if self.claim is None:
                        self.claim = WORKER
                    claim = self.claim
                if claim != WORKER:
                    clear_pending(self.ident)
                return claim
            except TaskTimeout:
                continue

    def expire(self, now: float, on_timeout: Callable[[Slot], None]) -> float | None:
        """The supervisor's look at the slot: time out its run if past the deadline.

        Claims the run as timed out and raises TaskTimeout in it, then returns
        None; returns the current run's later deadline if it has not come yet
        (the look was scheduled for an earlier run), None if there is nothing
        to watch. *on_timeout* (which logs the outcome) runs inside the critical
        section, so the timeout line is written before the worker can settle
        and run ``after_timeout``: the log reads in the order things happened.
        """
        with self.lock:
            # Not armed: the look was scheduled for an earlier run and the
            # current one has not reached its try block yet; its own watch()
            # schedules the next look.
            if (not self.busy or self.claim is not None or self.deadline is None
                    or not self.armed):
                return None
            if self.deadline > now:
                return self.deadline
            self.claim = TIMEOUT
            on_timeout(self)
            inject(self.ident, TaskTimeout)
            return None

    def try_abandon(self, run: int) -> tuple[Any, Any] | None:
        """After the grace: if *run* still has not unwound, abandon it.

        Returns the run's (task, message) for the replacement thread to finish.
        """
        with self.lock:
            if self.run != run or not self.busy or self.claim != TIMEOUT:
                return None
            self.claim = ABANDONED
            return self.task, self.message

    def interrupt(self) -> tuple[str | None, Any, Any, float] | None:
        """At the end of a drain: take over a run still going.

        Returns (previous claim, task, message, started) or None if idle. A run
        nobody claimed becomes INTERRUPTED; one that timed out but has not
        unwound becomes ABANDONED (its outcome is already logged).
        """
        with self.lock:
            if not self.busy or self.claim in (INTERRUPTED, ABANDONED):
                return None
            previous = self.claim
            self.claim = INTERRUPTED if previous is None else ABANDONED
            return previous, self.task, self.message, self.started


class Supervisor:
    """One thread that enforces deadlines, sleeping until the next one.

    The heap holds at most about one entry per slot: a worker starting a run
    adds an entry only if the slot has none due by its deadline. An entry
    left by an earlier run (which finished in time) is not removed; when it
    comes due the supervisor finds the slot's current deadline later and
    moves the entry there. So the heap stays as small as the pool however
    many tasks per second run with however long a timeout, and starting a
    task costs one lock and, at most, one push.
    """

    def __init__(
        self,
        on_timeout: Callable[[Slot], None],
        on_abandon: Callable[[Slot, Any, Any], None],
        grace: float,
    ) -> None:
        self._on_timeout = on_timeout
        self._on_abandon = on_abandon
        self.grace = grace
        # (when, seq, slot, run): run is None for a deadline look, else the
        # run whose grace ends then.
        self._heap: list[tuple[float, int, Slot, int | None]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition(threading.Lock())
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="tempest-supervisor",
                                        daemon=True)

    def start(self) -> None:
        """Start the supervising thread."""
        self._thread.start()

    def watch(self, slot: Slot, deadline: float, *, arm: bool = True) -> None:
        """Look at *slot* at *deadline* (monotonic seconds), unless a look is due sooner.

        Called by the worker inside the block that handles TaskTimeout: from
        here on its run may be timed out. The supervisor moving a look passes
        ``arm=False``: by then the slot may hold a newer run, not armed yet.
        """
        with self._cond:
            if arm:
                slot.armed = True
            if slot.scheduled is not None and slot.scheduled <= deadline:
                return
            slot.scheduled = deadline
            self._push(deadline, slot, None)

    def _push(self, when: float, slot: Slot, run: int | None) -> None:
        heapq.heappush(self._heap, (when, next(self._seq), slot, run))
        if self._heap[0][2] is slot:
            self._cond.notify()

    def stop(self) -> None:
        """Stop supervising and end the thread."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(5.0)

    def pending(self) -> int:
        """Entries in the heap (bounded by about the number of slots)."""
        with self._cond:
            return len(self._heap)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopped:
                    if not self._heap:
                        self._cond.wait()
                        continue
                    delay = self._heap[0][0] - time.monotonic()
                    if delay <= 0:
                        break
                    self._cond.wait(delay)
                if self._stopped:
                    return
                when, _, slot, run = heapq.heappop(self._heap)
                if run is None and slot.scheduled == when:
                    slot.scheduled = None
            # Outside the condition's lock: the handlers take the slot's lock
            # and log; watch() must never wait behind them.
            if run is not None:
                taken = slot.try_abandon(run)
                if taken is not None:
                    self._on_abandon(slot, *taken)
                continue
            later = slot.expire(time.monotonic(), self._on_timeout)
            if later is not None:
                self.watch(slot, later, arm=False)
            elif slot.claim == TIMEOUT:
                with self._cond:
                    self._push(time.monotonic() + self.grace, slot, slot.run)
