"""Task results: the records a worker stores, what ``Engine.result`` does with them,
and the in-process store behind ``MemoryQueue``.

A result is kept only for a message that asks for one (``Engine.call``, or a
task with ``store_result = True``): the engine stores such a message with
``schedule(..., result_ttl=T)``, the worker reads ``queue.result_ttl(m)`` and,
once the outcome is final, calls ``queue.store_result(task_id, record, ttl=T)``
and only then settles the message. So a result is at-least-once like the task
itself: a crash between the two runs the task again, and the new result
replaces the first. Messages that ask for nothing pay nothing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import json
import math
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from tempest.exceptions import TaskFailed, Unsupported
from tempest.queues import protocol
from tempest.retries import failed_record

if TYPE_CHECKING:
    from tempest.task import Task

__all__ = ["MemoryResults", "await_result", "check_timeout", "failure", "in_thread",
           "json_value", "missing_methods", "outcome", "require", "success", "wait"]

_T = TypeVar("_T")

_ASYNC_SLICE = 1.0
"""Seconds one thread of an ``aresult`` waits at most before the coroutine looks
again: a cancelled ``aresult`` leaves its thread busy for no longer than this."""

_WAITERS = concurrent.futures.ThreadPoolExecutor(max_workers=64,
                                                 thread_name_prefix="tempest-aresult")
"""The threads that ``aresult`` waits in, off the event loop (at most 64 at a time;
more waiting coroutines take their turn, their results kept meanwhile)."""


def missing_methods(queue: Any) -> list[str]:
    """The result methods (see the protocol) that *queue* lacks."""
    return [name for name in protocol.RESULT_METHODS if not callable(getattr(queue, name, None))]


def require(engine: str, queue: Any, call: str) -> None:
    """Unsupported, naming *call*, the queue and what it lacks, if it keeps no results."""
    lacking = missing_methods(queue)
    if lacking:
        raise Unsupported(
            f"{engine}.{call}: the queue {type(queue).__name__} has no "
            f"{', '.join(name + '()' for name in lacking)}, so it keeps no task results; "
            f"nothing was enqueued. Use a built-in queue, or add the result methods to "
            f"yours (see tempest.queues.protocol)")


def check_timeout(timeout: object) -> float | None:
    """*timeout* as seconds (None: no limit); TypeError or ValueError if it is not."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be seconds (a number >= 0) or None, not {timeout!r}")
    if math.isnan(timeout) or timeout < 0:
        raise ValueError(f"timeout must be a number >= 0 or None, not {timeout!r}")
    return None if timeout == math.inf else float(timeout)


# -- the worker's side ------------------------------------------------------------------


def json_value(task: Task, value: Any) -> Any:
    """*value* as JSON gives it back; TypeError naming the task and type if it is not JSON."""
    kind = type(value)
    if kind is int or kind is str or kind is bool or value is None or (
            kind is float and math.isfinite(value)):
        return value  # JSON gives these back as they are: no round trip
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError, RecursionError):
        raise TypeError(
            f"{task.task_name}.process returned {type(value).__name__} ({value!r:.80}), "
            f"which is not JSON-serializable: a stored result must be JSON (str, int, "
            f"float, bool, None, lists and dicts of them)") from None


def success(task: Task, value: Any) -> dict[str, Any]:
    """The result record of *task*'s successful attempt that returned *value* (JSON)."""
    return {"task_id": task.task_id, "task": task.task_name, "state": "succeeded",
            "value": value, "error_type": None, "error": None, "traceback": None,
            "attempts": task.attempt, "finished_at": time.time()}


def failure(task: Task, error: BaseException, stack: str | None = None) -> dict[str, Any]:
    """The result record of *task*'s last attempt, which ended with *error*."""
    failed = failed_record(task, error, stack)
    return {"task_id": task.task_id, "task": task.task_name, "state": "failed",
            "value": None, "error_type": failed["error_type"], "error": failed["error"],
            "traceback": failed["traceback"], "attempts": task.attempt,
            "finished_at": failed["last_failed_at"]}


# -- the caller's side ------------------------------------------------------------------


def outcome(record: dict[str, Any]) -> Any:
    """The return value a result record holds; TaskFailed if it records a failure."""
    if record.get("state") == "succeeded":
        return record.get("value")
    raise TaskFailed(record.get("task_id", "?"), record.get("error_type") or "Error",
                     record.get("error") or "", record.get("traceback") or "",
                     int(record.get("attempts") or 1))


def wait(queue: Any, task_id: str, timeout: float | None) -> Any:
    """*task_id*'s return value, waiting up to *timeout* seconds (see Engine.result)."""
    record = queue.result(task_id, timeout)
    if record is None:
        raise TimeoutError(_late(task_id, timeout))
    return outcome(record)


async def await_result(queue: Any, task_id: str, timeout: float | None) -> Any:
    """``wait`` for a coroutine: the waits run in threads, the event loop goes on.

    Each thread waits at most ``_ASYNC_SLICE`` seconds, then the coroutine
    looks at its deadline and waits again, so cancelling it frees its thread
    within that slice.
    """
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        left = _ASYNC_SLICE if deadline is None else max(0.0, deadline - time.monotonic())
        piece = min(left, _ASYNC_SLICE)
        record = await loop.run_in_executor(_WAITERS, queue.result, task_id, piece)
        if record is not None:
            return outcome(record)
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(_late(task_id, timeout))


async def in_thread(function: Callable[..., _T], *args: Any) -> _T:
    """``function(*args)`` in a thread of the waiting pool, awaited."""
    return await asyncio.get_running_loop().run_in_executor(_WAITERS, function, *args)


def _late(task_id: str, timeout: float | None) -> str:
    return (f"no result for task {task_id} within {timeout:g}s (the task has not finished, "
            f"or its result expired, or it was not asked for)")


# -- MemoryQueue's store -----------------------------------------------------------------


class MemoryResults:
    """Result records in this process: a dict, and an event per waiting ``result`` call.

    Records are kept as JSON text, so a caller gets what a durable queue would
    give back, a copy of its own. Expired records are dropped by the next
    ``store`` (those due first, all that are due), never returned before.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, tuple[float, str]] = {}  # id -> (expires_at, JSON)
        self._expiry: list[tuple[float, str]] = []  # (expires_at, task_id), a heap
        self._waiters: dict[str, list[threading.Event]] = {}

    def store(self, task_id: str, record: dict[str, Any], *, ttl: float) -> None:
        """Keep *record* for *ttl* seconds as *task_id*'s result; wake its waiters."""
        now = time.time()
        expires_at = now + ttl
        text = json.dumps({**record, "expires_at": expires_at}, allow_nan=False)
        with self._lock:
            self._records[task_id] = (expires_at, text)
            heapq.heappush(self._expiry, (expires_at, task_id))
            while self._expiry and self._expiry[0][0] <= now:
                _, old = heapq.heappop(self._expiry)
                kept = self._records.get(old)
                if kept is not None and kept[0] <= now:
                    del self._records[old]
            waiters = self._waiters.pop(task_id, [])
        for event in waiters:
            event.set()

    def get(self, task_id: str, timeout: float | None = None) -> dict[str, Any] | None:
        """*task_id*'s record, waiting up to *timeout* seconds (None: no limit)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            event = threading.Event()
            with self._lock:
                record = self._live(task_id)
                if record is not None:
                    return record
                if deadline is not None and time.monotonic() >= deadline:
                    return None
                self._waiters.setdefault(task_id, []).append(event)
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not event.wait(left):
                with self._lock:
                    waiting = self._waiters.get(task_id)
                    if waiting is not None and event in waiting:
                        waiting.remove(event)
                        if not waiting:
                            del self._waiters[task_id]
                    return self._live(task_id)  # stored at the last moment, or None

    def _live(self, task_id: str) -> dict[str, Any] | None:
        """Under _lock: *task_id*'s record (a fresh copy) unless it expired."""
        kept = self._records.get(task_id)
        if kept is None or kept[0] <= time.time():
            return None
        return json.loads(kept[1])  # type: ignore[no-any-return]
