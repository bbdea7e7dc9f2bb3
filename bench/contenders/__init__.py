"""The systems under test, each behind one small interface.

A run drives one contender in a runner process (see :mod:`bench.runner`)::

    setup(ctx)                      connect, build the engine; nothing runs yet
    enqueue("noop") ...             the producer: one thread, workers not running
    start(target)                   workers start; the finish line is at *target* tasks
    wait(timeout) -> (first, last)  when the first task started, the last one ended
    stop(); cleanup()               always called, also after a failure

In-process contenders (the floor, tempest, Huey) run their workers in the
runner process itself; the others start their own worker processes with the
same number of threads. Peer libraries are imported inside the methods, so
this package imports with only tempest installed (the smoke check needs that).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import common

__all__ = ["Context", "Contender", "all_contenders", "by_key"]


@dataclass
class Context:
    """What one run of a contender gets."""

    threads: int
    tmp: Path
    """A directory of this run's own (logs, SQLite files, worker output)."""
    ns: str
    """A name unique to this run: queue names, Redis key prefixes, Postgres queue names."""
    redis_url: str = common.REDIS_URL
    postgres_dsn: str = common.POSTGRES_DSN
    postgres_table: str = common.POSTGRES_TABLE
    """The smoke check uses a table of its own: it may run while the suite does."""


class Contender:
    """One system under test; see the module docstring for the life of a run."""

    key = ""
    """Its name on the command line and in results."""
    label = ""
    """Its name in tables and charts."""
    family = ""
    """``floor``, ``tempest`` or ``peer``."""
    uses_redis = False

    def unavailable(self) -> str | None:
        """Why it cannot run here (a library or a server missing), or None."""
        return None

    def setup(self, ctx: Context) -> None:
        self.ctx = ctx

    def enqueue(self, body: str, *args: float) -> None:
        """Submit one task running ``bench.common.<body>(*args)``."""
        raise NotImplementedError

    def start(self, target: int | None) -> None:
        """Start the workers; *target*: tasks to count (None: latency probes only)."""
        raise NotImplementedError

    def wait(self, timeout: float) -> tuple[float, float]:
        """(first task's start, last task's end), monotonic; TimeoutError after *timeout*."""
        line = common._line
        if not line.done.wait(timeout):
            raise TimeoutError(f"{self.key}: only some of {line.target} tasks finished "
                               f"within {timeout:.0f}s")
        assert line.first is not None and line.last is not None
        return line.first, line.last

    def next_probe(self, timeout: float) -> float:
        """The submit-to-start delay of the probe submitted last (seconds)."""
        return common.next_probe(timeout)

    def engine_pids(self) -> list[int]:
        """The processes whose CPU time is the engine's (idle CPU)."""
        return [os.getpid()]

    def stop(self) -> None:
        """Stop the workers (a graceful stop, bounded)."""

    def cleanup(self) -> None:
        """Give back what setup took: connections, rows, keys."""

    def info(self) -> dict[str, object]:
        """Facts about the run worth recording (engine stats, worker options)."""
        return {}


PREFETCH = 8
"""The ``prefetch`` of the ``tempest-*-prefetch`` contenders: one message held per worker."""


def all_contenders() -> list[Contender]:
    """Every contender, floor first, in the harness's base order."""
    from bench.contenders.inprocess import HueyContender, TempestContender, ThreadPool
    from bench.contenders.workers import CeleryContender, DramatiqContender, RQContender

    return [
        ThreadPool(),
        TempestContender("memory", "WARNING"),
        TempestContender("memory", "INFO"),
        TempestContender("sqlite"),
        TempestContender("redis"),
        TempestContender("postgres"),
        TempestContender("sqlite", prefetch=PREFETCH),
        TempestContender("redis", prefetch=PREFETCH),
        TempestContender("postgres", prefetch=PREFETCH),
        HueyContender("memory"),
        HueyContender("sqlite"),
        HueyContender("redis"),
        DramatiqContender(),
        CeleryContender(),
        RQContender(),
    ]


def by_key(key: str) -> Contender:
    for contender in all_contenders():
        if contender.key == key:
            return contender
    raise KeyError(f"no contender {key!r}")


def wait_for_file(path: Path, timeout: float, proc: object = None,
                  failure: Callable[[], str | None] | None = None) -> None:
    """Wait for *path* to appear, polling every 5 ms; TimeoutError after *timeout*.

    The runner polls while worker processes drain; the times it reports come
    from the workers, so the polling interval does not enter the result.
    *failure* (looked at twice a second) says why the drain cannot finish, if
    it cannot -- a task that raised never counts, and the run would otherwise
    wait out its whole timeout.
    """
    deadline = time.monotonic() + timeout
    look_at = time.monotonic() + 0.5
    while not path.exists():
        if proc is not None and proc.poll() is not None:  # type: ignore[attr-defined]
            raise RuntimeError(f"the worker process exited early with {proc.returncode}")  # type: ignore[attr-defined]
        now = time.monotonic()
        if now > deadline:
            raise TimeoutError(f"{path.name} did not appear within {timeout:.0f}s")
        if failure is not None and now > look_at:
            look_at = now + 0.5
            reason = failure()
            if reason is not None:
                raise RuntimeError(reason)
        time.sleep(0.005)
