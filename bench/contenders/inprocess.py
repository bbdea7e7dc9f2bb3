"""Contenders whose workers are threads of the runner process: the floor, tempest, Huey."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench import common
from bench.contenders import Contender, Context
from tempest import Engine, Task

# -- the floor ------------------------------------------------------------------------


class ThreadPool(Contender):
    """concurrent.futures.ThreadPoolExecutor: no queue, no logs, no outcomes.

    To enqueue before the workers run (as for everyone else), each worker is
    first given a task that waits on a gate; ``start`` opens the gate.
    """

    key = "threadpool"
    label = "ThreadPoolExecutor (floor)"
    family = "floor"

    def setup(self, ctx: Context) -> None:
        super().setup(ctx)
        self.pool = ThreadPoolExecutor(max_workers=ctx.threads,
                                       thread_name_prefix="bench-floor")
        self.gate = threading.Event()
        holding = threading.Barrier(ctx.threads + 1)

        def hold() -> None:
            holding.wait()
            self.gate.wait()

        for _ in range(ctx.threads):
            self.pool.submit(hold)
        holding.wait(timeout=10)  # every worker thread exists and holds
        self.bodies = {"noop": common.noop, "sleep": common.sleep, "sleep1": common.sleep1,
                       "probe": common.probe}

    def enqueue(self, body: str, *args: float) -> None:
        self.pool.submit(self.bodies[body], *args)

    def start(self, target: int | None) -> None:
        if target:
            common.arm(target)
        self.gate.set()

    def stop(self) -> None:
        self.gate.set()
        self.pool.shutdown(wait=True)


# -- tempest --------------------------------------------------------------------------


class BenchNoop(Task):
    """The no-op task."""

    def process(self) -> None:
        common.noop()


class BenchSleep(Task):
    """Sleeps 10 ms."""

    def process(self) -> None:
        common.sleep()


class BenchSleep1(Task):
    """Sleeps 1 ms."""

    def process(self) -> None:
        common.sleep1()


class BenchProbe(Task):
    """Reports its submit-to-start delay."""

    def process(self, submitted: float) -> None:
        common.probe(submitted)


TEMPEST_TASKS: dict[str, type[Task]] = {
    "noop": BenchNoop, "sleep": BenchSleep, "sleep1": BenchSleep1, "probe": BenchProbe}

QUEUE_CLASSES = {"memory": "MemoryQueue", "sqlite": "SQLiteQueue", "redis": "RedisQueue",
                 "postgres": "PostgresQueue"}


def queue_class(backend: str) -> Any:
    """tempest's queue class for *backend*; ImportError/AttributeError if it is not there.

    Looked up in ``tempest.queues`` first, then in its own module: a backend
    being written may not be exported yet.
    """
    name = QUEUE_CLASSES[backend]
    queues = importlib.import_module("tempest.queues")
    try:
        return getattr(queues, name)
    except (AttributeError, ImportError):
        return getattr(importlib.import_module(f"tempest.queues.{backend}"), name)


class TempestContender(Contender):
    """A tempest engine with *threads* workers on one of the built-in queues; with
    *prefetch*, its ``prefetch`` option set to that many (key ``...-prefetch``)."""

    family = "tempest"

    def __init__(self, backend: str, level: str = "WARNING", prefetch: int = 0) -> None:
        self.backend = backend
        self.level = level
        self.prefetch = prefetch
        self.key = (f"tempest-{backend}" + ("-info" if level == "INFO" else "")
                    + ("-prefetch" if prefetch else ""))
        self.label = (f"tempest {QUEUE_CLASSES[backend]}" + (" INFO" if level == "INFO" else "")
                      + (f" prefetch {prefetch}" if prefetch else ""))
        self.uses_redis = backend == "redis"

    def unavailable(self) -> str | None:
        try:
            queue_class(self.backend)
        except (ImportError, AttributeError) as exc:
            return f"tempest.queues.{QUEUE_CLASSES[self.backend]} is not importable ({exc})"
        if self.backend == "redis":
            if importlib.util.find_spec("redis") is None:
                return "the redis driver is not installed"
            return common.redis_reachable()
        if self.backend == "postgres":
            return common.postgres_reachable()
        return None

    def make_queue(self, ctx: Context) -> Any:
        cls = queue_class(self.backend)
        if self.backend == "memory":
            return cls()
        if self.backend == "sqlite":
            return cls(str(ctx.tmp / "tempest.sqlite3"))
        if self.backend == "redis":
            return cls(ctx.redis_url, name=ctx.ns)
        return cls(ctx.postgres_dsn, table=ctx.postgres_table, name=ctx.ns)

    def setup(self, ctx: Context) -> None:
        super().setup(ctx)
        self.queue = self.make_queue(ctx)
        options = {"name": self.key, "threads": ctx.threads, "queue": self.queue,
                   "log_dir": str(ctx.tmp / "logs"), "log_level": self.level}
        if self.prefetch:  # only then: bench.ab runs versions of tempest without it
            options["prefetch"] = self.prefetch
        self.engine: type[Engine] = type(
            f"Bench_{self.key.replace('-', '_')}", (Engine,),
            {"configure": type("configure", (), options), "__module__": __name__})

    def enqueue(self, body: str, *args: float) -> None:
        self.engine.submit(TEMPEST_TASKS[body], *args)

    def start(self, target: int | None) -> None:
        if target:
            common.arm(target)
        self.engine.start()

    def stop(self) -> None:
        if not self.engine.stop(timeout=60):
            raise RuntimeError(f"{self.key}: the engine did not stop within 60 s")

    def cleanup(self) -> None:
        close = getattr(self.queue, "close", None)
        if callable(close):
            close()
        if self.backend == "postgres":
            delete_postgres_queue(self.ctx.postgres_dsn, self.ctx.postgres_table, self.ctx.ns)
        elif self.backend == "redis":
            common.delete_redis_keys(self.ctx.ns, self.ctx.redis_url)

    def info(self) -> dict[str, object]:
        return {"stats": self.engine.stats()}


def delete_postgres_queue(dsn: str, table_name: str, name: str) -> None:
    """Delete what a run left in the bench's Postgres tables."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        for table in (table_name, f"{table_name}_rejected"):
            exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()
            if exists and exists[0]:
                conn.execute(f'DELETE FROM "{table}" WHERE queue = %s', (name,))


# -- Huey -----------------------------------------------------------------------------


class HueyContender(Contender):
    """A Huey consumer with *threads* thread workers, in the runner process.

    Run as ``huey_consumer -w N -k thread`` would run it, with its defaults
    (polling from 0.1 s backing off to 10 s when the storage cannot block,
    the periodic scheduler, worker health checks), and ``results=False``:
    tempest keeps no results either.
    """

    family = "peer"

    def __init__(self, storage: str) -> None:
        self.storage = storage
        self.key = f"huey-{storage}"
        self.label = {"memory": "Huey MemoryHuey", "sqlite": "Huey SqliteHuey",
                      "redis": "Huey RedisHuey"}[storage]
        self.uses_redis = storage == "redis"

    def unavailable(self) -> str | None:
        if importlib.util.find_spec("huey") is None:
            return "huey is not installed (bench/requirements.txt)"
        if self.storage == "redis":
            return common.redis_reachable()
        return None

    def setup(self, ctx: Context) -> None:
        super().setup(ctx)
        import huey

        logging.getLogger("huey").setLevel(logging.WARNING)  # as the other peers: no line a task
        if self.storage == "memory":
            self.huey = huey.MemoryHuey(ctx.ns, results=False)
        elif self.storage == "sqlite":
            self.huey = huey.SqliteHuey(ctx.ns, filename=str(ctx.tmp / "huey.sqlite3"),
                                        results=False)
        else:
            self.huey = huey.RedisHuey(ctx.ns, url=ctx.redis_url, results=False)
        self.tasks = {name: self.huey.task(name=f"bench.{name}")(body) for name, body in
                      (("noop", common.noop), ("sleep", common.sleep),
                                           ("sleep1", common.sleep1),
                                           ("probe", common.probe))}
        self.consumer: Any = None

    def enqueue(self, body: str, *args: float) -> None:
        self.tasks[body](*args)

    def start(self, target: int | None) -> None:
        from huey.consumer import ConsumerStopped

        if target:
            common.arm(target)
        consumer = self.huey.create_consumer(workers=self.ctx.threads, worker_type="thread")
        consumer.start()  # in the main thread: it installs signal handlers

        def supervise() -> None:  # Consumer.run() without the start()
            checked = time.monotonic()
            while True:
                try:
                    checked = consumer.loop(checked)
                except ConsumerStopped:
                    return

        self.consumer = consumer
        self.supervisor = threading.Thread(target=supervise, name="bench-huey", daemon=True)
        self.supervisor.start()

    def stop(self) -> None:
        if self.consumer is not None:
            self.consumer.stop(graceful=True)
            self.supervisor.join(15)

    def cleanup(self) -> None:
        if self.storage == "redis":
            self.huey.storage.flush_all()  # only this instance's keys (huey.*.<ns>)
        close = getattr(self.huey.storage, "close", None)
        if callable(close):
            close()
