"""Chaos soak: ``python -m bench.chaos [--tasks N] [--queues sqlite redis postgres] ...``

``bash bench/run --chaos [OPTION...]`` runs the same (options as below). For
each durable queue in turn, proves that nothing submitted is lost while engine
processes are killed with SIGKILL and the queue's server goes away:

1. *engines*: four processes (``--engines``), each ``python -m tempest run
   bench.apps.chaos_engine:ChaosEngine`` with four threads (``--threads``) on
   one queue with a 5 s lease (``--lease``), ``prefetch`` 0 (``--prefetch``);
2. *submit*: four producer threads here (``--producers``), sharing one queue
   object, enqueue 50,000 tasks (``--tasks``), each sleeping 5 ms
   (``--pause``), with task ids of our own, while the engines run them
   (``--upfront``: before the first engine starts, for a deep backlog);
3. *kills*: every 1 to 4 s (uniformly at random, ``--kill-every``) a random
   engine is killed with SIGKILL and a new one started at once, so four run
   at a time; an engine killed while it starts up counts as a kill too;
4. *outage*, once per queue, when 40-60% of the tasks have run: RedisQueue
   runs on a private ``redis-server`` of this soak (a free loopback port, AOF
   in a folder of its own) that is killed with SIGKILL, kept down
   ``--redis-down`` s (1) and started again on the same port and AOF -- only
   once every submit has returned and is durable (see below); PostgresQueue's
   engines have every backend they hold ended with ``pg_terminate_backend``
   (found by the ``application_name`` the queue gives its connections,
   ``tempest <host>:<pid>:...``, matched to the engines' pids; the producer's
   connections are spared, so submits may still be going on). SQLiteQueue has
   no server: kills only. For ``--quiet`` s (10) after the outage no engine is
   killed, so that every engine that saw it shows whether it came back by
   itself: it ran tasks afterwards without being restarted, and its log's
   last word on dequeues and heartbeats is ``recovered``;
5. *drain*: once every task id has been recorded, the kills stop; the soak
   waits until the queue holds nothing (the last killed engine's messages come
   back after their lease and run again), then
6. *stop*: every engine still running gets SIGTERM and must exit 0 within
   30 s; one that does not is hung (and is killed).

The code soaked is a snapshot taken at the start (``--rev``: a git revision,
HEAD by default, or ``worktree``), which the engines and the producer import,
so that edits to the checkout during the soak never reach it.

Every phase is bounded (``--timeout`` for the whole of one queue, 1,200 s by
default); a queue that runs out of time is reported as incomplete, with how
many tasks had not run by then.

How a run is recorded
---------------------
Each task, once its sleep is over and before the engine acks it, appends
``<task_id> <time>`` to a file of its engine process, opened with ``O_APPEND``
(``bench/apps/chaos_engine.py``). One ``write()`` puts the line in the
kernel's page cache, which a SIGKILL of the writer does not touch, so a
recorded run is never lost with its engine and costs no fsync; the soak kills
processes, not the machine. A table in SQLite or PostgreSQL would have shared
the failure under test: the terminated backends, the SQLite write lock the
engines contend for. A file per process keeps the engines from contending for
anything but the queue.

*Lost* is a submitted id with no record once the queue is empty; *duplicates*
are records beyond the first of an id, sorted by cause: ``kill`` (the first
run's engine was SIGKILLed within 2 s after it: its ack did not land),
``outage`` (the first run ended within 2 s of the outage: its ack failed),
``other``.
Messages the queue set aside as poison (``TooManyDeliveries``: delivered five
times without an outcome) are counted as *rejected*, not run.

Redis durability: what each fsync policy guarantees
---------------------------------------------------
Redis appends every write command to its AOF buffer and, before the event
loop sends replies, ``write()``\\s that buffer to the AOF file
(``flushAppendOnlyFile`` in ``beforeSleep``, Redis 7.0):

- ``--appendfsync always``: the write is also ``fdatasync()``\\ed before the
  replies go out. Every acknowledged write survives a SIGKILL of Redis and a
  crash of the machine.
- ``--appendfsync everysec`` (the default, Redis's own): a background thread
  fsyncs once a second. A SIGKILL of Redis loses nothing that was
  ``write()``\\n: the kernel still holds it. But while a background fsync is
  still running Redis postpones the ``write()`` (up to 2 s; then it writes
  anyway and counts ``aof_delayed_fsync``) and still sends the replies: a
  SIGKILL in that window loses acknowledged writes. A crash of the machine
  loses up to about 1 s (2 s with a slow disk) of acknowledged writes.
- ``SHUTDOWN NOSAVE`` flushes and fsyncs the AOF before exiting (NOSAVE only
  skips the RDB snapshot): a graceful stop, which loses nothing. The soak uses
  SIGKILL, the crash.

Writes lost this way would roll the queue back to an earlier state: acked
messages come back (duplicates), and submits made after that state are gone.
So the loss check counts only submits that are durable whatever the policy:
after the last submit has returned, and before the server is killed, the soak
runs ``BGREWRITEAOF`` and waits for it to end -- a new base file, fsynced,
holding every submit. The JSON records the server's ``aof_delayed_fsync``
before the kill.

Results: ``bench/results/chaos-<date>.json`` (``--out``) and a table. The file
has the machine and options of each run under ``runs`` and the figures under
``queues``, keyed ``sqlite``, ``redis-everysec`` (or ``redis-always``) and
``postgres``; ``--merge`` adds this run to an existing file, replacing only the
queues it repeats. Engine
logs, records and the AOF are kept in ``--work`` (default: a temporary folder,
deleted unless a queue failed).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from bench import common

RESULTS = Path(__file__).resolve().parent / "results"
QUEUES = ("sqlite", "redis", "postgres")
APP = "bench.apps.chaos_engine:ChaosEngine"
TASK = "ChaosTask"
LOG_NAME = "ChaosEngine.log"
STOP_TIMEOUT = 30.0
"""Seconds an engine has to exit after SIGTERM before it counts as hung."""

CAUSE_WINDOW = 2.0
"""A rerun is put down to a kill (an outage) whose time is this close after its first run
(around it): the record is written just before the ack."""

EVENTS = ("dequeue failed", "dequeue recovered", "heartbeat failed", "heartbeat recovered",
          "ack failed", "give back failed", "reject failed", "worker crashed")
_EVENT_LINE = re.compile(r"^(\S+) [A-Z]+ +(" + "|".join(EVENTS) + r")(?: |$)")

_pause = threading.Event()  # never set: wait(seconds) is a sleep that reads as bounded


def log(text: str) -> None:
    """A progress line on stderr."""
    print(f"[chaos {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def catches_sigterm(pid: int) -> bool:
    """Whether process *pid* has a SIGTERM handler (``run()`` has installed its own)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


def wait_until(predicate: Any, timeout: float, interval: float = 0.05) -> bool:
    """Poll *predicate* until it is truthy (True) or *timeout* s pass (False)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        _pause.wait(interval)
    return True


# -- the queues' servers ------------------------------------------------------------------


class RedisServer:
    """A redis-server of the soak's own: a free loopback port, AOF in *folder*."""

    def __init__(self, binary: str, folder: Path, appendfsync: str) -> None:
        self.binary, self.folder, self.appendfsync = binary, folder, appendfsync
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.url, socket_connect_timeout=2, socket_timeout=10)

    def start(self, timeout: float = 30.0) -> float:
        """Start it (loading the AOF there is); return the seconds until it answers."""
        import redis

        began = time.monotonic()
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
             "--appendonly", "yes", "--appendfsync", self.appendfsync, "--save", "",
             "--dir", str(self.folder), "--logfile", str(self.folder / "redis.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = self.client()

        def up() -> bool:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited; see {self.folder / 'redis.log'}")
            try:
                return bool(client.ping())
            except redis.RedisError:  # refused, or still loading the AOF
                return False
        try:
            if not wait_until(up, timeout, 0.02):
                raise RuntimeError(f"redis-server did not answer within {timeout:g} s")
        finally:
            client.close()
        return time.monotonic() - began

    def persistence(self) -> dict[str, Any]:
        client = self.client()
        try:
            return dict(client.info("persistence"))
        finally:
            client.close()

    def rewrite(self, timeout: float = 120.0) -> float:
        """BGREWRITEAOF and wait for it: what was written before is in a fsynced file."""
        began = time.monotonic()
        client = self.client()
        try:
            client.bgrewriteaof()

            def done() -> bool:
                info = client.info("persistence")
                return not info["aof_rewrite_in_progress"] and not info["aof_rewrite_scheduled"]
            if not wait_until(done, timeout, 0.05):
                raise RuntimeError(f"BGREWRITEAOF did not end within {timeout:g} s")
            status = client.info("persistence")["aof_last_bgrewrite_status"]
            if status != "ok":
                raise RuntimeError(f"BGREWRITEAOF failed: aof_last_bgrewrite_status={status}")
        finally:
            client.close()
        return time.monotonic() - began

    def kill(self) -> None:
        """SIGKILL: a crash of the server (see the module docstring)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def version(self) -> str:
        out = subprocess.run([self.binary, "--version"], capture_output=True, text=True,
                             timeout=10, check=False).stdout
        match = re.search(r"v=(\S+)", out)
        return match.group(1) if match else out.strip()


class Backend:
    """One durable queue of the soak: its engines' environment, a producer, the outage."""

    kind = ""
    outage_kind: str | None = None
    outage_after_submit = False
    """Whether the outage waits for every submit (and :meth:`after_submit`) first."""

    def __init__(self, work: Path) -> None:
        self.work = work

    def env(self) -> dict[str, str]:
        raise NotImplementedError

    def producer(self) -> Any:
        raise NotImplementedError

    def left(self) -> int:
        """Messages in the queue, waiting or leased; -1 when it cannot tell."""
        raise NotImplementedError

    def outage(self, engine_pids: list[int], rng: random.Random) -> dict[str, Any]:
        raise NotImplementedError

    def after_submit(self) -> dict[str, Any]:
        """Make every submit durable before the outage; what was done."""
        return {}

    def close(self) -> None:
        """Delete what the soak made on a shared server."""


class SQLiteBackend(Backend):
    kind = "sqlite"

    def __init__(self, work: Path) -> None:
        super().__init__(work)
        self.path = work / "chaos.db"

    def env(self) -> dict[str, str]:
        return {"CHAOS_KIND": "sqlite", "CHAOS_TARGET": str(self.path)}

    def producer(self) -> Any:
        from tempest.queues import SQLiteQueue

        return SQLiteQueue(self.path)

    def left(self) -> int:
        try:
            conn = sqlite3.connect(self.path, timeout=10)
            try:
                return int(conn.execute("SELECT count(*) FROM tempest_messages").fetchone()[0])
            finally:
                conn.close()
        except sqlite3.Error:
            return -1


class RedisBackend(Backend):
    kind = "redis"
    outage_kind = "redis-server SIGKILL and restart"
    outage_after_submit = True  # the producer's submits go to the server that dies

    def __init__(self, work: Path, appendfsync: str, down: float) -> None:
        super().__init__(work)
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH")
        folder = work / "redis"
        folder.mkdir()
        self.server = RedisServer(binary, folder, appendfsync)
        self.down = down
        self.name = "chaos"
        self.server.start()
        self._client = self.server.client()

    def env(self) -> dict[str, str]:
        return {"CHAOS_KIND": "redis", "CHAOS_TARGET": self.server.url,
                "CHAOS_NAME": self.name}

    def producer(self) -> Any:
        from tempest.queues import RedisQueue

        return RedisQueue(self.server.url, self.name)

    def left(self) -> int:
        import redis

        prefix = f"tempest:{{{self.name}}}:"
        try:
            count = int(self._client.llen(f"{prefix}waiting"))
            for key in self._client.scan_iter(match=f"{prefix}inflight:*", count=1000):
                count += int(self._client.llen(key))
            return count
        except redis.RedisError:
            return -1  # down

    def after_submit(self) -> dict[str, Any]:
        seconds = self.server.rewrite()
        log(f"redis: BGREWRITEAOF done in {seconds:.2f} s: every submit is in a fsynced file")
        return {"durable_point": "BGREWRITEAOF after the last submit", "rewrite_s": seconds}

    def outage(self, engine_pids: list[int], rng: random.Random) -> dict[str, Any]:
        before = self.server.persistence()
        began = time.time()
        self.server.kill()
        _pause.wait(self.down)
        up_s = self.server.start()
        ended = time.time()
        return {"what": "redis-server SIGKILLed, restarted on the same port and AOF",
                "appendfsync": self.server.appendfsync, "down_s": round(ended - began, 3),
                "start_s": round(up_s, 3),
                "aof_delayed_fsync_before": before.get("aof_delayed_fsync"),
                "aof_last_write_status_before": before.get("aof_last_write_status"),
                "began": began, "ended": ended}

    def close(self) -> None:
        self._client.close()
        self.server.kill()


class PostgresBackend(Backend):
    kind = "postgres"
    outage_kind = "pg_terminate_backend of every engine backend"

    def __init__(self, work: Path) -> None:
        super().__init__(work)
        import psycopg

        self.dsn = common.POSTGRES_DSN
        self.table = f"bench_chaos_{uuid.uuid4().hex[:8]}"
        self._conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=5,
                                     application_name="bench-chaos")

    def env(self) -> dict[str, str]:
        return {"CHAOS_KIND": "postgres", "CHAOS_TARGET": self.dsn, "CHAOS_NAME": self.table}

    def producer(self) -> Any:
        from tempest.queues import PostgresQueue

        return PostgresQueue(self.dsn, self.table)

    def left(self) -> int:
        import psycopg

        try:
            row = self._conn.execute(f"SELECT count(*) FROM {self.table}").fetchone()
            return int(row[0]) if row else -1
        except psycopg.Error:
            return -1

    def backends(self, engine_pids: list[int]) -> list[tuple[int, int]]:
        """(backend pid, engine pid) of every connection the engines hold."""
        wanted = {str(pid): pid for pid in engine_pids}
        found = []
        for backend, app in self._conn.execute(
                "SELECT pid, application_name FROM pg_stat_activity "
                "WHERE application_name LIKE 'tempest %%'").fetchall():
            parts = str(app).split(":")
            if len(parts) >= 3 and parts[1] in wanted:
                found.append((int(backend), wanted[parts[1]]))
        return found

    def outage(self, engine_pids: list[int], rng: random.Random) -> dict[str, Any]:
        began = time.time()
        targets = self.backends(engine_pids)
        ended = [b for b, _ in targets if self._conn.execute(
            "SELECT pg_terminate_backend(%s)", (b,)).fetchone() == (True,)]
        gone = wait_until(lambda: not {b for b, _ in self.backends(engine_pids)} & set(ended),
                          10)
        return {"what": "pg_terminate_backend of every backend the engines held",
                "backends_terminated": len(ended),
                "engines_hit": len({e for b, e in targets if b in ended}),
                "gone_within_10s": gone, "began": began, "ended": time.time()}

    def close(self) -> None:
        for suffix in ("", "_rejected", "_scheduled", "_fired", "_failed", "_results"):
            self._conn.execute(f"DROP TABLE IF EXISTS {self.table}{suffix}")
        self._conn.close()


# -- engines and their records ------------------------------------------------------------


class EngineProc:
    """One engine process: ``tempest run`` of the chaos app, its logs in *folder*."""

    def __init__(self, index: int, folder: Path, env: dict[str, str], code: Path) -> None:
        self.index, self.folder = index, folder
        folder.mkdir()
        with open(folder / "out.txt", "wb") as out, open(folder / "err.txt", "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tempest", "run", APP, "--log-dir", str(folder)],
                cwd=code, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True)  # a Ctrl-C here is not theirs: the soak stops them
        self.started = time.time()
        self.killed: float | None = None
        self.exited: float | None = None
        self.exit_code: int | None = None
        self.stop_s: float | None = None
        self.sigterm_at: float | None = None
        self.hung = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self.killed = time.time()

    def events(self) -> list[tuple[float, str]]:
        """(time, event) of the main log's queue-trouble lines, in order."""
        try:
            text = (self.folder / LOG_NAME).read_text(errors="replace")
        except OSError:
            return []
        return [(datetime.datetime.fromisoformat(m.group(1).replace("Z", "+00:00")).timestamp(),
                 m.group(2)) for m in map(_EVENT_LINE.match, text.splitlines()) if m]

    def imported(self) -> str:
        """The engine's first line: which tempest it imported, from where."""
        try:
            return (self.folder / "out.txt").read_text(errors="replace").partition("\n")[0]
        except OSError:
            return ""

    def stderr_count(self, text: str) -> int:
        """Lines of its stderr holding *text* (the queues' own warnings go there)."""
        try:
            err = (self.folder / "err.txt").read_text(errors="replace")
        except OSError:
            return 0
        return sum(text in line for line in err.splitlines())

    def stderr_tail(self, lines: int = 5) -> str:
        try:
            return "\n".join((self.folder / "err.txt").read_text(
                errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Records:
    """Every run the engines recorded, read incrementally from their files."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.offsets: dict[Path, int] = {}
        self.runs: list[tuple[str, int, float]] = []  # (task id, engine pid, time.time())
        self.count: collections.Counter[str] = collections.Counter()

    def poll(self) -> int:
        """Read the lines written since the last poll; return how many ids have run."""
        for path in self.folder.glob("records-*.txt"):
            offset = self.offsets.get(path, 0)
            with open(path, "rb") as handle:
                handle.seek(offset)
                data = handle.read()
            end = data.rfind(b"\n") + 1  # a line still being written: next time
            if not end:
                continue
            self.offsets[path] = offset + end
            pid = int(path.stem.split("-")[1])
            for line in data[:end].decode().splitlines():
                task_id, at = line.split()
                self.runs.append((task_id, pid, float(at)))
                self.count[task_id] += 1
        return len(self.count)


# -- one queue's soak ---------------------------------------------------------------------


class Soak:
    """The phases of the module docstring, for one backend."""

    def __init__(self, backend: Backend, args: argparse.Namespace, work: Path) -> None:
        self.backend, self.args, self.work = backend, args, work
        self.rng = random.Random(f"{args.seed}-{backend.kind}")
        self.records_dir = work / "records"
        self.records_dir.mkdir()
        self.records = Records(self.records_dir)
        self.engines: list[EngineProc] = []
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(args.code), *filter(None, [os.environ.get("PYTHONPATH")])]),
            CHAOS_RECORDS=str(self.records_dir), CHAOS_THREADS=str(args.threads),
            CHAOS_LEASE=str(args.lease), CHAOS_PREFETCH=str(args.prefetch), **backend.env())
        self.unexpected: list[dict[str, Any]] = []

    def start_engine(self) -> EngineProc:
        engine = EngineProc(len(self.engines), self.work / f"engine-{len(self.engines):03d}",
                            self.env, self.args.code)
        self.engines.append(engine)
        return engine

    def alive(self) -> list[EngineProc]:
        return [e for e in self.engines if e.killed is None and e.alive()]

    def kill_one(self) -> None:
        victim = self.rng.choice(self.alive())
        victim.kill()
        self.start_engine()

    def replace_dead(self) -> None:
        """An engine that exited without being killed: note it (a bug) and replace it."""
        for engine in self.engines:
            if engine.killed is None and engine.exited is None and not engine.alive():
                engine.exited, engine.exit_code = time.time(), engine.proc.returncode
                self.unexpected.append({"engine": engine.index, "pid": engine.pid,
                                        "exit_code": engine.exit_code,
                                        "stderr": engine.stderr_tail()})
                log(f"{self.backend.kind}: engine {engine.index} exited by itself "
                    f"({engine.exit_code}): {engine.stderr_tail(2)}")
                self.start_engine()

    def run(self) -> dict[str, Any]:
        args, kind, n = self.args, self.backend.kind, self.args.tasks
        began = time.monotonic()
        deadline = began + args.timeout
        ids = [f"chaos{i:06d}" for i in range(n)]
        if not args.upfront:
            for _ in range(args.engines):
                self.start_engine()
        producer = self.backend.producer()
        submitted = [0] * args.producers
        submit_error: list[BaseException] = []

        def submit(which: int) -> None:
            try:
                for task_id in ids[which::args.producers]:
                    producer.enqueue([task_id, TASK, args.pause])
                    submitted[which] += 1
            except BaseException as exc:  # noqa: BLE001 - reported below
                submit_error.append(exc)

        threads = [threading.Thread(target=submit, args=(i,), name=f"chaos-producer-{i}",
                                    daemon=True) for i in range(args.producers)]
        for thread in threads:
            thread.start()
        if args.upfront:  # every task waits in the queue before the first engine starts
            for thread in threads:
                thread.join(max(deadline - time.monotonic(), 0))
            log(f"{kind}: {sum(submitted)} submitted up front in "
                f"{time.monotonic() - began:.1f} s")
            for _ in range(args.engines):
                self.start_engine()
        durable: dict[str, Any] = {}
        outage: dict[str, Any] | None = None
        outage_at = int(n * self.rng.uniform(0.4, 0.6))
        quiet_until = 0.0
        submit_s: float | None = None
        kill_times: list[float] = []
        next_kill = time.monotonic() + self.rng.uniform(*args.kill_every)
        next_report = time.monotonic() + 5
        complete = False
        while time.monotonic() < deadline:
            ran = self.records.poll()
            self.replace_dead()
            now = time.monotonic()
            if submit_s is None and not any(thread.is_alive() for thread in threads):
                submit_s = now - began
                if submit_error:
                    raise RuntimeError(f"{kind}: a submit failed after {sum(submitted)}: "
                                       f"{submit_error[0]!r}")
                log(f"{kind}: {n} submitted in {submit_s:.1f} s ({ran} run so far)")
                durable = self.backend.after_submit()
            if ran >= n:
                complete = True
                break
            if (outage is None and self.backend.outage_kind and ran >= outage_at
                    and (submit_s is not None or not self.backend.outage_after_submit)):
                pids = [e.pid for e in self.alive()]
                log(f"{kind}: outage ({self.backend.outage_kind}) at {ran} of {n} run")
                outage = self.backend.outage(pids, self.rng)
                outage.update(at_run=ran, engines_alive=pids)
                quiet_until = time.monotonic() + args.quiet
                next_kill = max(next_kill, quiet_until)
            if now >= next_kill and now >= quiet_until:
                self.kill_one()
                kill_times.append(time.time())
                next_kill = now + self.rng.uniform(*args.kill_every)
            if now >= next_report:
                next_report = now + 5
                log(f"{kind}: {ran}/{n} run, {sum(submitted)} submitted, {len(kill_times)} "
                    f"kills, {len(self.alive())} engines, {self.backend.left()} in the queue")
            _pause.wait(0.1)
        chaos_s = time.monotonic() - began
        # The drain: the last killed engines' messages come back after their lease.
        left = self.backend.left()
        if complete:
            drain_wait = min(max(deadline - time.monotonic(), 0), 3 * args.lease + 60)
            wait_until(lambda: self.backend.left() == 0, drain_wait, 0.2)
            left = self.backend.left()
        self.records.poll()
        rejected = producer.rejected() if callable(getattr(producer, "rejected", None)) else []
        close = getattr(producer, "close", None)
        if callable(close):
            close()
        wall_s = time.monotonic() - began
        self.stop_all()
        self.records.poll()  # a graceful stop may have run a last message
        return self.report(ids, complete=complete, wall_s=wall_s, chaos_s=chaos_s,
                           submit_s=submit_s, durable=durable, outage=outage,
                           kill_times=kill_times, left=left, rejected=rejected)

    def stop_all(self) -> None:
        """SIGTERM each engine still running (once run() handles it); bound its exit."""
        alive = self.alive()
        for engine in alive:
            wait_until(lambda e=engine: catches_sigterm(e.pid) or not e.alive(), 30, 0.05)
        for engine in alive:
            engine.stop_s, engine.sigterm_at = time.monotonic(), time.time()
            if engine.alive():
                engine.proc.send_signal(signal.SIGTERM)
        for engine in alive:
            try:
                engine.exit_code = engine.proc.wait(max(
                    STOP_TIMEOUT - (time.monotonic() - (engine.stop_s or 0)), 0.1))
            except subprocess.TimeoutExpired:
                engine.hung = True
                engine.proc.kill()
                engine.exit_code = engine.proc.wait(10)
            engine.stop_s = time.monotonic() - (engine.stop_s or 0)
            engine.exited = time.time()

    def report(self, ids: list[str], *, complete: bool, wall_s: float, chaos_s: float,
               submit_s: float | None, durable: dict[str, Any], outage: dict[str, Any] | None,
               kill_times: list[float], left: int, rejected: list[Any]) -> dict[str, Any]:
        args, records = self.args, self.records
        submitted = set(ids)
        lost = sorted(submitted - set(records.count))
        unknown = sorted(set(records.count) - submitted)
        by_pid = {e.pid: e for e in self.engines}
        first: dict[str, tuple[int, float]] = {}
        for task_id, pid, at in records.runs:
            if task_id not in first or at < first[task_id][1]:
                first[task_id] = (pid, at)
        causes: collections.Counter[str] = collections.Counter()
        for task_id, count in records.count.items():
            if count < 2:
                continue
            pid, at = first[task_id]
            engine = by_pid.get(pid)
            if (engine is not None and engine.killed is not None
                    and 0 <= engine.killed - at <= CAUSE_WINDOW):
                cause = "kill"
            elif (outage is not None
                  and outage["began"] - CAUSE_WINDOW <= at <= outage["ended"] + CAUSE_WINDOW):
                cause = "outage"
            else:
                cause = "other"
            causes[cause] += count - 1
        events: collections.Counter[str] = collections.Counter()
        ended_failing = []
        # The longest a recovery can take to show: the dequeue backoff's cap (5 s) or
        # the heartbeat's interval, and a second.
        grace = max(5.0, args.lease / 3) + 1
        for engine in self.engines:
            trail = engine.events()
            events.update(event for _, event in trail)
            if engine.killed is None and engine.sigterm_at is not None:  # a whole log
                for what in ("dequeue", "heartbeat"):
                    mine = [(at, e) for at, e in trail if e.startswith(what)]
                    if (mine and mine[-1][1] == f"{what} failed"
                            and engine.sigterm_at - mine[-1][0] > grace):
                        ended_failing.append({"engine": engine.index, "queue_call": what})
        reconnect = None
        if outage is not None:
            reconnect = self.reconnection(outage)
        stopped = [e for e in self.engines if e.killed is None and e.stop_s is not None]
        hung = [e.index for e in stopped if e.hung]
        bad_exit = {e.index: e.exit_code for e in stopped if e.exit_code != 0}
        counts = sorted(records.count.values())
        result = {
            "queue": self.backend.kind, "complete": complete, "tasks": len(ids),
            "pause_s": args.pause, "engines_at_once": args.engines, "threads": args.threads,
            "prefetch": args.prefetch,
            "lease_s": args.lease, "engines_started": len(self.engines),
            "kills": len(kill_times), "kill_every_s": list(args.kill_every),
            "outages": 0 if outage is None else 1, "outage": outage, "durability": durable,
            "submit_s": None if submit_s is None else round(submit_s, 2),
            "chaos_s": round(chaos_s, 2), "wall_s": round(wall_s, 2),
            "ran": len(records.count), "runs": len(records.runs), "lost": len(lost),
            "lost_ids": lost[:50], "unknown_ids": unknown[:50],
            "duplicates": len(records.runs) - len(records.count),
            "duplicates_by_cause": dict(causes),
            "most_runs_of_one_task": counts[-1] if counts else 0,
            "rejected": len(rejected), "rejected_sample": [repr(r)[:200] for r in rejected[:10]],
            "left_in_queue": left,
            "stopped": {"engines": len(stopped), "hung": hung, "bad_exit_codes": bad_exit,
                        "max_stop_s": round(max((e.stop_s or 0 for e in stopped),
                                                default=0), 2)},
            "unexpected_exits": self.unexpected,
            "engines_import": sorted({e.imported() for e in self.engines} - {""}),
            "log_lines": {event: events[event] for event in EVENTS},
            "stderr_lines": {what: sum(e.stderr_count(what) for e in self.engines)
                             for what in ("deferred", "Traceback")},
            "ended_failing": ended_failing, "reconnect": reconnect,
        }
        result["ok"] = bool(
            complete and not lost and not unknown and not hung and not bad_exit
            and not ended_failing and not self.unexpected and not rejected and left == 0
            and (reconnect is None or reconnect["all_came_back"]))
        return result

    def reconnection(self, outage: dict[str, Any]) -> dict[str, Any]:
        """Did every engine that lived through the outage run tasks after it, unrestarted?"""
        ended = outage["ended"]
        across = [e for e in self.engines if e.pid in outage["engines_alive"]
                  and (e.killed is None or e.killed > ended + self.args.quiet - 1)]
        first_after: dict[int, float] = {}
        for _, pid, at in self.records.runs:
            if at > ended and (pid not in first_after or at < first_after[pid]):
                first_after[pid] = at
        came_back = {e.index: round(first_after[e.pid] - ended, 3)
                     for e in across if e.pid in first_after}
        failed = sum(1 for e in across if {"dequeue failed", "heartbeat failed"}
                     & {event for _, event in e.events()})
        return {"engines_across": len(across), "engines_that_logged_failures": failed,
                "first_task_after_s": came_back,
                "all_came_back": len(came_back) == len(across)}

    def cleanup(self) -> None:
        for engine in self.engines:
            if engine.alive():
                engine.proc.kill()
                engine.proc.wait(10)


# -- the command --------------------------------------------------------------------------


def snapshot(rev: str, into: Path) -> dict[str, Any]:
    """tempest/ as of *rev* (``worktree``: as it is now) and bench/ into *into*.

    Engines run there (``python -m`` puts the current folder first on the path,
    before ``PYTHONPATH`` and the editable install), and this process imports
    tempest from there too: a checkout that others edit while the soak runs
    cannot give engines started at different times different code.
    """
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", ".venv", "results")
    shutil.copytree(common.ROOT / "bench", into / "bench", ignore=skip)
    commit = None
    if rev == "worktree":
        shutil.copytree(common.ROOT / "tempest", into / "tempest", ignore=skip)
    else:
        commit = subprocess.run(["git", "rev-parse", "--short", rev], cwd=common.ROOT,
                                capture_output=True, text=True, timeout=10,
                                check=True).stdout.strip()
        archive = subprocess.run(["git", "archive", commit, "tempest"], cwd=common.ROOT,
                                 capture_output=True, timeout=60, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(into, filter="data")
    digest = hashlib.sha256()
    files = sorted((into / "tempest").rglob("*.py"))
    for path in files:
        digest.update(str(path.relative_to(into)).encode() + b"\0" + path.read_bytes())
    return {"rev": rev, "commit": commit, "tempest_sha256": digest.hexdigest()[:16],
            "tempest_files": len(files)}


def make_backend(kind: str, args: argparse.Namespace, work: Path) -> Backend:
    if kind == "sqlite":
        return SQLiteBackend(work)
    if kind == "redis":
        return RedisBackend(work, args.appendfsync, args.redis_down)
    return PostgresBackend(work)


def table(results: dict[str, dict[str, Any]]) -> str:
    """The printed summary: one row per queue."""
    head = ("queue", "tasks", "engines", "kills", "outage", "lost", "dup (kill/outage/other)",
            "rejected", "hung", "deq failed/recovered", "wall s", "ok")
    rows = [head]
    for label, r in results.items():
        if "error" in r:
            rows.append((label, "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", r["error"][:40]))
            continue
        causes = r["duplicates_by_cause"]
        lines = r["log_lines"]
        rows.append((
            label, f"{r['tasks']:,}", str(r["engines_started"]), str(r["kills"]),
            {"sqlite": "-", "redis": "restart", "postgres": "terminate"}[r["queue"]]
            if r["outages"] else "-",
            str(r["lost"]),
            f"{r['duplicates']} ({causes.get('kill', 0)}/{causes.get('outage', 0)}/"
            f"{causes.get('other', 0)})",
            str(r["rejected"]), str(len(r["stopped"]["hung"])),
            f"{lines['dequeue failed']}/{lines['dequeue recovered']}",
            f"{r['wall_s']:.1f}", "yes" if r["ok"] else "NO"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
                     for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos",
                                     description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=50_000, help="tasks per queue")
    parser.add_argument("--queues", nargs="+", choices=QUEUES, default=list(QUEUES))
    parser.add_argument("--engines", type=int, default=4, help="engine processes at a time")
    parser.add_argument("--threads", type=int, default=4, help="threads per engine")
    parser.add_argument("--lease", type=float, default=5.0, help="the queue's lease (s)")
    parser.add_argument("--prefetch", type=int, default=0,
                        help="the engines' prefetch option (messages held ahead)")
    parser.add_argument("--producers", type=int, default=4,
                        help="threads submitting here (one queue object)")
    parser.add_argument("--upfront", action="store_true",
                        help="submit every task before the engines start (a deep backlog)")
    parser.add_argument("--pause", type=float, default=0.005, help="each task's sleep (s)")
    parser.add_argument("--kill-every", type=float, nargs=2, default=[1.0, 4.0],
                        metavar=("MIN", "MAX"), help="seconds between kills, uniform")
    parser.add_argument("--quiet", type=float, default=10.0,
                        help="seconds without kills after the outage")
    parser.add_argument("--appendfsync", choices=["everysec", "always"], default="everysec",
                        help="the private redis-server's AOF fsync policy")
    parser.add_argument("--redis-down", type=float, default=1.0,
                        help="seconds the killed redis-server stays down")
    parser.add_argument("--timeout", type=float, default=1200.0,
                        help="bound on one queue's soak (s)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: time)")
    parser.add_argument("--out", type=Path, default=None,
                        help="the JSON result (default: bench/results/chaos-<date>.json)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the queues of an existing --out file not run again")
    parser.add_argument("--work", type=Path, default=None,
                        help="keep engine logs, records and the AOF here")
    parser.add_argument("--rev", default="HEAD",
                        help="the tempest to soak: a git revision, or 'worktree' for the "
                             "checkout as it is (default: HEAD, the last commit)")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = int(time.time())
    out = args.out or RESULTS / f"chaos-{time.strftime('%Y-%m-%d')}.json"

    from bench import report

    meta = report.machine(command=" ".join(["python -m bench.chaos",
                                            *(argv if argv is not None else sys.argv[1:])]))
    redis_binary = shutil.which("redis-server")
    if redis_binary:
        meta["redis_server_private"] = RedisServer(redis_binary, Path("."),
                                                   "everysec").version()
    work_root = args.work or Path(tempfile.mkdtemp(prefix="tempest-chaos-"))
    work_root.mkdir(parents=True, exist_ok=True)
    args.code = work_root / "code"
    if args.code.exists():
        shutil.rmtree(args.code)
    meta["code"] = snapshot(args.rev, args.code)
    if "tempest" in sys.modules:
        raise RuntimeError("tempest was imported before the snapshot")
    sys.path.insert(0, str(args.code))
    import tempest

    meta["code"]["imported_from"] = str(Path(tempest.__file__).parent)
    results: dict[str, dict[str, Any]] = {}
    log(f"seed {args.seed}; {args.tasks} tasks per queue; work in {work_root}")
    for kind in args.queues:
        # Each Redis policy is a run of its own: --merge keeps both in one file.
        label = f"redis-{args.appendfsync}" if kind == "redis" else kind
        work = work_root / label
        if work.exists():
            shutil.rmtree(work)
        work.mkdir()
        backend: Backend | None = None
        soak: Soak | None = None
        try:
            backend = make_backend(kind, args, work)
            soak = Soak(backend, args, work)
            results[label] = soak.run()
        except Exception as exc:  # noqa: BLE001 - one queue's failure is reported, not fatal
            log(f"{kind}: FAILED: {exc!r}")
            results[label] = {"queue": kind, "ok": False, "error": repr(exc)}
        finally:
            if soak is not None:
                soak.cleanup()
            if backend is not None:
                try:
                    backend.close()
                except Exception as exc:  # noqa: BLE001
                    log(f"{kind}: cleanup failed: {exc!r}")
        result = results[label]
        log(f"{kind}: {'ok' if result.get('ok') else 'NOT OK'}: "
            f"{json.dumps({k: result.get(k) for k in ('lost', 'duplicates', 'kills', 'wall_s')})}")
    recorded: dict[str, Any] = {"runs": [], "queues": {}}
    if args.merge and out.exists():
        recorded = json.loads(out.read_text())
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    recorded["runs"].append({"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                             "machine": meta, "options": options, "queues": list(results)})
    recorded["queues"].update(results)
    common.write_json(out, recorded)
    print(table(results))
    print(f"results: {out}")
    ok = all(r.get("ok") for r in results.values())
    if ok and args.work is None:
        shutil.rmtree(work_root, ignore_errors=True)
    else:
        aof = " and the AOF" if "redis" in args.queues else ""
        print(f"engine logs, records{aof}: {work_root}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
