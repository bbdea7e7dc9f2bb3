"""Peers whose workers are processes of their own: Dramatiq, Celery, RQ.

The runner imports the peer's app (see :mod:`bench.apps`) to enqueue, then
starts the peer's own command line with the same number of threads (RQ,
which has none, with as many processes), reads the finish line the workers
write, and stops them with SIGTERM -- SIGKILL for the whole process tree if
they have not exited 20 s later.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import json
import os
import queue
import signal
import subprocess
import sys

from bench import common
from bench.contenders import Contender, Context, wait_for_file

STOP_GRACE = 20.0
"""Seconds a worker has to exit after SIGTERM before its tree is killed."""


def kill_tree(root: int) -> None:
    for pid in reversed(common.process_tree(root)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class WorkerProcesses(Contender):
    """A peer started as ``command()`` in a process (tree) of its own."""

    family = "peer"
    uses_redis = True
    library = ""
    app_module = ""

    def unavailable(self) -> str | None:
        for name in (self.library, "redis"):
            if importlib.util.find_spec(name) is None:
                return f"{name} is not installed (bench/requirements.txt)"
        return common.redis_reachable()

    def setup(self, ctx: Context) -> None:
        super().setup(ctx)
        os.environ["BENCH_NS"] = ctx.ns
        os.environ["BENCH_REDIS_URL"] = ctx.redis_url
        self.app = importlib.import_module(self.app_module)
        import redis

        self.redis = redis.Redis.from_url(ctx.redis_url)
        self.proc: subprocess.Popen[bytes] | None = None
        self.result = ctx.tmp / "finish.json"

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self, target: int | None) -> None:
        env = dict(os.environ, BENCH_ROLE="worker", BENCH_TARGET=str(target or 0),
                   BENCH_RESULT=str(self.result), PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(common.ROOT), os.environ.get("PYTHONPATH")) if p)
        self.log = open(self.ctx.tmp / "worker.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.command(), cwd=common.ROOT, env=env,
                                     stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT)

    def wait(self, timeout: float) -> tuple[float, float]:
        wait_for_file(self.result, timeout, self.proc, self.task_failed)
        data = json.loads(self.result.read_text())
        return data["first"], data["last"]

    def task_failed(self) -> str | None:
        """A task raised in a worker (its traceback is in the worker's log), or None."""
        log = self.worker_log()
        if "Traceback (most recent call last)" not in log:
            return None
        return "a task raised in the worker process:\n" + log[-1200:]

    def next_probe(self, timeout: float) -> float:
        item = self.redis.blpop([f"{self.ctx.ns}:probes"], timeout=max(1, round(timeout)))
        if item is None:
            raise queue.Empty
        return float(item[1])

    def engine_pids(self) -> list[int]:
        return common.process_tree(self.proc.pid) if self.proc is not None else []

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                kill_tree(proc.pid)
                proc.wait(5)
        self.log.close()

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            kill_tree(self.proc.pid)
        self.redis.close()
        common.delete_redis_keys(self.ctx.ns, self.ctx.redis_url)

    def worker_log(self) -> str:
        try:
            return (self.ctx.tmp / "worker.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""


class DramatiqContender(WorkerProcesses):
    """``dramatiq --processes 1 --threads N``: one worker process with N threads."""

    key = "dramatiq-redis"
    label = "Dramatiq Redis"
    library = "dramatiq"
    app_module = "bench.apps.dramatiq_app"

    def enqueue(self, body: str, *args: float) -> None:
        self.app.TASKS[body].send(*args)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "dramatiq", self.app_module, "--processes", "1",
                "--threads", str(self.ctx.threads), "--worker-shutdown-timeout", "10000"]


class CeleryContender(WorkerProcesses):
    """``celery worker -P threads -c N``, logging at WARNING (no line per task).

    ``--without-heartbeat --without-gossip --without-mingle``: the usual
    flags for a Redis broker; they cost nothing per task.
    """

    key = "celery-redis"
    label = "Celery Redis (threads)"
    library = "celery"
    app_module = "bench.apps.celery_app"

    def enqueue(self, body: str, *args: float) -> None:
        self.app.TASKS[body].delay(*args)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "celery", "-A", self.app_module, "worker",
                "-P", "threads", "-c", str(self.ctx.threads), "--loglevel", "WARNING",
                "--without-heartbeat", "--without-gossip", "--without-mingle"]


class RQContender(WorkerProcesses):
    """``rq worker-pool -n N -w rq.worker.SimpleWorker``: N processes, no fork per job.

    RQ has no thread workers. Its default worker forks once per job; the
    SimpleWorker runs jobs in the worker process itself, RQ's fastest
    configuration. Jobs are enqueued with ``result_ttl=0`` (no result kept).
    """

    key = "rq-redis"
    label = "RQ Redis (processes)"
    library = "rq"
    app_module = "bench.apps.rq_jobs"

    def setup(self, ctx: Context) -> None:
        super().setup(ctx)
        from rq import Queue

        self.queue = Queue(ctx.ns, connection=self.redis)
        self._ids = itertools.count()

    def enqueue(self, body: str, *args: float) -> None:
        # Job ids carrying the namespace let cleanup find every key a job left.
        self.queue.enqueue(self.app.TASKS[body], *args, job_id=f"{self.ctx.ns}_{next(self._ids)}",
                           result_ttl=0)

    def command(self) -> list[str]:
        return [sys.executable, "-c", "from rq.cli import main; main()", "worker-pool",
                "-u", self.ctx.redis_url, "-n", str(self.ctx.threads),
                "-w", "rq.worker.SimpleWorker", "--logging-level", "WARNING", self.ctx.ns]

    def wait(self, timeout: float) -> tuple[float, float]:
        _, last = super().wait(timeout)
        firsts = [float(x) for x in self.redis.lrange(f"{self.ctx.ns}:firsts", 0, -1)]
        return min(firsts), last

    def cleanup(self) -> None:
        # A stopped worker leaves its hash behind for 60 s, a killed one its set
        # memberships too: find them by the queue they served.
        ns = self.ctx.ns.encode()
        for key in self.redis.scan_iter(match="rq:worker:*", count=1000):
            if self.redis.hget(key, "queues") == ns:
                self.redis.srem("rq:workers", key)
                self.redis.delete(key)
        self.redis.srem("rq:queues", f"rq:queue:{self.ctx.ns}")
        super().cleanup()
