"""A short chaos soak: engine processes killed with SIGKILL while the queue's server
goes away, on SQLite, Redis and PostgreSQL. Nothing submitted is lost, no engine hangs,
and the engines that saw the outage come back by themselves.

The long version, 50,000 tasks a queue with a kill every 1-4 s, is ``python -m
bench.chaos`` (bench/README.md, "Chaos soak"); this one shares no code with it, so
that the suite needs nothing from bench/.venv.
"""

from __future__ import annotations

import collections
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .conftest import service_unavailable, wait_for
from .queues.engines import EngineProcesses

TASKS = 2000
PAUSE = 0.005
"""Seconds each task sleeps before it records its run (``QueueDone``)."""
ENGINES, THREADS, LEASE = 3, 2, 2.0
KILLS_AT = (0.15, 0.35, 0.7)
"""Fractions of the tasks run at which a random engine is killed and a new one started."""
OUTAGE_AT = 0.5
QUEUE_NAME = "chaos"


@dataclass
class Target:
    """One queue under test: the engines' arguments, a producer, and its outage."""

    kind: str
    queue_args: list[str]
    producer: Any
    left: Callable[[], int]
    outage: Callable[[list[subprocess.Popen[bytes]], list[Path]], None] | None = None
    cleanup: list[Callable[[], None]] = field(default_factory=list)


def _sqlite(tmp_path: Path) -> Target:
    from tempest.queues import SQLiteQueue

    path = tmp_path / "chaos.db"

    def left() -> int:
        conn = sqlite3.connect(path, timeout=10)
        try:
            return int(conn.execute("SELECT count(*) FROM tempest_messages").fetchone()[0])
        finally:
            conn.close()

    producer = SQLiteQueue(path)
    return Target("sqlite", [str(path)], producer, left, cleanup=[producer.close])


def _redis(tmp_path: Path) -> Target:
    binary = shutil.which("redis-server")
    if binary is None:
        service_unavailable("redis-server is not on PATH")
    try:
        import redis
    except ImportError:
        service_unavailable("the redis driver is not installed: pip install -e '.[test]'")
    from tempest.queues import RedisQueue

    from .queues.test_redis import RedisServer, client_for

    folder = tmp_path / "redis"
    folder.mkdir()
    server = RedisServer(str(binary), folder)  # AOF, appendfsync always
    server.start()
    client = client_for(server.url)
    prefix = f"tempest:{{{QUEUE_NAME}}}:"

    def left() -> int:
        try:
            return int(client.llen(f"{prefix}waiting")) + sum(
                int(client.llen(key)) for key in client.scan_iter(match=f"{prefix}inflight:*"))
        except redis.ConnectionError:
            return -1  # down: not drained

    def restart(alive: list[subprocess.Popen[bytes]], logs: list[Path]) -> None:
        """SIGKILL the server; once an engine has seen it gone, start it on the same AOF."""
        server.kill()
        wait_for(lambda: any("dequeue failed" in log.read_text() for log in logs), 10)
        server.start()

    producer = RedisQueue(server.url, QUEUE_NAME)
    return Target("redis", [server.url, QUEUE_NAME], producer, left, restart,
                  cleanup=[producer.close, client.close, server.kill])


def _postgres(tmp_path: Path, dsn: str) -> Target:
    from tempest.queues import PostgresQueue

    from .queues.test_postgres import drop_tables, rows

    table = f"chaos_{uuid.uuid4().hex[:12]}"

    def backends(pids: set[int]) -> list[int]:
        """The backends of the engines *pids* (named ``tempest <host>:<pid>:...``)."""
        found = rows(dsn, "SELECT pid, application_name FROM pg_stat_activity "
                          "WHERE application_name LIKE 'tempest %%'")
        return [backend for backend, app in found
                if len(parts := str(app).split(":")) >= 3 and parts[1].isdigit()
                and int(parts[1]) in pids]

    def terminate(alive: list[subprocess.Popen[bytes]], logs: list[Path]) -> None:
        """pg_terminate_backend every connection the running engines hold."""
        pids = {proc.pid for proc in alive}
        ended = set(backends(pids))
        assert ended, "the engines hold no connection"
        for backend in ended:
            rows(dsn, "SELECT pg_terminate_backend(%s)", backend)
        wait_for(lambda: not ended & set(backends(pids)), 10)

    producer = PostgresQueue(dsn, table)
    return Target("postgres", [dsn, table], producer,
                  lambda: int(rows(dsn, f"SELECT count(*) FROM {table}")[0][0]), terminate,
                  cleanup=[producer.close, lambda: drop_tables(dsn, table)])


@pytest.fixture(params=["sqlite", "redis", "postgres"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    """The queue of the case, its server started (skipped locally when absent)."""
    if request.param == "sqlite":
        made = _sqlite(tmp_path)
    elif request.param == "redis":
        made = _redis(tmp_path)
    else:
        made = _postgres(tmp_path, request.getfixturevalue("postgres_dsn"))
    try:
        yield made
    finally:
        for step in made.cleanup:
            step()


def catches_sigterm(pid: int) -> bool:
    """Whether *pid* has a SIGTERM handler: its run() is in place to stop gracefully."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(mask, 16) & (1 << (signal.SIGTERM - 1)))


@pytest.mark.timeout(60)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX signals, /proc")
def test_chaos_loses_nothing(target: Target, tmp_path: Path) -> None:
    """2,000 tasks through three engines, three of them killed with SIGKILL and replaced,
    the server killed and restarted (Redis) or the engines' backends terminated
    (PostgreSQL) halfway: every task runs, none is unknown, each engine still running
    stops on SIGTERM, and those that saw the outage came back by themselves."""
    engines = EngineProcesses(tmp_path, target.kind, target.queue_args, target.left)
    rng = random.Random(os.environ.get("TEMPEST_CHAOS_SEED", "chaos"))
    began = time.monotonic()
    try:
        ids = [f"c{i:05d}" for i in range(TASKS)]
        for task_id in ids:
            target.producer.enqueue([task_id, "QueueDone", PAUSE])
        started = [engines.start(threads=THREADS, lease=LEASE) for _ in range(ENGINES)]
        for proc, out in started:
            engines.wait_ready(proc, out)
        alive = {proc: out.parent / "QueueEngine.log" for proc, out in started}

        def ran() -> int:
            return len({task_id for task_id, _ in engines.done()})

        killed: list[int] = []
        outage: tuple[float, list[subprocess.Popen[bytes]]] | None = None
        events = [(at, "kill") for at in KILLS_AT]
        if target.outage is not None:
            events.append((OUTAGE_AT, "outage"))
        for at, event in sorted(events):
            wait_for(lambda at=at: ran() >= at * TASKS, 30, interval=0.01)
            assert ran() < TASKS, "the engines finished before the chaos did"
            if event == "kill":
                victim = rng.choice(sorted(alive, key=lambda p: p.pid))
                victim.kill()
                victim.wait(10)
                del alive[victim]
                killed.append(victim.pid)
                proc, out = engines.start(threads=THREADS, lease=LEASE)
                engines.wait_ready(proc, out)
                alive[proc] = out.parent / "QueueEngine.log"
            else:
                assert target.outage is not None
                witnesses = list(alive)
                target.outage(witnesses, list(alive.values()))
                outage = (time.time(), witnesses)
        engines.wait_all_processed(ids, 30)
        # Each engine still running stops on SIGTERM, promptly and cleanly: none hung.
        for proc in alive:
            wait_for(lambda proc=proc: catches_sigterm(proc.pid), 10)
            proc.send_signal(signal.SIGTERM)
        for proc in alive:
            assert proc.wait(15) == 0
    finally:
        engines.kill_all()
    runs = engines.runs()
    counts = collections.Counter(task_id for task_id, _, _ in runs)
    assert sorted(counts) == ids  # every one ran (lost = 0), and nothing else did
    duplicates = len(runs) - len(counts)
    logs = {proc.pid: path.read_text() for proc, path in alive.items()}
    print(f"{target.kind}: {TASKS} tasks, {len(killed)} kills, "
          f"{'one outage' if outage else 'no outage'}, {duplicates} run twice, "
          f"{sum(log.count('dequeue failed') for log in logs.values())} failed dequeues and "
          f"{sum(log.count('dequeue recovered') for log in logs.values())} recoveries in the "
          f"engines left, {time.monotonic() - began:.1f} s")
    # Reruns come from the kills and the outage: a few each, never a flood.
    assert duplicates <= TASKS // 20
    if outage is not None:
        ended, witnesses = outage
        for proc in witnesses:
            if proc.pid in killed:
                continue  # killed afterwards: its log is cut short
            log = logs[proc.pid]
            # The engine reconnected by itself: it ran tasks after the outage ...
            assert any(pid == proc.pid and at > ended for _, pid, at in runs), proc.pid
            # ... and if its dequeues failed, the last word is that they recovered.
            if "dequeue failed" in log:
                assert log.rindex("dequeue recovered") > log.rindex("dequeue failed")
