"""An engine on a durable queue in a process of its own, for tests/queues/.

Usage: ``python queue_engine.py KIND RESULTS LOG_DIR THREADS LEASE QUEUE_ARG...``

KIND is ``sqlite`` (QUEUE_ARG: the file), ``redis`` (the URL and the queue's
name) or ``postgres`` (the DSN and the table). Runs (not in burst mode) until
SIGTERM, or until it is killed. Each ``QueueRecord`` task appends
``<task_id> <pid> <time.time() at its start>`` to RESULTS, then sleeps for the
seconds its message says; ``QueueFlaky`` (3 retries) appends
``<task_id>#<attempt> ...`` and fails until the attempt its message names;
``QueueEcho`` records its run like ``QueueRecord`` and returns its value doubled;
``QueueARecord`` is ``QueueRecord`` as a coroutine task (``await asyncio.sleep``);
``QueueDone`` sleeps first and records after, so that a run counts once it ended.
``ready`` is printed once the engine is starting its workers. The queues' own
warnings (a Redis ack kept for later, say) go to stderr. With
``TEMPEST_TEST_PERIODIC=SECONDS`` in the environment the engine declares
``every(SECONDS, QueueRecord, 0.0, name="tick")``, and with
``TEMPEST_TEST_CLOCK_SKEW=SECONDS`` its scheduler's clock is that far off (the
queue's is not): an engine on a machine whose clock is wrong.
``TEMPEST_TEST_PREFETCH=N`` sets the engine's ``prefetch`` option.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from typing import Any

from tempest import Engine, Task, every

KIND, RESULTS, LOG_DIR = sys.argv[1:4]
THREADS, LEASE = int(sys.argv[4]), float(sys.argv[5])
ARGS = sys.argv[6:]


def make_queue() -> Any:
    if KIND == "sqlite":
        from tempest.queues import SQLiteQueue
        return SQLiteQueue(*ARGS, lease=LEASE)
    if KIND == "redis":
        from tempest.queues import RedisQueue
        return RedisQueue(*ARGS, lease=LEASE)
    if KIND == "postgres":
        from tempest.queues import PostgresQueue
        return PostgresQueue(*ARGS, lease=LEASE)
    raise SystemExit(f"unknown queue kind {KIND!r}")


QUEUE = make_queue()


def _ready(engine: type[Engine]) -> None:
    print("ready", flush=True)


class QueueEngine(Engine):
    class configure:
        threads = THREADS
        queue = QUEUE
        log_dir = LOG_DIR
        report_every = None
        shutdown_timeout = 5
        after_initialize = _ready
        prefetch = int(os.environ.get("TEMPEST_TEST_PREFETCH") or 0)


def record(run: str) -> None:
    """Append ``<run> <pid> <time.time()>`` to RESULTS."""
    started = time.time()
    # One write with O_APPEND: lines from several processes never interleave.
    fd = os.open(RESULTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{run} {os.getpid()} {started:.6f}\n".encode())
    finally:
        os.close(fd)


class QueueRecord(Task):
    def process(self, pause: float) -> None:
        record(self.task_id)
        time.sleep(pause)


class QueueDone(Task):
    """Sleeps *pause* seconds, then records its run: one killed mid-run is not counted."""

    def process(self, pause: float) -> None:
        time.sleep(pause)
        record(self.task_id)


class QueueFlaky(Task):
    """Records ``<task_id>#<attempt>``, sleeps, and fails until attempt *succeed_on*."""

    class configure:
        retries = 3
        retry_delay = 0.5

    def process(self, succeed_on: int, pause: float) -> None:
        record(f"{self.task_id}#{self.attempt}")
        time.sleep(pause)
        if self.attempt < succeed_on:
            raise ValueError(f"attempt {self.attempt} of {succeed_on}")


class QueueEcho(Task):
    """Records its run, sleeps *pause* seconds, returns *value* doubled (for call())."""

    def process(self, value: int, pause: float) -> int:
        record(self.task_id)
        time.sleep(pause)
        return value * 2


class QueueARecord(Task):
    """QueueRecord as a coroutine: records its run, then awaits *pause* seconds."""

    async def process(self, pause: float) -> None:
        record(self.task_id)
        await asyncio.sleep(pause)


if os.environ.get("TEMPEST_TEST_CLOCK_SKEW"):
    import types

    import tempest.periodic

    _SKEW = float(os.environ["TEMPEST_TEST_CLOCK_SKEW"])
    tempest.periodic.time = types.SimpleNamespace(  # type: ignore[assignment]
        time=lambda: time.time() + _SKEW, monotonic=time.monotonic)

if os.environ.get("TEMPEST_TEST_PERIODIC"):
    class PeriodicQueueEngine(QueueEngine):
        class configure:
            name = "QueueEngine"  # the same log files as without periodic tasks
            periodic = [every(float(os.environ["TEMPEST_TEST_PERIODIC"]), QueueRecord, 0.0,
                              name="tick")]

    ENGINE: type[Engine] = PeriodicQueueEngine
else:
    ENGINE = QueueEngine


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    ENGINE.run()
    QUEUE.close()
    print("returned", flush=True)
