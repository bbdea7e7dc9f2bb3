"""Synchronous calls side by side: ``python -m bench.call [--rounds R] [--only KEY...]``.

A call is a round trip through the queue: the caller submits a no-op task that
returns 1 and waits for that return value. For each contender, in a fresh
process per round (``--one KEY``):

1. ``--warmup`` calls, not counted (connections, imports, a worker's boot);
2. *sequential*: ``--calls`` calls one after the other from one caller thread
   (``--peer-calls`` for the peers), each timed with ``time.perf_counter``
   from before the submit to the return value in hand: p50, p90, p99;
3. *concurrent*: ``--concurrent`` calls more, spread over 8 caller threads:
   calls/s over the wall time, and the p50/p99 of those calls.

Contenders, 8 worker threads each:

``tempest-memory``, ``tempest-sqlite``, ``tempest-redis``, ``tempest-postgres``
    ``Engine.call(CallNoop, timeout=10)`` on an Engine (MemoryQueue,
    SQLiteQueue(path), RedisQueue(url, name=...), PostgresQueue(dsn,
    table="bench_messages", name=...)) started with ``Engine.start()`` in the
    caller's process: the worker threads and the caller share one process and
    its GIL (MemoryQueue has no other way; for the others, see the next one).
``tempest-redis-2proc``
    the same calls on RedisQueue, the engine run by ``Engine.run()`` in a
    process of its own: the result crosses processes as it would between a
    web server and a worker.
``celery-redis``
    ``noop.delay().get(timeout=10)``; Redis broker and Redis result backend
    (:mod:`bench.apps.celery_results_app`), the worker ``celery worker -P
    threads -c 8`` in its own process, as :mod:`bench.contenders.workers`
    starts it.
``dramatiq-redis``
    ``actor.send().get_result(block=True, timeout=10000)``: a RedisBroker with
    the ``Results`` middleware on a ``RedisBackend``, an in-process
    ``dramatiq.Worker`` with 8 threads (as :mod:`bench.schedule` runs it), its
    defaults otherwise.

The parent runs the rounds interleaved, prints a table of medians over the
rounds with each contender's p50 as a multiple of tempest-redis's, and, with
``--out``, writes every round's figures and the machine's facts as JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import signal
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
from tempest import Engine, Task

CONTENDERS = ("tempest-memory", "tempest-sqlite", "tempest-redis", "tempest-postgres",
              "tempest-redis-2proc", "celery-redis", "dramatiq-redis")
PEERS = ("celery-redis", "dramatiq-redis")
BASELINE = "tempest-redis"
CALLERS = 8
"""Caller threads of the concurrent part."""
TABLES = ("", "_scheduled", "_rejected", "_fired", "_failed", "_results")
"""The suffixes of PostgresQueue's tables, whose rows a run deletes afterwards."""
TARGETS = {"tempest-memory": 0.3, "tempest-redis": 1.5, "tempest-postgres": 3.0}
"""The issue's p50 bounds (ms); and each peer's p50 at least 5x tempest-redis's."""
PEER_FACTOR = 5.0


class CallNoop(Task):
    """The no-op task of a call: returns 1."""

    def process(self) -> int:
        return 1


# -- the contenders: start, call() -> value, stop ----------------------------------------


class Contender:
    """What a run needs of a system: start its workers, make one call, stop."""

    def start(self) -> None:
        raise NotImplementedError

    def call(self, timeout: float = 10.0) -> Any:
        """Submit the no-op task, wait for its return value and return it."""
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


def unavailable(key: str) -> str | None:
    """Why *key* cannot run here, or None."""
    backend = key.split("-")[1]
    for peer in ("celery", "dramatiq"):
        if key.startswith(peer) and importlib.util.find_spec(peer) is None:
            return f"{peer} is not installed (bench/requirements.txt)"
    if backend == "redis":
        return common.redis_reachable()
    if backend == "postgres":
        return common.postgres_reachable()
    return None


def make(key: str, ns: str, tmp: Path) -> Contender:
    """The contender *key*, its keys and tables named after *ns*."""
    if key in ("tempest-memory", "tempest-sqlite", "tempest-redis", "tempest-postgres"):
        return _Tempest(key.split("-", 1)[1], ns, tmp)
    if key == "tempest-redis-2proc":
        return _TempestTwoProcesses(ns, tmp)
    if key == "celery-redis":
        return _Celery(ns, tmp)
    if key == "dramatiq-redis":
        return _Dramatiq(ns)
    raise SystemExit(f"unknown contender {key!r}; known: {', '.join(CONTENDERS)}")


def _engine(backend: str, ns: str, tmp: Path, name: str) -> tuple[type[Engine], Any]:
    """An Engine class of 8 threads on a fresh *backend* queue named after *ns*; the queue."""
    from bench.contenders.inprocess import queue_class

    cls = queue_class(backend)
    if backend == "memory":
        queue = cls()
    elif backend == "sqlite":
        queue = cls(str(tmp / "tempest.sqlite3"))
    elif backend == "redis":
        queue = cls(common.REDIS_URL, name=ns)
    else:
        queue = cls(common.POSTGRES_DSN, table=common.POSTGRES_TABLE, name=ns)
    options = {"name": name, "threads": common.THREADS, "queue": queue,
               "log_dir": str(tmp / "logs"), "log_level": "WARNING"}
    engine: Any = type(f"BenchCall_{name.replace('-', '_')}", (Engine,), {
        "configure": type("configure", (), options), "__module__": __name__})
    return engine, queue


def _forget_queue(backend: str, ns: str, queue: Any) -> None:
    """Close *queue* and delete what the run left in Redis or PostgreSQL."""
    close = getattr(queue, "close", None)
    if callable(close):
        close()
    if backend == "redis":
        common.delete_redis_keys(ns)
    elif backend == "postgres":
        import psycopg

        with psycopg.connect(common.POSTGRES_DSN, autocommit=True) as conn:
            for suffix in TABLES:
                table = f"{common.POSTGRES_TABLE}{suffix}"
                row = conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()
                if row and row[0]:
                    conn.execute(f'DELETE FROM "{table}" WHERE queue = %s', (ns,))


class _Tempest(Contender):
    def __init__(self, backend: str, ns: str, tmp: Path) -> None:
        self.backend, self.ns = backend, ns
        self.engine, self.queue = _engine(backend, ns, tmp, f"tempest-{backend}")

    def start(self) -> None:
        self.engine.start()

    def call(self, timeout: float = 10.0) -> Any:
        return self.engine.call(CallNoop, timeout=timeout)

    def stop(self) -> None:
        try:
            self.engine.stop(timeout=30)
        finally:
            _forget_queue(self.backend, self.ns, self.queue)


class _TempestTwoProcesses(Contender):
    """The caller here, the engine (``Engine.run()``) in a process of its own."""

    def __init__(self, ns: str, tmp: Path) -> None:
        self.ns, self.tmp = ns, tmp
        self.engine, self.queue = _engine("redis", ns, tmp, "tempest-redis-caller")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log = open(self.tmp / "engine.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.call", "--engine", self.ns, "--log-dir",
             str(self.tmp / "engine")], cwd=common.ROOT, stdin=subprocess.DEVNULL,
            stdout=self.log, stderr=subprocess.STDOUT)

    def call(self, timeout: float = 10.0) -> Any:
        return self.engine.call(CallNoop, timeout=timeout)

    def stop(self) -> None:
        try:
            if self.proc is not None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
                self.log.close()
        finally:
            _forget_queue("redis", self.ns, self.queue)


def serve(ns: str, tmp: str) -> int:
    """``--engine NS``: run an engine of 8 threads on RedisQueue *ns* until SIGTERM."""
    engine, queue = _engine("redis", ns, Path(tmp), "tempest-redis-engine")
    try:
        engine.run()
    finally:
        close = getattr(queue, "close", None)
        if callable(close):
            close()
    return 0


class _Celery(Contender):
    def __init__(self, ns: str, tmp: Path) -> None:
        os.environ["BENCH_NS"] = ns
        os.environ["BENCH_REDIS_URL"] = common.REDIS_URL
        from bench.apps import celery_results_app

        self.app = celery_results_app
        self.ns, self.tmp = ns, tmp
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(common.ROOT), os.environ.get("PYTHONPATH")) if p)
        self.log = open(self.tmp / "worker.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "bench.apps.celery_results_app", "worker",
             "-P", "threads", "-c", str(common.THREADS), "--loglevel", "WARNING",
             "--without-heartbeat", "--without-gossip", "--without-mingle"],
            cwd=common.ROOT, env=env, stdin=subprocess.DEVNULL, stdout=self.log,
            stderr=subprocess.STDOUT)

    def call(self, timeout: float = 10.0) -> Any:
        return self.app.noop.delay().get(timeout=timeout)

    def stop(self) -> None:
        from bench.contenders.workers import STOP_GRACE, kill_tree

        try:
            if self.proc is not None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(STOP_GRACE)
                except subprocess.TimeoutExpired:
                    kill_tree(self.proc.pid)
                    self.proc.wait(5)
                self.log.close()
        finally:
            self.app.app.close()
            common.delete_redis_keys(self.ns)


class _Dramatiq(Contender):
    def __init__(self, ns: str) -> None:
        import logging

        import dramatiq
        from dramatiq.brokers.redis import RedisBroker
        from dramatiq.results import Results
        from dramatiq.results.backends.redis import RedisBackend

        logging.getLogger("dramatiq").setLevel(logging.WARNING)
        self.broker = RedisBroker(url=common.REDIS_URL, namespace=ns)
        self.backend = RedisBackend(url=common.REDIS_URL, namespace=f"{ns}-results")
        self.broker.add_middleware(Results(backend=self.backend))
        dramatiq.set_broker(self.broker)

        def noop() -> int:
            return 1

        self.actor = dramatiq.actor(noop, actor_name="bench_call_noop", queue_name="bench",
                                    broker=self.broker, store_results=True)
        self.ns = ns

    def start(self) -> None:
        import dramatiq

        self.worker = dramatiq.Worker(self.broker, worker_threads=common.THREADS)
        self.worker.start()

    def call(self, timeout: float = 10.0) -> Any:
        return self.actor.send().get_result(backend=self.backend, block=True,
                                            timeout=int(timeout * 1000))

    def stop(self) -> None:
        try:
            self.worker.stop()
            self.broker.close()
        finally:
            common.delete_redis_keys(self.ns)


# -- one round ---------------------------------------------------------------------------


def _figures(seconds: list[float]) -> dict[str, float]:
    return {"n": len(seconds), "p50_ms": common.percentile(seconds, 50) * 1e3,
            "p90_ms": common.percentile(seconds, 90) * 1e3,
            "p99_ms": common.percentile(seconds, 99) * 1e3,
            "mean_ms": statistics.fmean(seconds) * 1e3, "max_ms": max(seconds) * 1e3}


def _sequential(system: Contender, calls: int) -> dict[str, float]:
    clock = time.perf_counter
    times = []
    for _ in range(calls):
        began = clock()
        value = system.call()
        times.append(clock() - began)
        if value != 1:
            raise AssertionError(f"the call returned {value!r}, not 1")
    return _figures(times)


def _concurrent(system: Contender, calls: int) -> dict[str, Any]:
    """*calls* calls spread over CALLERS threads: calls/s over the wall time."""
    clock = time.perf_counter
    times: list[float] = []
    errors: list[str] = []
    gate = threading.Barrier(CALLERS + 1)

    def caller(count: int) -> None:
        gate.wait()
        try:
            for _ in range(count):
                began = clock()
                system.call()
                times.append(clock() - began)  # list.append is atomic
        except Exception as exc:  # noqa: BLE001 - recorded, not hidden
            errors.append(f"{type(exc).__name__}: {exc}")

    shares = [calls // CALLERS + (1 if i < calls % CALLERS else 0) for i in range(CALLERS)]
    threads = [threading.Thread(target=caller, args=(n,), daemon=True) for n in shares]
    for thread in threads:
        thread.start()
    gate.wait()
    began = clock()
    for thread in threads:
        thread.join(120)
    wall = clock() - began
    if errors or len(times) < calls:
        return {"failed": f"{len(times)} of {calls} calls returned; "
                          f"{len(errors)} caller(s) raised: {errors[:3]}"}
    return {"callers": CALLERS, "calls_per_s": calls / wall, **_figures(times)}


def one(key: str, calls: int, warmup: int, concurrent: int) -> dict[str, Any]:
    """A round of *key*: the figures of the module docstring."""
    ns = f"bench-call-{os.getpid()}-{int(time.time())}"
    with tempfile.TemporaryDirectory(prefix="tempest-bench-") as tmp:
        system = make(key, ns, Path(tmp))
        system.start()
        try:
            system.call(timeout=60)  # the first may wait for a worker process's boot
            for _ in range(warmup - 1):
                system.call()
            result: dict[str, Any] = {"sequential": _sequential(system, calls)}
            if concurrent:
                result["concurrent"] = _concurrent(system, concurrent)
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


def _facts() -> dict[str, Any]:
    """The machine, the servers and the libraries measured."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    facts: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "cpu": model, "platform": platform.platform(),
                    "python": platform.python_version(),
                    "load_average": os.getloadavg()}}
    versions: dict[str, str] = {}
    for name in ("celery", "kombu", "dramatiq", "redis", "hiredis", "psycopg"):
        try:
            versions[name] = __import__(name).__version__
        except (ImportError, AttributeError):
            pass
    try:
        import redis

        client = redis.Redis.from_url(common.REDIS_URL)
        versions["redis-server"] = client.info("server")["redis_version"]
        client.close()
    except Exception:  # noqa: BLE001 - a fact we could not get is left out
        pass
    try:
        import psycopg

        with psycopg.connect(common.POSTGRES_DSN, connect_timeout=2) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            if row:
                versions["postgres"] = row[0]
    except Exception:  # noqa: BLE001
        pass
    facts["versions"] = versions
    facts["redis_parser"] = redis_parser()
    return facts


def redis_parser() -> str:
    """The reply parser redis-py uses in this venv, for every contender alike (tempest's
    RedisQueue, kombu's Redis transport and Celery's result backend, Dramatiq):
    ``hiredis`` where it is importable, else redis-py's own ``python`` one."""
    try:
        from redis.utils import HIREDIS_AVAILABLE
    except ImportError:
        return "none"
    return "hiredis" if HIREDIS_AVAILABLE else "python"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.call", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=1000, help="sequential calls, tempest")
    parser.add_argument("--peer-calls", type=int, default=300, help="sequential calls, peers")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--concurrent", type=int, default=400,
                        help=f"calls over {CALLERS} caller threads (0: none)")
    parser.add_argument("--only", nargs="+", default=list(CONTENDERS))
    parser.add_argument("--out", help="write the rounds and the machine's facts here (JSON)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--log-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.engine:
        return serve(args.engine, args.log_dir)
    if args.one:
        figures = one(args.one, args.calls, args.warmup, args.concurrent)
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
            calls = args.peer_calls if key in PEERS else args.calls
            command = [sys.executable, "-m", "bench.call", "--one", key, "--calls", str(calls),
                       "--warmup", str(args.warmup), "--concurrent", str(args.concurrent)]
            try:
                done = subprocess.run(command, cwd=common.ROOT, capture_output=True, text=True,
                                      check=False, timeout=300)
            except subprocess.TimeoutExpired as exc:
                print(f"{key} round {round_ + 1} timed out:\n{exc.stderr!s:.3000}",
                      file=sys.stderr)
                continue
            line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
            if done.returncode or not line:
                print(f"{key} round {round_ + 1} failed:\n{done.stderr[-3000:]}",
                      file=sys.stderr)
                continue
            results.setdefault(key, []).append(json.loads(line[0][7:]))
            print(f"{key} round {round_ + 1}: {line[0][7:]}", file=sys.stderr, flush=True)

    def seq(name: str) -> Callable[[dict[str, Any]], float]:
        return lambda f: f["sequential"][name]

    def conc(name: str) -> Callable[[dict[str, Any]], float]:
        return lambda f: f["concurrent"][name]

    base = _median(results.get(BASELINE, []), seq("p50_ms"))
    print(f"\nmedians of {args.rounds} rounds; sequential: {args.calls} calls (peers "
          f"{args.peer_calls}) after {args.warmup} warm-up calls; concurrent: "
          f"{args.concurrent} calls over {CALLERS} caller threads; redis-py's reply parser: "
          f"{redis_parser()}")
    print("| contender | p50 (ms) | p90 (ms) | p99 (ms) | p50 ÷ tempest-redis p50 "
          f"| {CALLERS} callers: calls/s | {CALLERS} callers: p50 / p99 (ms) |")
    print("|---" * 7 + "|")
    medians: dict[str, float] = {}
    for key, rounds in results.items():
        medians[key] = p50 = _median(rounds, seq("p50_ms"))
        print(f"| {key} | {p50:.3f} | {_median(rounds, seq('p90_ms')):.3f} "
              f"| {_median(rounds, seq('p99_ms')):.3f} | {p50 / base:.2f}× "
              f"| {_median(rounds, conc('calls_per_s')):,.0f} "
              f"| {_median(rounds, conc('p50_ms')):.2f} / {_median(rounds, conc('p99_ms')):.2f} |")
    print("\ntargets (p50):")
    for key, bound in TARGETS.items():
        if key in medians:
            verdict = "met" if medians[key] < bound else "MISSED"
            print(f"  {key} {medians[key]:.3f} ms < {bound:g} ms: {verdict}")
    for key in PEERS:
        if key in medians and BASELINE in medians:
            factor = medians[key] / medians[BASELINE]
            verdict = "met" if factor >= PEER_FACTOR else "MISSED"
            print(f"  {key} p50 / {BASELINE} p50 = {factor:.1f}× >= {PEER_FACTOR:g}×: {verdict}")
    if args.out:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=common.ROOT,
                                capture_output=True, text=True, check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "tempest"],
                               cwd=common.ROOT, capture_output=True, text=True,
                               check=False).stdout.split("\n")
        common.write_json(args.out, {
            "commit": commit, "tempest_changed": [x[3:] for x in dirty if x],
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **_facts(),
            "options": vars(args), "rounds": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
