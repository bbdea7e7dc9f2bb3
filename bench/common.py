"""What every contender shares: the task bodies, the finish line, /proc readings.

Standard library only: :mod:`bench.smoke` imports this in the project's own
virtual environment, where no peer is installed.

The finish line
---------------
Every contender runs the same task bodies (:func:`noop`, :func:`sleep`,
:func:`probe`), whichever system calls them. A body marks the first task's
start and counts the finished ones; the task that brings the count to the
target notes the time. A drain is timed from the first task's start to the
last task's end, by the clock of the process that runs the tasks: start-up
(threads, imports, connections) is left out for every contender alike, and
nobody polls while the drain runs. ``CLOCK_MONOTONIC`` is system-wide on Linux,
so the times a worker process notes compare with the harness's.

What a body costs -- one ``is None`` test, one ``itertools.count`` step (atomic
under the GIL) -- is the same for every contender and far below a task
system's own cost per task. A contender whose tasks run in several processes
(RQ's worker pool) needs a count that all of them share: see
:mod:`bench.contenders.remote`.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
"""The checkout: worker subprocesses run here so that ``import bench`` works."""

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/15")
"""Database 15, shared with tempest's tests: every key the bench makes carries
its run's namespace (``bench-<run>-...``) and is deleted afterwards."""

POSTGRES_DSN = os.environ.get("BENCH_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
POSTGRES_TABLE = "bench_messages"

THREADS = 8
SLEEP = 0.01
"""Seconds each task of the sleep scenario sleeps."""

SLEEPS = {"sleep": SLEEP, "sleep1": 0.001}
"""The sleeping bodies and how long each sleeps: 10 ms (the targets' scenario) and 1 ms."""


class FinishLine:
    """When the first task started, when the *target*-th one ended."""

    def __init__(self, target: int, on_done: Callable[[FinishLine], None] | None = None
                 ) -> None:
        self.target = target
        self.first: float | None = None
        self.last: float | None = None
        self.done = threading.Event()
        self.slept: list[float] = []
        """Seconds each :func:`sleep` task's sleep took (list.append is atomic)."""
        self._count = itertools.count(1)
        self._on_done = on_done

    def begin(self) -> None:
        if self.first is None:
            self.first = time.monotonic()

    def end(self) -> None:
        if next(self._count) == self.target:
            self.last = time.monotonic()
            self.done.set()
            if self._on_done is not None:
                self._on_done(self)


_line = FinishLine(0)
_probes: queue.SimpleQueue[float] = queue.SimpleQueue()
_probe_sink: Callable[[float], None] = _probes.put


def arm(target: int, on_done: Callable[[FinishLine], None] | None = None) -> FinishLine:
    """A fresh finish line for the next *target* tasks of this process."""
    global _line
    _line = FinishLine(target, on_done)
    return _line


def current_line() -> FinishLine:
    """The finish line armed last in this process."""
    return _line


def set_probe_sink(sink: Callable[[float], None]) -> None:
    """Where :func:`probe` reports its delay (a worker process sends it to Redis)."""
    global _probe_sink
    _probe_sink = sink


def next_probe(timeout: float) -> float:
    """The delay the next probe task reported in this process; queue.Empty on timeout."""
    return _probes.get(timeout=timeout)


# -- the task bodies ---------------------------------------------------------------


def noop() -> None:
    """The no-op task: it only crosses the finish line."""
    line = _line
    line.begin()
    line.end()


def sleep() -> None:
    """The I/O-bound task: sleeps SLEEP seconds, releasing the GIL.

    It notes how long the sleep took (in this process), so that a drain's
    shortfall splits into the sleep's own overshoot and the time a worker
    spends between two tasks.
    """
    _sleep(SLEEP)


def sleep1() -> None:
    """The short I/O-bound task: sleeps 1 ms, noted as :func:`sleep` notes it."""
    _sleep(SLEEPS["sleep1"])


def _sleep(seconds: float) -> None:
    line = _line
    line.begin()
    began = time.monotonic()
    time.sleep(seconds)
    line.slept.append(time.monotonic() - began)
    line.end()


def probe(submitted: float) -> None:
    """The latency task: reports how long after *submitted* (monotonic) it started."""
    _probe_sink(time.monotonic() - submitted)


# -- /proc ----------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces: split after its closing paren.
    return text[text.rindex(")") + 2:].split()


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of *pids* (all their threads); vanished pids count 0."""
    total = 0
    for pid in pids:
        fields = _stat(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _TICK


def process_tree(root: int) -> list[int]:
    """*root* and every live descendant."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size now."""
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE


def peak_rss_bytes(pid: int | str = "self") -> int:
    """Peak resident set size (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


# -- services and coordination --------------------------------------------------------


def redis_reachable(url: str = REDIS_URL, timeout: float = 2.0) -> str | None:
    """None if Redis answers PING at *url*, else why not (raw socket: no driver needed)."""
    from urllib.parse import urlparse

    parts = urlparse(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379),
                                      timeout=timeout) as conn:
            conn.sendall(b"PING\r\n")
            if not conn.recv(64).startswith(b"+PONG"):
                return f"Redis at {url} did not answer PING"
    except OSError as exc:
        return f"no Redis at {url}: {exc}"
    return None


def postgres_reachable(dsn: str = POSTGRES_DSN) -> str | None:
    """None if PostgreSQL accepts a connection at *dsn*, else why not."""
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed"
    try:
        psycopg.connect(dsn, connect_timeout=2).close()
    except Exception as exc:  # noqa: BLE001 - any failure means: skip it
        return f"no PostgreSQL at {dsn}: {exc}"
    return None


def delete_redis_keys(ns: str, url: str = REDIS_URL) -> int:
    """Delete every key at *url* whose name holds *ns*; how many."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        deleted = 0
        for key in client.scan_iter(match=f"*{ns}*", count=1000):
            deleted += client.delete(key)
        return deleted
    finally:
        client.close()


@contextmanager
def turn(path: str | None) -> Iterator[None]:
    """Hold the machine-wide turn at *path* (an flock), so that probes never overlap.

    Latency runners idle side by side and take turns to probe; None: no turns.
    """
    if path is None:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write *data* so that a reader polling for *path* never sees half of it."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as handle:
        json.dump(data, handle)
    os.replace(tmp, path)


def percentile(values: list[float], q: float) -> float:
    """The *q*-th percentile (0-100), linear between closest ranks."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)
