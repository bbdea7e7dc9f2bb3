"""Delayed tasks side by side: ``python -m bench.schedule [--rounds R] [--only KEY...]``.

For each contender, in a fresh process per round (``--one KEY``), with 8
worker threads in that process:

1. *lateness*: ``--tasks`` delayed tasks, each due at its own time (one every
   10 ms, the first one second on), submitted while the workers are idle;
   each task notes ``time.time() - due`` as it starts. Same machine, same
   clock for everyone (Redis's and PostgreSQL's clocks are this machine's).
2. *pending*: ``--pending`` more delayed tasks, due an hour on, are stored;
   then the process's CPU time (all its threads: the engine, or Huey's
   consumer, or Dramatiq's worker) over ``--idle`` seconds of nothing to do.
3. *ready with pending*: ``--probes`` tasks submitted one at a time to run
   now, each noting ``time.time() - submitted`` as it starts; then the
   lateness of step 1 again, with the pending ones still waiting.

Contenders: ``tempest-memory``, ``tempest-sqlite``, ``tempest-redis``,
``tempest-postgres`` (``submit(..., at=)`` on an Engine), ``huey-redis``
(``task.schedule(args, delay=)`` with a RedisHuey consumer of 8 thread
workers, its defaults: the scheduler looks once a second) and
``dramatiq-redis`` (``send_with_options(delay=)`` to a RedisBroker, an
in-process ``dramatiq.Worker`` with 8 threads, its defaults).

The parent prints a table of medians over the rounds and, with ``--out``,
writes every round's figures and the machine's facts as JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import common

CONTENDERS = ("tempest-memory", "tempest-sqlite", "tempest-redis", "tempest-postgres",
              "huey-redis", "dramatiq-redis")
FAR = 3600.0
"""Seconds on that the pending tasks are due: none comes due during a run."""


class Recorder:
    """The delays the task bodies note, and a wait for a number of them."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self.cond = threading.Condition()

    def note(self, since: float) -> None:
        delay = time.time() - since
        with self.cond:
            self.delays.append(delay)
            self.cond.notify_all()

    def take(self, count: int, timeout: float) -> list[float]:
        """Wait until *count* delays are noted (TimeoutError after *timeout*); take them."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.delays) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(self.delays)} of {count} tasks ran in {timeout} s")
                self.cond.wait(left)
            taken, self.delays = self.delays, []
        return taken


RECORDER = Recorder()


# -- the contenders: start, submit_at(due), submit_now(), stop ---------------------------


class Contender:
    """What a run needs of a system: start its workers, submit, stop."""

    def start(self) -> None:
        raise NotImplementedError

    def submit_at(self, due: float) -> None:
        """Submit a task that notes its lateness, to run at POSIX time *due*."""
        raise NotImplementedError

    def submit_now(self) -> None:
        """Submit a task that notes its submit-to-start delay, to run now."""
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


def unavailable(key: str) -> str | None:
    """Why *key* cannot run here, or None."""
    backend = key.split("-", 1)[1]
    if key.startswith("huey") and importlib.util.find_spec("huey") is None:
        return "huey is not installed (bench/requirements.txt)"
    if key.startswith("dramatiq") and importlib.util.find_spec("dramatiq") is None:
        return "dramatiq is not installed (bench/requirements.txt)"
    if backend == "redis":
        return common.redis_reachable()
    if backend == "postgres":
        return common.postgres_reachable()
    return None


def make(key: str, ns: str, tmp: Path) -> Contender:
    """The contender *key*, its keys and tables named after *ns*."""
    if key.startswith("tempest-"):
        return _Tempest(key.split("-", 1)[1], ns, tmp)
    if key == "huey-redis":
        return _Huey(ns)
    if key == "dramatiq-redis":
        return _Dramatiq(ns)
    raise SystemExit(f"unknown contender {key!r}; known: {', '.join(CONTENDERS)}")


class _Tempest(Contender):
    def __init__(self, backend: str, ns: str, tmp: Path) -> None:
        from bench.contenders.inprocess import queue_class
        from tempest import Engine, Task

        cls = queue_class(backend)
        self.backend, self.ns = backend, ns
        if backend == "memory":
            self.queue = cls()
        elif backend == "sqlite":
            self.queue = cls(str(tmp / "tempest.sqlite3"))
        elif backend == "redis":
            self.queue = cls(common.REDIS_URL, name=ns)
        else:
            self.queue = cls(common.POSTGRES_DSN, table=common.POSTGRES_TABLE, name=ns)

        class Late(Task):
            def process(self, since: float) -> None:
                RECORDER.note(since)

        self.task = Late
        options = {"threads": common.THREADS, "queue": self.queue,
                   "log_dir": str(tmp / "logs"), "log_level": "WARNING"}
        self.engine: Any = type("BenchSchedule", (Engine,), {
            "configure": type("configure", (), options), "__module__": __name__})

    def start(self) -> None:
        self.engine.start()

    def submit_at(self, due: float) -> None:
        self.engine.submit(self.task, due, at=due)

    def submit_now(self) -> None:
        self.engine.submit(self.task, time.time())

    def stop(self) -> None:
        self.engine.stop(timeout=30)
        if self.backend == "redis":
            common.delete_redis_keys(self.ns)
        elif self.backend == "postgres":
            import psycopg

            with psycopg.connect(common.POSTGRES_DSN, autocommit=True) as conn:
                for suffix in ("", "_scheduled", "_rejected", "_fired"):
                    table = f"{common.POSTGRES_TABLE}{suffix}"
                    if conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()[0]:
                        conn.execute(f'DELETE FROM "{table}" WHERE queue = %s', (self.ns,))
        close = getattr(self.queue, "close", None)
        if callable(close):
            close()


class _Huey(Contender):
    def __init__(self, ns: str) -> None:
        import logging

        import huey

        logging.getLogger("huey").setLevel(logging.WARNING)
        self.huey = huey.RedisHuey(ns, url=common.REDIS_URL, results=False)
        self.task = self.huey.task(name="bench.late")(RECORDER.note)

    def start(self) -> None:
        from huey.consumer import ConsumerStopped

        consumer = self.huey.create_consumer(workers=common.THREADS, worker_type="thread")
        consumer.start()

        def supervise() -> None:  # Consumer.run() without the start()
            checked = time.monotonic()
            while True:
                try:
                    checked = consumer.loop(checked)
                except ConsumerStopped:
                    return

        self.consumer = consumer
        self.supervisor = threading.Thread(target=supervise, daemon=True)
        self.supervisor.start()

    def submit_at(self, due: float) -> None:
        self.task.schedule(args=(due,), delay=max(due - time.time(), 0.0))

    def submit_now(self) -> None:
        self.task(time.time())

    def stop(self) -> None:
        self.consumer.stop(graceful=True)
        self.supervisor.join(15)
        self.huey.storage.flush_all()


class _Dramatiq(Contender):
    def __init__(self, ns: str) -> None:
        import logging

        import dramatiq
        from dramatiq.brokers.redis import RedisBroker

        logging.getLogger("dramatiq").setLevel(logging.WARNING)
        self.broker = RedisBroker(url=common.REDIS_URL, namespace=ns)
        dramatiq.set_broker(self.broker)
        self.actor = dramatiq.actor(RECORDER.note, actor_name="bench_late",
                                    queue_name="bench", broker=self.broker)
        self.ns = ns

    def start(self) -> None:
        import dramatiq

        self.worker = dramatiq.Worker(self.broker, worker_threads=common.THREADS)
        self.worker.start()

    def submit_at(self, due: float) -> None:
        delay = max(int((due - time.time()) * 1000), 0)
        self.actor.send_with_options(args=(due,), delay=delay)

    def submit_now(self) -> None:
        self.actor.send(time.time())

    def stop(self) -> None:
        self.worker.stop()
        self.broker.close()
        common.delete_redis_keys(self.ns)


# -- one round ---------------------------------------------------------------------------


def _lateness(system: Contender, tasks: int) -> dict[str, float]:
    first = time.time() + 1.0
    for index in range(tasks):
        system.submit_at(first + index * 0.01)
    try:
        late = RECORDER.take(tasks, timeout=60 + tasks * 0.01)
    except TimeoutError as exc:  # recorded, not hidden: Dramatiq's delay queue, pending
        return {"failed": str(exc), "p50_ms": math.inf, "p99_ms": math.inf}
    return {"p50_ms": common.percentile(late, 50) * 1e3,
            "p99_ms": common.percentile(late, 99) * 1e3,
            "max_ms": max(late) * 1e3, "early": sum(1 for d in late if d < 0)}


def _pending(system: Contender, count: int) -> float:
    """Store *count* tasks due an hour on, from 8 threads; seconds it took."""
    began = time.perf_counter()
    due = time.time() + FAR
    threads = [threading.Thread(target=lambda n=n: [system.submit_at(due)
                                                    for _ in range(n)])
               for n in [count // 8 + (1 if i < count % 8 else 0) for i in range(8)]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - began


def one(key: str, tasks: int, pending: int, idle: float, probes: int) -> dict[str, Any]:
    """A round of *key*: the figures of the module docstring."""
    ns = f"bench-sched-{os.getpid()}-{int(time.time())}"
    with tempfile.TemporaryDirectory(prefix="tempest-bench-") as tmp:
        system = make(key, ns, Path(tmp))
        system.start()
        try:
            result: dict[str, Any] = {"lateness": _lateness(system, tasks)}
            if pending:
                result["pending_store_s"] = _pending(system, pending)
                ready = threading.Event()
                ready.wait(2.0)  # let the store's aftermath (prefetches, batches) settle
                cpu = common.cpu_seconds([os.getpid()])
                ready.wait(idle)
                result["idle_cpu_pct"] = (common.cpu_seconds([os.getpid()]) - cpu) / idle * 100
            delays = []
            for _ in range(probes):
                system.submit_now()
                delays += RECORDER.take(1, timeout=30)
            result["ready"] = {"p50_ms": common.percentile(delays, 50) * 1e3,
                               "p99_ms": common.percentile(delays, 99) * 1e3}
            if pending:
                result["lateness_pending"] = _lateness(system, tasks)
        finally:
            system.stop()
    return result


# -- the parent --------------------------------------------------------------------------


def _median(rounds: list[dict[str, Any]], path: Callable[[dict[str, Any]], float]) -> float:
    values = []
    for figures in rounds:
        try:
            values.append(path(figures))
        except KeyError:
            pass
    return statistics.median(values) if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.schedule", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--pending", type=int, default=100_000)
    parser.add_argument("--idle", type=float, default=10.0)
    parser.add_argument("--probes", type=int, default=50)
    parser.add_argument("--only", nargs="+", default=list(CONTENDERS))
    parser.add_argument("--out", help="write the rounds and the machine's facts here (JSON)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        figures = one(args.one, args.tasks, args.pending, args.idle, args.probes)
        print("RESULT " + json.dumps(figures), flush=True)
        return 0

    results: dict[str, list[dict[str, Any]]] = {}
    for round_ in range(args.rounds):
        for key in args.only:  # interleaved: a slow spell of the machine hits everyone
            why = unavailable(key)
            if why:
                if round_ == 0:
                    print(f"skip {key}: {why}", file=sys.stderr)
                continue
            command = [sys.executable, "-m", "bench.schedule", "--one", key,
                       "--tasks", str(args.tasks), "--pending", str(args.pending),
                       "--idle", str(args.idle), "--probes", str(args.probes)]
            done = subprocess.run(command, cwd=common.ROOT, capture_output=True, text=True,
                                  check=False, timeout=600 + args.pending / 100)
            line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
            if done.returncode or not line:
                print(f"{key} round {round_ + 1} failed:\n{done.stderr[-3000:]}",
                      file=sys.stderr)
                continue
            results.setdefault(key, []).append(json.loads(line[0][7:]))
            print(f"{key} round {round_ + 1}: {line[0][7:]}", file=sys.stderr, flush=True)

    columns = [
        ("late p50", lambda f: f["lateness"]["p50_ms"], "ms"),
        ("late p99", lambda f: f["lateness"]["p99_ms"], "ms"),
        ("idle CPU", lambda f: f["idle_cpu_pct"], "%"),
        ("ready p50", lambda f: f["ready"]["p50_ms"], "ms"),
        ("ready p99", lambda f: f["ready"]["p99_ms"], "ms"),
        ("late p50*", lambda f: f["lateness_pending"]["p50_ms"], "ms"),
        ("late p99*", lambda f: f["lateness_pending"]["p99_ms"], "ms"),
    ]
    print(f"\nmedians of {args.rounds} rounds; {args.tasks} delayed tasks, "
          f"{args.pending:,} pending (* = with them pending), idle {args.idle:g} s")
    print("| contender | " + " | ".join(f"{name} ({unit})" for name, _, unit in columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for key, rounds in results.items():
        cells = [f"{_median(rounds, path):.2f}" for _, path, _ in columns]
        print(f"| {key} | " + " | ".join(cells) + " |")
    if args.out:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=common.ROOT,
                                capture_output=True, text=True, check=False).stdout.strip()
        versions = {}
        for name in ("huey", "dramatiq", "redis", "psycopg"):
            try:
                versions[name] = __import__(name).__version__
            except (ImportError, AttributeError):
                pass
        common.write_json(args.out, {
            "commit": commit, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version()},
            "versions": versions, "options": vars(args), "rounds": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
