"""An engine on an SQLiteQueue in a process of its own, for tests/queues/test_sqlite.py.

Usage: ``python sqlite_engine.py PATH RESULTS LOG_DIR THREADS LEASE``

Runs (not in burst mode) until SIGTERM, or until it is killed. Each
``SqRecord`` task appends ``<task_id> <pid>`` to RESULTS, then sleeps for the
seconds its message says. ``ready`` is printed once the engine is starting
its workers. The engine renews its leases with the queue's ``heartbeat()``.
"""

from __future__ import annotations

import os
import sys
import time

from tempest import Engine, Task
from tempest.queues.sqlite import SQLiteQueue

PATH, RESULTS, LOG_DIR = sys.argv[1:4]
THREADS, LEASE = int(sys.argv[4]), float(sys.argv[5])
QUEUE = SQLiteQueue(PATH, lease=LEASE)


def _ready(engine: type[Engine]) -> None:
    print("ready", flush=True)


class SqEngine(Engine):
    class configure:
        threads = THREADS
        queue = QUEUE
        log_dir = LOG_DIR
        report_every = None
        shutdown_timeout = 5
        after_initialize = _ready


class SqRecord(Task):
    def process(self, pause: float) -> None:
        # One write with O_APPEND: lines from several processes never interleave.
        fd = os.open(RESULTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{self.task_id} {os.getpid()}\n".encode())
        finally:
            os.close(fd)
        time.sleep(pause)


if __name__ == "__main__":
    SqEngine.run()
    QUEUE.close()
    print("returned", flush=True)
