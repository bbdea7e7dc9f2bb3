"""MemoryQueue against the queue contract that every built-in queue runs."""

from __future__ import annotations

from typing import Any

from tempest.queues import MemoryQueue
from tempest.testing import QueueContract


class TestMemoryQueueContract(QueueContract):
    """MemoryQueue: every handle in one test is the same in-process queue."""

    def make_queue(self, **options: Any) -> MemoryQueue:
        if not hasattr(self, "_memory"):
            self._memory = MemoryQueue()
        return self._memory

    def put_raw(self, queue: MemoryQueue, raw: bytes) -> None:
        queue.enqueue(raw)  # type: ignore[arg-type]
