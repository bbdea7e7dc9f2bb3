"""The engine of the chaos soak (:mod:`bench.chaos`), one per process.

``python -m tempest run bench.apps.chaos_engine:ChaosEngine --log-dir DIR``, from
the checkout, with its queue in the environment:

``CHAOS_KIND``
    ``sqlite``, ``redis`` or ``postgres``;
``CHAOS_TARGET``
    the SQLite file, the Redis URL or the PostgreSQL DSN;
``CHAOS_NAME``
    the Redis queue's name, or the PostgreSQL table;
``CHAOS_RECORDS``
    the folder of the record files (below);
``CHAOS_THREADS``, ``CHAOS_LEASE``
    worker threads (default 4) and the queue's lease in seconds (default 5);
``CHAOS_PREFETCH``
    the engine's ``prefetch`` option (default 0).

Each :class:`ChaosTask` sleeps the seconds its message says, then appends
``<task_id> <time.time()>`` to ``records-<pid>.txt`` in ``CHAOS_RECORDS``: a run
is recorded once it has finished, before the engine acks it. The file is
opened once, ``O_APPEND``, and each record is one ``write()``: once the call
returns the line is in the kernel's page cache, so it survives a SIGKILL of
this process (only a crash of the machine could lose it), and lines written
by different threads never interleave. A file per process keeps the engines
from contending for anything but the queue under test.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import tempest
from tempest import Engine, Task

KIND = os.environ.get("CHAOS_KIND", "sqlite")
TARGET = os.environ.get("CHAOS_TARGET", "chaos.db")
NAME = os.environ.get("CHAOS_NAME", "bench_chaos")
LEASE = float(os.environ.get("CHAOS_LEASE", "5"))
THREADS = int(os.environ.get("CHAOS_THREADS", "4"))
PREFETCH = int(os.environ.get("CHAOS_PREFETCH", "0"))
RECORDS = Path(os.environ.get("CHAOS_RECORDS", "."))


def make_queue() -> Any:
    """The queue the environment names (the driver imported only for its kind)."""
    if KIND == "sqlite":
        from tempest.queues import SQLiteQueue

        return SQLiteQueue(TARGET, lease=LEASE)
    if KIND == "redis":
        from tempest.queues import RedisQueue

        return RedisQueue(TARGET, NAME, lease=LEASE)
    if KIND == "postgres":
        from tempest.queues import PostgresQueue

        return PostgresQueue(TARGET, NAME, lease=LEASE)
    raise SystemExit(f"CHAOS_KIND: unknown queue kind {KIND!r}")


print(f"tempest {tempest.__version__} from {Path(tempest.__file__).parent}", flush=True)

_fd = os.open(RECORDS / f"records-{os.getpid()}.txt",
              os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


class ChaosEngine(Engine):
    class configure:  # noqa: N801 - the configure block's spelling
        threads = THREADS
        prefetch = PREFETCH
        queue = make_queue()
        report_every = None
        shutdown_timeout = 5
        log_level = "INFO"  # "dequeue recovered" and "heartbeat recovered" are INFO lines


class ChaosTask(Task):
    """Sleep *pause* seconds, then record the run (see the module docstring)."""

    def process(self, pause: float) -> None:
        if pause:
            time.sleep(pause)
        os.write(_fd, f"{self.task_id} {time.time():.6f}\n".encode())
