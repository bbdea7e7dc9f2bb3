"""Worker-side modules of the peers that run in worker processes of their own
(and ``chaos_engine``, the engine of :mod:`bench.chaos`, which reads only its own
``CHAOS_*`` variables).

Each module is what the peer's command line imports (``celery -A``,
``dramatiq``, ``rq worker-pool``) and what the runner imports to enqueue; both
sides read their namespace from the environment the runner sets:

``BENCH_NS``
    this run's name: queue names and Redis key prefixes;
``BENCH_REDIS_URL``
    the Redis both sides use;
``BENCH_ROLE=worker``
    set only in the worker processes: arm the finish line at ``BENCH_TARGET``
    tasks, written to ``BENCH_RESULT`` (JSON) when crossed, and send probe
    delays to the Redis list ``<BENCH_NS>:probes``.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from bench import common

NS = os.environ.get("BENCH_NS", "bench_unset")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", common.REDIS_URL)
WORKER = os.environ.get("BENCH_ROLE") == "worker"

_client: Any = None
_client_pid = 0
_client_lock = threading.Lock()


def redis_client() -> Any:
    """This process's Redis client (a forked child makes its own)."""
    global _client, _client_pid
    with _client_lock:
        if _client is None or _client_pid != os.getpid():
            import redis

            _client = redis.Redis.from_url(REDIS_URL)
            _client_pid = os.getpid()
        return _client


def _send_probe(delay: float) -> None:
    redis_client().rpush(f"{NS}:probes", repr(delay))


def _write_result(line: common.FinishLine) -> None:
    common.write_json(os.environ["BENCH_RESULT"], {"first": line.first, "last": line.last})


class SharedFinishLine:
    """A finish line counted in Redis, for tasks spread over several processes.

    Each process notes its first task's start in a list (the runner takes the
    earliest); every end is one INCR. That round trip is a cost the in-process
    count does not have: it is charged to RQ only, the one peer that needs it.
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.slept: list[float] = []  # common.sleep notes here; this process's only, unused
        self._began = False

    def begin(self) -> None:
        if not self._began:
            self._began = True
            redis_client().rpush(f"{NS}:firsts", repr(time.monotonic()))

    def end(self) -> None:
        if redis_client().incr(f"{NS}:count") == self.target:
            common.write_json(os.environ["BENCH_RESULT"], {"first": None,
                                                          "last": time.monotonic()})


def configure_worker(shared: bool = False) -> None:
    """In a worker process: arm the finish line and send probes to Redis."""
    if not WORKER:
        return
    target = int(os.environ.get("BENCH_TARGET", "0"))
    if target:
        if shared:
            common._line = SharedFinishLine(target)  # type: ignore[assignment]
        else:
            common.arm(target, _write_result)
    common.set_probe_sink(_send_probe)
