"""MemoryQueue: a thread-safe in-process queue."""

from __future__ import annotations

import queue
import threading
from typing import Any

__all__ = ["MemoryQueue"]


class MemoryQueue:
    """A thread-safe first-in, first-out queue living in this process.

    Fast and dependency-free, for tests, scripts and work that may be lost
    with the process: delivery is at-most-once (it has no ``ack``). A waiting
    ``dequeue(timeout=...)`` wakes the moment a message is enqueued and holds
    no lock that ``enqueue`` would need.

    Messages the engine rejects (bad input) are kept aside: ``rejected()``
    lists them with their reasons.
    """

    def __init__(self) -> None:
        # SimpleQueue is implemented in C: put() never blocks, and get() with
        # a timeout waits on a semaphore without polling.
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._rejected: list[tuple[Any, str]] = []
        self._rejected_lock = threading.Lock()

    def enqueue(self, message: Any) -> None:
        """Append *message*."""
        self._queue.put(message)

    def dequeue(self, timeout: float | None = None) -> Any:
        """Take the oldest message, waiting up to *timeout* seconds; None if empty."""
        try:
            if timeout is not None and timeout > 0:
                return self._queue.get(timeout=timeout)
            return self._queue.get_nowait()
        except queue.Empty:
            return None

    def dequeue_many(self, count: int, timeout: float | None = None) -> list[Any]:
        """Take up to *count* messages, waiting up to *timeout* seconds for the first."""
        first = self.dequeue(timeout)
        if first is None:
            return []
        messages = [first]
        get = self._queue.get_nowait
        try:
            while len(messages) < count:
                messages.append(get())
        except queue.Empty:
            pass
        return messages

    def requeue(self, message: Any) -> None:
        """Give back a message that was dequeued but not run (at the back)."""
        self._queue.put(message)

    def reject(self, message: Any, reason: str) -> None:
        """Keep a message the engine could not run, with the reason."""
        with self._rejected_lock:
            self._rejected.append((message, reason))

    def rejected(self) -> list[tuple[Any, str]]:
        """The rejected messages so far, oldest first, as (message, reason)."""
        with self._rejected_lock:
            return list(self._rejected)

    def __len__(self) -> int:
        """Messages waiting."""
        return self._queue.qsize()

    def __repr__(self) -> str:
        return f"<MemoryQueue waiting={len(self)}>"
