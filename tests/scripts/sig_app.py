"""An engine for tests/test_signals.py and tests/test_notify.py.

Run as ``tempest run sig_app:SigEngine --log-dir DIR``. The environment shapes it:

``SIG_DIR``
    folder for the files the tasks and queues write: ``<task_id>.started``
    (a task began), ``acks`` and ``requeued`` (task ids, one a line), and the
    flags the test creates: ``stop_tick`` (tickers return), ``wedge`` (the
    wedge queue's next dequeue blocks forever).
``SIG_QUEUE``
    ``memory`` (default), ``ack`` (acks recorded, no requeue: a reliable queue
    that redelivers after a lease), ``requeue`` (ack and requeue recorded) or
    ``wedge`` (see above; no ack).
``SIG_THREADS``, ``SIG_SHUTDOWN``
    ``threads`` (default 2) and ``shutdown_timeout`` (default 10).
``SIG_TASKS``
    tasks submitted at import, comma-separated, with ids ``t0``, ``t1``, ...:
    ``sleep:SECONDS`` (blocked in ``time.sleep``) or ``tick`` (logs a numbered
    ``tick`` line to the task log every 20 ms until ``stop_tick`` exists).
"""

from __future__ import annotations

import collections
import os
import threading
import time
from pathlib import Path
from typing import Any

from tempest import Engine, Task
from tempest.queues import MemoryQueue

DIR = Path(os.environ.get("SIG_DIR", "."))


_record_lock = threading.Lock()


def _record(kind: str, message: Any) -> None:
    with _record_lock, open(DIR / kind, "a", encoding="utf-8") as file:
        file.write(f"{message[0]}\n")


class SigAckQueue:
    """In-process, with ack (recorded to SIG_DIR/acks): the engine treats it as reliable."""

    def __init__(self) -> None:
        self._items: collections.deque[Any] = collections.deque()
        self._cond = threading.Condition()

    def enqueue(self, message: Any) -> None:
        with self._cond:
            self._items.append(message)
            self._cond.notify()

    def dequeue(self, timeout: float | None = None) -> Any:
        with self._cond:
            if not self._items and timeout:
                self._cond.wait(timeout)
            return self._items.popleft() if self._items else None

    def ack(self, message: Any) -> None:
        _record("acks", message)

    def __len__(self) -> int:
        return len(self._items)


class SigRequeueQueue(SigAckQueue):
    """SigAckQueue with requeue (recorded to SIG_DIR/requeued)."""

    def requeue(self, message: Any) -> None:
        _record("requeued", message)
        self.enqueue(message)


class SigWedgeQueue(MemoryQueue):
    """A MemoryQueue whose dequeue blocks forever once SIG_DIR/wedge exists."""

    def dequeue(self, timeout: float | None = None) -> Any:
        if (DIR / "wedge").exists():
            threading.Event().wait()  # a queue client stuck for good
        return super().dequeue(timeout)


_QUEUES = {"memory": MemoryQueue, "ack": SigAckQueue, "requeue": SigRequeueQueue,
           "wedge": SigWedgeQueue}


class SigEngine(Engine):
    class configure:
        threads = int(os.environ.get("SIG_THREADS", "2"))
        queue = _QUEUES[os.environ.get("SIG_QUEUE", "memory")]()
        shutdown_timeout = float(os.environ.get("SIG_SHUTDOWN", "10"))
        report_every = None


class SigSleeper(Task):
    def process(self, seconds: float) -> None:
        (DIR / f"{self.task_id}.started").touch()
        time.sleep(seconds)


class SigTicker(Task):
    def process(self) -> None:
        (DIR / f"{self.task_id}.started").touch()
        deadline = time.monotonic() + 20
        n = 0
        while not (DIR / "stop_tick").exists() and time.monotonic() < deadline:
            self.task_logger.info("tick", n=n)
            n += 1
            time.sleep(0.02)


for i, spec in enumerate(filter(None, os.environ.get("SIG_TASKS", "").split(","))):
    kind, _, arg = spec.partition(":")
    if kind == "sleep":
        SigEngine.submit(SigSleeper, float(arg), task_id=f"t{i}")
    else:
        SigEngine.submit(SigTicker, task_id=f"t{i}")
