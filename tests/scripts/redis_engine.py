"""An engine on a RedisQueue in a process of its own, for tests/queues/test_redis.py.

Usage: ``python redis_engine.py URL NAME RESULTS LOG_DIR THREADS LEASE``

Runs (not in burst mode) until SIGTERM, or until it is killed. Each
``RedisRecord`` task appends ``<task_id> <pid>`` to RESULTS, then sleeps for
the seconds its message says. ``ready`` is printed once the engine is starting
its workers. The queue's own warnings (deferred acks, lost leases) go to stderr.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from tempest import Engine, Task
from tempest.queues.redis import RedisQueue

URL, NAME, RESULTS, LOG_DIR = sys.argv[1:5]
THREADS, LEASE = int(sys.argv[5]), float(sys.argv[6])
QUEUE = RedisQueue(URL, NAME, lease=LEASE)


def _ready(engine: type[Engine]) -> None:
    print("ready", flush=True)


class RedisEngine(Engine):
    class configure:
        threads = THREADS
        queue = QUEUE
        log_dir = LOG_DIR
        report_every = None
        shutdown_timeout = 5
        after_initialize = _ready


class RedisRecord(Task):
    def process(self, pause: float) -> None:
        # One write with O_APPEND: lines from several processes never interleave.
        fd = os.open(RESULTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{self.task_id} {os.getpid()}\n".encode())
        finally:
            os.close(fd)
        time.sleep(pause)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    RedisEngine.run()
    QUEUE.close()
    print("returned", flush=True)
