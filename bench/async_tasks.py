"""Coroutine tasks side by side: ``python -m bench.async_tasks [--rounds R] [--only KEY...]``.

Three measurements of ``async def`` tasks, each contender in a fresh process
per round (``--one KEY --scenario S``), rounds interleaved (the order of the
contenders rotates by one place per round), medians over the rounds:

``sleep``
    *sleep wall*: ``--sleep-n`` (10,000) tasks, each ``await
    asyncio.sleep(1)``, all enqueued first; then the worker starts. Wall time
    from just before the worker's start until the last task's sleep ended
    (the worker's start-up counts, for everyone alike). Concurrency 10,000:
    tempest ``coroutines=10000``, arq ``max_jobs=10000``, SAQ
    ``concurrency=--saq-concurrency``.
``noop``
    *async no-op throughput* on Redis: ``--noop-n`` (20,000) tasks whose
    coroutine does nothing, enqueued first; tasks/s = N / (last task's end -
    first task's start), as in the main suite (start-up excluded); the wall
    time from the worker's start is recorded too. Concurrency
    ``--noop-concurrency`` (100) for everyone.
``memory``
    *memory per waiting coroutine task*: a started, idle worker runs
    ``--memory-warmup`` (1,000) tasks that wait on a gate, which is then
    opened (warm-up, not counted); RSS is read; ``--memory-n`` (10,000) more
    are enqueued and, once every one of them waits on the gate, RSS is read
    again: (RSS while waiting - RSS before) / N. The same once more under
    ``tracemalloc`` (Python allocations still alive while they wait / N).

Contenders (``--only``):

``tempest-memory``, ``tempest-redis``
    an Engine, ``threads = 8``, ``coroutines`` as above, ``log_level``
    WARNING, logs in a temporary directory, on ``MemoryQueue()`` /
    ``RedisQueue(url, name=<run's namespace>)``; started with
    ``Engine.start()`` in the measuring process. (sleep, noop: Redis only,
    memory: MemoryQueue only.)
``arq-redis``
    ``arq.worker.Worker(max_jobs=..., keep_result=0, handle_signals=False)``
    run in the measuring process's event loop, its defaults otherwise
    (poll every 0.5 s, reading up to max(5 x max_jobs, 100) job ids a poll:
    at max_jobs=100 that is 500 jobs per 0.5 s, a ceiling of 1,000 jobs/s).
    Its redis-py pool is a ``BlockingConnectionPool`` of ARQ_CONNECTIONS
    (1,000): redis-py 8's default pool of 100 raises once 100 are in use.
``saq-redis``
    ``saq.Worker(RedisQueue(client, name=...), concurrency=...)`` in the
    measuring process's event loop, its defaults otherwise; jobs enqueued with
    ``ttl=-1`` (no job record kept after it ends; SAQ's default keeps it, with
    the result, 600 s), and, for the gate's tasks only, ``timeout=0`` (SAQ's
    default kills a job after 10 s). The redis-py client is made with an
    unbounded connection pool: redis-py 8 bounds an asyncio pool at 100 and
    raises past it, and SAQ holds one connection per concurrency slot (redis-py
    before 8, which SAQ's ``[redis]`` extra asks for, had no bound). A SAQ
    run whose concurrency this Redis server cannot hold within its
    ``maxclients`` (leaving 500 for everyone else on it) is refused, not run.

Every contender runs the same coroutine bodies (:func:`body_noop`,
:func:`body_sleep`, :func:`body_hold`), which mark the first start and count
the ends, as :mod:`bench.common`'s task bodies do. Redis contenders use
``BENCH_REDIS_URL`` (database 15 by default), every key named after the
round's namespace and deleted after the round, killed or not. Each round has a
timeout; a child that outlives it is killed (its process group).

The parent prints a table per measurement and the targets, and, with
``--out``, writes every round's figures and the machine's facts as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import gc
import importlib.util
import itertools
import json
import logging
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench import common

SCENARIOS: dict[str, tuple[str, ...]] = {
    "sleep": ("tempest-memory", "tempest-redis", "arq-redis", "saq-redis"),
    "noop": ("tempest-redis", "arq-redis", "saq-redis"),
    "memory": ("tempest-memory", "arq-redis", "saq-redis"),
}
CONTENDERS = ("tempest-memory", "tempest-redis", "arq-redis", "saq-redis")
TEMPEST_THREADS = common.THREADS
UNBOUNDED = 2**31
"""redis-py's asyncio pool size before version 8 (8 made it 100)."""
ARQ_CONNECTIONS = 1000
"""arq's connection pool (blocking): above the 100 its drains reach, 10% of maxclients."""
REDIS_RESERVE = 500
"""Connections a SAQ run leaves free for the other clients of a shared Redis."""
SAQ_EXTRA_CONNECTIONS = 64
"""SAQ's connections beyond one per slot: upkeep, pub/sub, enqueues (at most 20)."""
SETTLE = 1.0
"""Seconds between reaching a state and reading memory in it."""
TARGETS = {"sleep": {"tempest-memory": 1.5, "tempest-redis": 3.0},
           "memory": {"tempest-memory": 10.0}}
"""Upper bounds: sleep wall (s), KiB per waiting task."""
NOOP_FACTOR = 2.0
"""tempest-redis's no-op tasks/s at least this many times arq's and SAQ's."""


class RunFailed(Exception):
    """A round that cannot give figures; *final*: the next rounds would fail alike."""

    def __init__(self, message: str, final: bool = False) -> None:
        super().__init__(message)
        self.final = final


# -- the finish line, the gate and the task bodies ---------------------------------------


class Line:
    """When the first body started, when the *target*-th one ended.

    *on_done* is called (in the thread of that body) when the target is
    reached. ``itertools.count`` steps atomically under the GIL, as in
    :class:`bench.common.FinishLine`.
    """

    def __init__(self, target: int, on_done: Callable[[], None] | None = None) -> None:
        self.target = target
        self.first: float | None = None
        self.last: float | None = None
        self.base = 0
        """The contender's processed count when this line was armed (cumulative counters)."""
        self._count = itertools.count(1)
        self._on_done = on_done

    def begin(self) -> None:
        """Mark the first start."""
        if self.first is None:
            self.first = time.monotonic()

    def end(self) -> None:
        """Count one end; the target-th notes the time."""
        if next(self._count) == self.target:
            self.last = time.monotonic()
            if self._on_done is not None:
                self._on_done()

    def ended(self) -> int:
        """Bodies ended so far (a copy of the counter is stepped, not the counter)."""
        return next(copy.copy(self._count)) - 1


class Gate:
    """Holds :func:`body_hold` coroutines until opened, on whichever loops they run.

    Each event loop gets an ``asyncio.Event`` of its own; :meth:`open` sets
    each in its loop's thread. *on_full* is called once *expected* bodies wait.
    """

    def __init__(self, expected: int, on_full: Callable[[], None]) -> None:
        self.expected = expected
        self.arrived = 0
        self._on_full = on_full
        self._open = False
        self._lock = threading.Lock()
        self._events: dict[asyncio.AbstractEventLoop, asyncio.Event] = {}

    async def wait(self) -> None:
        """Wait until the gate opens (at once if it is open)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._open:
                return
            event = self._events.get(loop)
            if event is None:
                event = self._events[loop] = asyncio.Event()
            self.arrived += 1
            full = self.arrived == self.expected
        if full:
            self._on_full()
        await event.wait()

    def open(self) -> None:
        """Let every waiting body (and every later one) through."""
        with self._lock:
            self._open = True
            events = list(self._events.items())
        for loop, event in events:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop has closed: nothing waits there
                pass


_line = Line(0)
_gate: Gate | None = None


async def body_noop() -> None:
    """The no-op coroutine: it only crosses the finish line."""
    line = _line
    line.begin()
    line.end()


async def body_sleep(seconds: float) -> None:
    """``await asyncio.sleep(seconds)`` between the start mark and the end count."""
    line = _line
    line.begin()
    await asyncio.sleep(seconds)
    line.end()


async def body_hold() -> None:
    """Waits on the current gate (memory measurement)."""
    line, gate = _line, _gate
    line.begin()
    if gate is not None:
        await gate.wait()
    line.end()


BODIES: dict[str, Callable[..., Awaitable[None]]] = {
    "noop": body_noop, "sleep": body_sleep, "hold": body_hold}


def _peer_function(body: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """*body* as an arq or SAQ job function: ``ctx`` first, the body's arguments after."""

    async def run(ctx: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        await body(*args, **kwargs)

    return run


_tempest_tasks: dict[str, Any] = {}


def tempest_tasks() -> dict[str, Any]:
    """tempest's Task classes for the bodies, defined at first use.

    Here and not at import time, so that this module (and the peers' rounds)
    works whatever state the checkout's tempest is in.
    """
    if not _tempest_tasks:
        from tempest import Task

        class AsyncBenchNoop(Task):
            """The no-op coroutine task."""

            async def process(self) -> None:
                await body_noop()

        class AsyncBenchSleep(Task):
            """Sleeps *seconds* in ``asyncio.sleep``."""

            async def process(self, seconds: float) -> None:
                await body_sleep(seconds)

        class AsyncBenchHold(Task):
            """Waits on the gate."""

            async def process(self) -> None:
                await body_hold()

        _tempest_tasks.update(noop=AsyncBenchNoop, sleep=AsyncBenchSleep, hold=AsyncBenchHold)
    return _tempest_tasks


# -- the contenders ----------------------------------------------------------------------


class Contender:
    """What a round needs of a system; every method runs in the measuring loop."""

    uses_redis = True

    async def setup(self) -> None:
        """Connect and build the worker; nothing runs yet."""
        raise NotImplementedError

    async def enqueue(self, body: str, count: int, *args: float) -> None:
        """Enqueue *count* tasks running *body* with *args*."""
        raise NotImplementedError

    async def start(self) -> None:
        """Start the worker; returns at once."""
        raise NotImplementedError

    async def stop(self) -> None:
        """Stop the worker (bounded); only called after :meth:`start`."""
        raise NotImplementedError

    async def cleanup(self) -> None:
        """Close connections, delete this round's keys; always called."""

    def counters(self) -> dict[str, Any]:
        """The system's own counts, for the record and for failure messages."""
        return {}

    def problem(self, line: Line) -> str | None:
        """Why the tasks can no longer reach *line*'s target, or None."""
        return None


class TempestContender(Contender):
    """An Engine in this process, on MemoryQueue or RedisQueue."""

    def __init__(self, backend: str, ns: str, tmp: Path, concurrency: int) -> None:
        self.backend, self.ns, self.tmp, self.concurrency = backend, ns, tmp, concurrency
        self.uses_redis = backend == "redis"
        self.started = False
        self._counted_since: float | None = None

    async def setup(self) -> None:
        try:
            from bench.contenders.inprocess import queue_class
            from tempest import ConfigurationError, Engine

            self.tasks = tempest_tasks()
        except Exception as exc:
            raise RunFailed(f"tempest does not import here: {type(exc).__name__}: {exc}",
                            final=True) from exc
        cls = queue_class(self.backend)
        self.queue = cls() if self.backend == "memory" else cls(common.REDIS_URL, name=self.ns)
        options = {"name": f"tempest-async-{self.backend}", "threads": TEMPEST_THREADS,
                   "coroutines": self.concurrency, "queue": self.queue,
                   "log_dir": str(self.tmp / "logs"), "log_level": "WARNING"}
        try:
            self.engine: Any = type(f"BenchAsync_{self.backend}", (Engine,), {
                "configure": type("configure", (), options), "__module__": __name__})
        except ConfigurationError as exc:
            raise RunFailed("this tempest has no coroutine tasks yet (no `coroutines` option): "
                            f"ConfigurationError: {exc}", final=True) from exc

    async def enqueue(self, body: str, count: int, *args: float) -> None:
        task, submit = self.tasks[body], self.engine.submit
        for _ in range(count):
            submit(task, *args)

    async def start(self) -> None:
        self.engine.start()
        self.started = True

    async def stop(self) -> None:
        if not self.engine.stop(timeout=60):
            raise RunFailed("the engine did not stop within 60 s")

    async def cleanup(self) -> None:
        if self.started:  # a failed round: make sure no engine thread outlives it
            self.engine.stop(timeout=30)
        queue = getattr(self, "queue", None)
        close = getattr(queue, "close", None)
        if callable(close):
            close()
        if self.uses_redis:
            common.delete_redis_keys(self.ns)

    def counters(self) -> dict[str, Any]:
        return dict(self.engine.stats())

    def problem(self, line: Line) -> str | None:
        stats = self.engine.stats()
        bad = {k: stats.get(k, 0) for k in ("failed", "timed_out", "rejected")}
        if any(bad.values()):
            return f"tasks did not succeed: {bad}; main log: {self._log_tail()}"
        if stats.get("processed", 0) - line.base >= line.target and line.last is None:
            now = time.monotonic()
            if self._counted_since is None:
                self._counted_since = now
            elif now - self._counted_since > 2.0:
                raise RunFailed(
                    f"the engine counts {stats['processed']} tasks processed but only "
                    f"{line.ended()} coroutine bodies ended: this tempest does not await "
                    "`async def process`", final=True)
        return None

    def _log_tail(self, lines: int = 5) -> str:
        texts = []
        for path in sorted((self.tmp / "logs").glob("*.log")):
            if not path.name.endswith(".task.log"):
                texts += path.read_text(errors="replace").splitlines()[-lines:]
        return " | ".join(texts) or "(empty)"


class ArqContender(Contender):
    """An arq Worker in this process's event loop."""

    def __init__(self, ns: str, concurrency: int) -> None:
        self.ns, self.concurrency = ns, concurrency
        self.queue_name = f"{ns}:queue"
        self._seq = itertools.count()
        self.task: asyncio.Task[None] | None = None

    async def setup(self) -> None:
        import redis.asyncio
        from arq.connections import ArqRedis, RedisSettings
        from arq.worker import Worker, func

        settings = RedisSettings.from_dsn(common.REDIS_URL)
        # redis-py 8 bounds an asyncio pool at 100 connections and raises past it, which
        # max_jobs above 100 reaches (10,000 jobs ending at once open a pipeline each).
        # Unbounded, that burst takes the shared server to maxclients; a blocking pool
        # makes the burst wait for a connection instead. arq holds no connection while
        # a job runs (it polls, it does not block in Redis), so the wait always ends.
        connections = redis.asyncio.BlockingConnectionPool.from_url(
            common.REDIS_URL, max_connections=ARQ_CONNECTIONS, timeout=60)
        self.pool = ArqRedis(connection_pool=connections,
                             default_queue_name=self.queue_name)
        self.worker = Worker(
            [func(_peer_function(body), name=name) for name, body in BODIES.items()],
            queue_name=self.queue_name, redis_settings=settings, redis_pool=self.pool,
            max_jobs=self.concurrency, keep_result=0, handle_signals=False)

    async def enqueue(self, body: str, count: int, *args: float) -> None:
        for chunk in _chunks(count):
            jobs = await asyncio.gather(*(
                self.pool.enqueue_job(body, *args, _job_id=f"{self.ns}-{next(self._seq)}")
                for _ in range(chunk)))
            if not all(jobs):
                raise RunFailed("arq refused a job id as a duplicate")

    async def start(self) -> None:
        self.task = asyncio.create_task(self.worker.async_run())

    async def stop(self) -> None:
        # The figures are taken: arq's close() cancels its poll loop and may
        # raise that cancellation back; how it ends does not matter here.
        try:
            await asyncio.wait_for(self.worker.close(), 60)
        except (asyncio.CancelledError, Exception) as exc:  # noqa: BLE001
            print(f"arq's close ended with {exc!r}", file=sys.stderr)
        if self.task is not None:
            await _finish_task(self.task)

    async def cleanup(self) -> None:
        if self.task is not None and not self.task.done():
            await _finish_task(self.task)
        pool = getattr(self, "pool", None)
        if pool is not None:
            await pool.aclose()
        common.delete_redis_keys(self.ns)

    def counters(self) -> dict[str, Any]:
        worker = getattr(self, "worker", None)
        if worker is None:
            return {}
        return {"complete": worker.jobs_complete, "failed": worker.jobs_failed,
                "retried": worker.jobs_retried}

    def problem(self, line: Line) -> str | None:
        if self.worker.jobs_failed:
            return f"arq jobs failed: {self.counters()}; first error: {ERRORS.first}"
        if self.task is not None and self.task.done():
            return f"arq's worker ended: {self.task.exception()!r}"
        return None


class SaqContender(Contender):
    """A SAQ Worker in this process's event loop."""

    def __init__(self, ns: str, concurrency: int) -> None:
        self.ns, self.concurrency = ns, concurrency
        self.task: asyncio.Task[None] | None = None

    async def setup(self) -> None:
        import redis
        import redis.asyncio
        from saq import Worker
        from saq.queue.redis import RedisQueue

        client = redis.Redis.from_url(common.REDIS_URL)
        try:
            info = client.info("clients")
            maxclients = int(info.get("maxclients") or client.config_get("maxclients")
                             ["maxclients"])
            connected = int(info["connected_clients"])
        finally:
            client.close()
        need = self.concurrency + SAQ_EXTRA_CONNECTIONS
        room = maxclients - connected - REDIS_RESERVE
        if need > room:
            raise RunFailed(
                f"not run: SAQ holds one Redis connection per concurrency slot, so concurrency "
                f"{self.concurrency} needs about {need} clients; this Redis allows {maxclients} "
                f"({connected} connected now, {REDIS_RESERVE} left for others). "
                f"--saq-concurrency {max(room - SAQ_EXTRA_CONNECTIONS, 0) // 1000 * 1000} "
                "would fit", final=True)
        self.queue = RedisQueue(redis.asyncio.Redis.from_url(
            common.REDIS_URL, max_connections=UNBOUNDED), name=self.ns)
        await self.queue.connect()
        self.worker = Worker(
            self.queue, [(name, _peer_function(body)) for name, body in BODIES.items()],
            concurrency=self.concurrency)

    async def enqueue(self, body: str, count: int, *args: float) -> None:
        options: dict[str, Any] = {"ttl": -1}
        if body == "sleep":
            options["seconds"] = args[0]
        elif body == "hold":
            options["timeout"] = 0
        for chunk in _chunks(count):
            jobs = await asyncio.gather(*(self.queue.enqueue(body, **options)
                                          for _ in range(chunk)))
            if not all(jobs):
                raise RunFailed("SAQ refused a job as a duplicate")

    async def start(self) -> None:
        self.task = asyncio.create_task(self.worker.start())

    async def stop(self) -> None:
        await asyncio.wait_for(self.worker.stop(), 60)
        if self.task is not None:
            await _finish_task(self.task)

    async def cleanup(self) -> None:
        if self.task is not None and not self.task.done():
            await _finish_task(self.task)
        queue = getattr(self, "queue", None)
        if queue is not None:
            await asyncio.wait_for(queue.disconnect(), 30)
        common.delete_redis_keys(self.ns)

    def problem(self, line: Line) -> str | None:
        if self.task is not None and self.task.done():
            return f"SAQ's worker ended: {self.task.exception()!r}"
        return None


def _chunks(count: int, size: int = 100) -> list[int]:
    """*count* split into chunks of at most *size*: enqueues in flight at once."""
    return [min(size, count - start) for start in range(0, count, size)]


async def _finish_task(task: asyncio.Task[None], timeout: float = 15.0) -> None:
    """Wait up to *timeout* s for *task*, then cancel it; swallow how it ended."""
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        task.cancel()
        await asyncio.wait({task}, timeout=5)
    if task.done() and not task.cancelled() and task.exception() is not None:
        print(f"worker task ended with {task.exception()!r}", file=sys.stderr)


def make(key: str, ns: str, tmp: Path, concurrency: int) -> Contender:
    """The contender *key*, its keys named after *ns*."""
    if key == "tempest-memory":
        return TempestContender("memory", ns, tmp, concurrency)
    if key == "tempest-redis":
        return TempestContender("redis", ns, tmp, concurrency)
    if key == "arq-redis":
        return ArqContender(ns, concurrency)
    if key == "saq-redis":
        return SaqContender(ns, concurrency)
    raise SystemExit(f"unknown contender {key!r}; known: {', '.join(CONTENDERS)}")


def unavailable(key: str) -> str | None:
    """Why *key* cannot run here, or None (tempest's coroutine support: see the rounds)."""
    for peer in ("arq", "saq"):
        if key.startswith(peer) and importlib.util.find_spec(peer) is None:
            return f"{peer} is not installed (bench/requirements.txt)"
    if key.endswith("-redis"):
        return common.redis_reachable()
    return None


# -- one round ---------------------------------------------------------------------------


class ErrorLog(logging.Handler):
    """Counts ERROR records of every logger (arq's and SAQ's failures), keeps the first."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count = 0
        self.first: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        if self.first is None:
            self.first = f"{record.name}: {record.getMessage()}"[:500]


ERRORS = ErrorLog()


class Signal:
    """A thread-safe one-shot wake-up for the measuring loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.event = asyncio.Event()

    def fire(self) -> None:
        """Set the event from any thread."""
        self.loop.call_soon_threadsafe(self.event.set)

    async def wait(self, contender: Contender, line: Line, timeout: float, what: str) -> None:
        """Wait for :meth:`fire`; RunFailed after *timeout* s or on the contender's problem."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                await asyncio.wait_for(self.event.wait(), 0.25)
                return
            except asyncio.TimeoutError:
                pass
            problem = contender.problem(line)
            if problem:
                raise RunFailed(problem)
            if time.monotonic() > deadline:
                raise RunFailed(f"{what} within {timeout:g} s; {line.ended()} bodies ended; "
                                f"counters {contender.counters()}; errors logged "
                                f"{ERRORS.count}, first {ERRORS.first}")


class ClientWatch:
    """The peak of Redis's ``connected_clients`` over a run, less the count before it."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.peak = self.baseline = 0
        self._stop = threading.Event()
        if enabled:
            import redis

            self.client = redis.Redis.from_url(common.REDIS_URL)
            self.baseline = self._clients()

    def _clients(self) -> int:
        return int(self.client.info("clients")["connected_clients"])

    def start(self) -> None:
        """Sample every 0.1 s in a thread of its own until :meth:`stop`."""
        if not self.enabled:
            return

        def sample() -> None:
            while not self._stop.wait(0.1):
                self.peak = max(self.peak, self._clients())

        self.peak = self._clients()
        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()

    def stop(self) -> int | None:
        """Stop sampling; the contender's peak, or None if not watched."""
        if not self.enabled:
            return None
        self._stop.set()
        self.thread.join(5)
        self.client.close()
        return self.peak - self.baseline


def _arm(target: int, system: Contender) -> tuple[Line, Signal]:
    global _line
    signal_ = Signal()
    _line = Line(target, signal_.fire)
    _line.base = int(system.counters().get("processed", 0) or 0)
    return _line, signal_


async def drain(system: Contender, body: str, n: int, args: tuple[float, ...], *,
                timeout: float, watch: ClientWatch) -> dict[str, Any]:
    """Enqueue *n* tasks of *body*, start the worker, time until the n-th ended."""
    began = time.perf_counter()
    await system.enqueue(body, n, *args)
    enqueue_s = time.perf_counter() - began
    line, done = _arm(n, system)
    watch.start()
    cpu = common.cpu_seconds([os.getpid()])
    started = time.monotonic()
    try:
        await system.start()
        await done.wait(system, line, timeout, f"{n} tasks did not end")
        cpu = common.cpu_seconds([os.getpid()]) - cpu
    finally:
        clients = watch.stop()
    await system.stop()
    assert line.first is not None and line.last is not None
    result = {"n": n, "enqueue_s": enqueue_s, "wall_s": line.last - started,
              "first_start_s": line.first - started, "drain_s": line.last - line.first,
              "tasks_per_s": n / (line.last - line.first), "cpu_s": cpu,
              "cpu_us_per_task": cpu / n * 1e6, "redis_clients_peak": clients,
              "runs": line.ended(), "counters": system.counters()}
    if result["runs"] != n:
        print(f"warning: {result['runs']} bodies ran for {n} tasks", file=sys.stderr)
    return result


async def _hold(system: Contender, n: int, timeout: float) -> tuple[Gate, Line, Signal]:
    """Enqueue *n* gate tasks and wait until every one of them waits on the gate."""
    global _gate
    line, done = _arm(n, system)
    full = Signal()
    _gate = Gate(n, full.fire)
    await system.enqueue("hold", n)
    await full.wait(system, line, timeout, f"{n} tasks were not all waiting")
    return _gate, line, done


async def _release(system: Contender, gate: Gate, line: Line, done: Signal,
                   timeout: float) -> None:
    gate.open()
    await done.wait(system, line, timeout, f"{line.target} released tasks did not end")


async def memory(system: Contender, n: int, warmup: int, timeout: float) -> dict[str, Any]:
    """RSS and tracemalloc per task while *n* tasks wait on a gate (see the docstring)."""
    await system.start()
    if warmup:
        await _release(system, *await _hold(system, warmup, timeout), timeout)
    gc.collect()
    await asyncio.sleep(SETTLE)
    rss_before = common.rss_bytes()
    gate, line, done = await _hold(system, n, timeout)
    await asyncio.sleep(SETTLE)
    rss_waiting = common.rss_bytes()
    await _release(system, gate, line, done, timeout)
    gc.collect()
    await asyncio.sleep(SETTLE)
    rss_after = common.rss_bytes()

    tracemalloc.start()
    try:
        gc.collect()
        traced_before = tracemalloc.get_traced_memory()[0]
        gate, line, done = await _hold(system, n, timeout)
        await asyncio.sleep(SETTLE)
        traced_waiting = tracemalloc.get_traced_memory()[0]
        await _release(system, gate, line, done, timeout)
    finally:
        tracemalloc.stop()
    await system.stop()
    return {"n": n, "warmup": warmup, "rss_before": rss_before, "rss_waiting": rss_waiting,
            "rss_after": rss_after, "rss_kib_per_task": (rss_waiting - rss_before) / n / 1024,
            "traced_kib_per_task": (traced_waiting - traced_before) / n / 1024,
            "peak_rss": common.peak_rss_bytes(), "counters": system.counters()}


async def one(args: argparse.Namespace) -> dict[str, Any]:
    """One round of ``--one KEY`` in ``--scenario``, in this (fresh) process."""
    key, scenario, n, timeout = args.one, args.scenario, args.n, args.wait
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # a connection per slot needs a descriptor per slot
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with tempfile.TemporaryDirectory(prefix="tempest-bench-async-") as tmp:
        system = make(key, args.ns, Path(tmp), args.concurrency)
        watch = ClientWatch(system.uses_redis and scenario != "memory")  # before any connects
        try:
            await system.setup()
            if scenario == "sleep":
                result = await drain(system, "sleep", n, (args.seconds,), timeout=timeout,
                                     watch=watch)
            elif scenario == "noop":
                result = await drain(system, "noop", n, (), timeout=timeout, watch=watch)
            else:
                result = await memory(system, n, args.warmup, timeout)
        finally:
            await system.cleanup()
    result.update(concurrency=args.concurrency, errors_logged=ERRORS.count,
                  first_error=ERRORS.first)
    return result


def child(args: argparse.Namespace) -> int:
    """``--one KEY``: run one round, print ``RESULT {json}``; 1 if it failed."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger().addHandler(ERRORS)
    for name in ("arq", "saq"):
        logging.getLogger(name).setLevel(logging.WARNING)  # both log a line per job at INFO
    try:
        figures = asyncio.run(one(args))
    except RunFailed as exc:
        print("RESULT " + json.dumps({"failed": str(exc), "final": exc.final}), flush=True)
        return 1
    print("RESULT " + json.dumps(figures), flush=True)
    return 0


# -- the parent --------------------------------------------------------------------------


def _plan(args: argparse.Namespace, scenario: str, key: str) -> tuple[int, int, float]:
    """(tasks, concurrency, timeout s) of a round."""
    saq = key.startswith("saq")
    if scenario == "sleep":
        n = args.sleep_n
        return n, args.saq_concurrency if saq else n, 90 + n / 100
    if scenario == "noop":
        return args.noop_n, args.noop_concurrency, 90 + args.noop_n / 50
    n = min(args.memory_n, args.saq_concurrency) if saq else args.memory_n
    return n, args.saq_concurrency if saq else n, 150 + (n + args.memory_warmup) / 25


def _run_child(args: argparse.Namespace, code: Path, scenario: str, key: str, ns: str
               ) -> dict[str, Any]:
    """One round in a fresh process importing from *code*; its figures, or ``failed``."""
    n, concurrency, timeout = _plan(args, scenario, key)
    command = [sys.executable, "-m", "bench.async_tasks", "--one", key, "--scenario", scenario,
               "--ns", ns, "--n", str(n), "--concurrency", str(concurrency),
               "--seconds", str(args.sleep_s), "--warmup", str(args.memory_warmup),
               "--wait", str(timeout - 45)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(code), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.Popen(command, cwd=code, env=env, start_new_session=True, text=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, err = proc.communicate(timeout=10)
            return {"failed": f"killed after {timeout:g} s: {err[-2000:]}"}
        except BaseException:  # Ctrl-C: no child outlives the parent
            _kill_group(proc)
            raise
    finally:
        common.delete_redis_keys(ns)  # whatever a killed child left
    lines = [x for x in out.splitlines() if x.startswith("RESULT ")]
    if not lines:
        return {"failed": f"exit {proc.returncode}, no result: {err[-2000:]}"}
    figures: dict[str, Any] = json.loads(lines[-1][7:])
    if proc.returncode and "failed" not in figures:
        figures["failed"] = f"exit {proc.returncode}: {err[-2000:]}"
    return figures


def _kill_group(proc: subprocess.Popen[str]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass


def _stat(rounds: list[dict[str, Any]], name: str) -> tuple[float, float, float] | None:
    """(median, min, max) of *name* over the rounds that have it."""
    values = [r[name] for r in rounds if r.get(name) is not None]
    if not values:
        return None
    return statistics.median(values), min(values), max(values)


def _cell(stat: tuple[float, float, float] | None, fmt: str) -> str:
    if stat is None:
        return "—"
    median, low, high = stat
    return f"{median:{fmt}} ({low:{fmt}}–{high:{fmt}})"


def report(args: argparse.Namespace, results: dict[str, dict[str, list[dict[str, Any]]]],
           failures: dict[str, dict[str, list[str]]]) -> list[str]:
    """The tables and the targets, as printed lines."""
    out = [f"\nmedians of {args.rounds} rounds (min–max); a fresh process per round"]
    if "sleep" in results:
        out += [f"\nsleep wall: {args.sleep_n:,} tasks of `await asyncio.sleep({args.sleep_s:g})`,"
                " enqueued first; worker start -> last task's end",
                "| contender | concurrency | wall (s) | first start (s) | CPU (s) "
                "| Redis clients, peak |", "|---|---|---|---|---|---|"]
        for key, rounds in results["sleep"].items():
            out.append(f"| {key} | {rounds[0]['concurrency']:,} "
                       f"| {_cell(_stat(rounds, 'wall_s'), '.2f')} "
                       f"| {_cell(_stat(rounds, 'first_start_s'), '.2f')} "
                       f"| {_cell(_stat(rounds, 'cpu_s'), '.2f')} "
                       f"| {_cell(_stat(rounds, 'redis_clients_peak'), '.0f')} |")
    if "noop" in results:
        out += [f"\nasync no-op on Redis: {args.noop_n:,} tasks enqueued first, concurrency "
                f"{args.noop_concurrency}; tasks/s = N / (last end - first start)",
                "| contender | tasks/s | wall from start (s) | CPU µs/task "
                "| Redis clients, peak |", "|---|---|---|---|---|"]
        for key, rounds in results["noop"].items():
            out.append(f"| {key} | {_cell(_stat(rounds, 'tasks_per_s'), ',.0f')} "
                       f"| {_cell(_stat(rounds, 'wall_s'), '.2f')} "
                       f"| {_cell(_stat(rounds, 'cpu_us_per_task'), '.0f')} "
                       f"| {_cell(_stat(rounds, 'redis_clients_peak'), '.0f')} |")
    if "memory" in results:
        out += ["\nmemory per task waiting on a gate (after a warm-up of "
                f"{args.memory_warmup:,})",
                "| contender | waiting | RSS KiB/task | tracemalloc KiB/task "
                "| RSS before / waiting / after (MiB) |", "|---|---|---|---|---|"]
        for key, rounds in results["memory"].items():
            mib = [_stat(rounds, f"rss_{x}") for x in ("before", "waiting", "after")]
            out.append(f"| {key} | {rounds[0]['n']:,} "
                       f"| {_cell(_stat(rounds, 'rss_kib_per_task'), '.2f')} "
                       f"| {_cell(_stat(rounds, 'traced_kib_per_task'), '.2f')} | "
                       + " / ".join(f"{m[0] / 2**20:.1f}" if m else "—" for m in mib) + " |")
    out.append("\ntargets:")
    for scenario, bounds in TARGETS.items():
        name = "wall_s" if scenario == "sleep" else "rss_kib_per_task"
        unit = "s" if scenario == "sleep" else "KiB/task"
        for key, bound in bounds.items():
            stat = _stat(results.get(scenario, {}).get(key, []), name)
            verdict = "no figures" if stat is None else (
                "met" if stat[0] < bound else "MISSED")
            value = "—" if stat is None else f"{stat[0]:.2f} {unit}"
            out.append(f"  {scenario} {key}: {value} < {bound:g} {unit}: {verdict}")
    noop = results.get("noop", {})
    for peer in ("arq-redis", "saq-redis"):
        ours, theirs = noop.get("tempest-redis", []), noop.get(peer, [])
        a, b = _stat(ours, "tasks_per_s"), _stat(theirs, "tasks_per_s")
        if a and b:
            paired = [x["tasks_per_s"] / y["tasks_per_s"]
                      for x, y in zip(ours, theirs, strict=False)]
            verdict = "met" if a[0] / b[0] >= NOOP_FACTOR else "MISSED"
            out.append(f"  noop tempest-redis / {peer}: {a[0] / b[0]:.2f}× "
                       f"(per round {min(paired):.2f}–{max(paired):.2f}) >= {NOOP_FACTOR:g}×: "
                       f"{verdict}")
        else:
            out.append(f"  noop tempest-redis / {peer}: no figures")
    for scenario, keys in failures.items():
        for key, messages in keys.items():
            out.append(f"  {scenario} {key} failed {len(messages)}×: {messages[0][:600]}")
    return out


def _facts(code_digest: dict[str, Any]) -> dict[str, Any]:
    """The machine, the code measured and the versions of the peers and servers."""
    versions: dict[str, str] = {"python": platform.python_version()}
    for name in ("arq", "saq", "redis", "hiredis"):
        try:
            module = __import__(name)
            versions[name] = getattr(module, "__version__", None) or getattr(
                module, "VERSION", "?")
        except ImportError:
            pass
    try:
        import redis

        client = redis.Redis.from_url(common.REDIS_URL)
        versions["redis-server"] = client.info("server")["redis_version"]
        versions["redis-maxclients"] = str(client.info("clients").get("maxclients"))
        client.close()
    except Exception:  # noqa: BLE001 - a fact we could not get is left out
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=common.ROOT,
                            capture_output=True, text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "tempest"], cwd=common.ROOT,
                           capture_output=True, text=True, check=False).stdout.split("\n")
    return {"commit": commit, "tempest_changed": [x[3:] for x in dirty if x], **code_digest,
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "load_average": os.getloadavg()},
            "versions": {k: str(v) for k, v in versions.items()}}


def main(argv: list[str] | None = None) -> int:
    """Run the rounds (or, with ``--one``, one round in this process)."""
    parser = argparse.ArgumentParser(prog="python -m bench.async_tasks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", nargs="+", default=list(CONTENDERS), choices=CONTENDERS,
                        metavar="KEY")
    parser.add_argument("--skip", nargs="+", default=[], choices=tuple(SCENARIOS),
                        metavar="SCENARIO", help="sleep, noop, memory")
    parser.add_argument("--out", help="write the rounds and the machine's facts here (JSON)")
    parser.add_argument("--sleep-n", type=int, default=10_000)
    parser.add_argument("--sleep-s", type=float, default=1.0)
    parser.add_argument("--noop-n", type=int, default=20_000)
    parser.add_argument("--noop-concurrency", type=int, default=100)
    parser.add_argument("--memory-n", type=int, default=10_000)
    parser.add_argument("--memory-warmup", type=int, default=1000)
    parser.add_argument("--saq-concurrency", type=int, default=10_000,
                        help="SAQ's concurrency in sleep and memory (a Redis connection each)")
    for hidden in ("--one", "--scenario", "--ns"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=1.0, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--wait", type=float, default=120.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        return child(args)

    from bench.harness import snapshot

    run_id = uuid.uuid4().hex[:12]
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    failures: dict[str, dict[str, list[str]]] = {}
    given_up: set[tuple[str, str]] = set()
    with tempfile.TemporaryDirectory(prefix="tempest-bench-async-code-") as code_dir:
        code = Path(code_dir)
        digest = snapshot(code)  # rounds measure the code as it was now, edits or not
        skipped = {key: why for key in args.only if (why := unavailable(key))}
        for key, why in skipped.items():
            print(f"skip {key}: {why}", file=sys.stderr)
        serial = itertools.count()
        for round_ in range(args.rounds):
            for scenario, members in SCENARIOS.items():
                if scenario in args.skip:
                    continue
                keys = [k for k in members if k in args.only and k not in skipped]
                shift = round_ % len(keys) if keys else 0
                for key in keys[shift:] + keys[:shift]:
                    if (scenario, key) in given_up:
                        continue
                    ns = f"bench-async-{run_id}-{next(serial)}"
                    figures = _run_child(args, code, scenario, key, ns)
                    label = f"{scenario} {key} round {round_ + 1}"
                    if "failed" in figures:
                        print(f"{label} FAILED: {figures['failed']}", file=sys.stderr, flush=True)
                        failures.setdefault(scenario, {}).setdefault(key, []).append(
                            figures["failed"])
                        if figures.get("final"):
                            given_up.add((scenario, key))
                        continue
                    figures["round"] = round_ + 1
                    results.setdefault(scenario, {}).setdefault(key, []).append(figures)
                    brief = {k: round(v, 3) if isinstance(v, float) else v
                             for k, v in figures.items() if k != "counters"}
                    print(f"{label}: {json.dumps(brief)}", file=sys.stderr, flush=True)
    print("\n".join(report(args, results, failures)))
    if args.out:
        common.write_json(args.out, {**_facts(digest), "options": vars(args),
                                     "rounds": results, "failures": failures})
    wanted = {(s, k) for s, members in SCENARIOS.items() if s not in args.skip
              for k in members if k in args.only}
    return 0 if all(k in results.get(s, {}) for s, k in wanted) else 1


if __name__ == "__main__":
    sys.exit(main())
