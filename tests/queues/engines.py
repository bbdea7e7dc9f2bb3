"""Engines in processes of their own on one durable queue: kill -9 and sharing tests.

Each backend's test module defines two fixtures -- ``engines`` (an
:class:`EngineProcesses` on its queue) and ``queues`` (a factory of queue
handles) -- and subclasses :class:`EngineProcessChecks` as ``Test...``.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ..conftest import wait_for

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests" / "scripts" / "queue_engine.py"


class EngineProcesses:
    """queue_engine.py processes sharing one queue and one results file.

    *kind* and *queue_args* are the script's (see its docstring); *left*
    counts the messages still in the queue, waiting or leased (-1 when it
    cannot tell, e.g. the server is down).
    """

    def __init__(self, tmp_path: Path, kind: str, queue_args: list[str],
                 left: Callable[[], int]) -> None:
        self.tmp_path, self.kind, self.queue_args, self.left = tmp_path, kind, queue_args, left
        self.results = tmp_path / "results.txt"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))

    def start(self, threads: int, lease: float) -> tuple[subprocess.Popen[bytes], Path]:
        """Start one engine; return the process and its stdout file."""
        folder = self.tmp_path / f"engine{len(self.procs)}"
        folder.mkdir()
        out = folder / "out.txt"
        with open(out, "wb") as stdout, open(folder / "err.txt", "wb") as stderr:
            proc = subprocess.Popen(
                [sys.executable, str(SCRIPT), self.kind, str(self.results), str(folder),
                 str(threads), str(lease), *self.queue_args],
                stdout=stdout, stderr=stderr, cwd=folder, env=self.env)
        self.procs.append(proc)
        return proc, out

    def wait_ready(self, proc: subprocess.Popen[bytes], out: Path) -> None:
        """Wait until *proc*'s engine is starting its workers."""
        def ready() -> bool:
            if proc.poll() is not None:
                err = (out.parent / "err.txt").read_text()
                raise AssertionError(f"the engine exited early ({proc.returncode}):\n{err}")
            return "ready" in out.read_text()
        wait_for(ready, 15)

    def done(self) -> list[tuple[str, int]]:
        """(task id, pid) of every run so far, in order."""
        if not self.results.exists():
            return []
        lines = self.results.read_text().split("\n")[:-1]  # a line being written: later
        return [(task_id, int(pid)) for task_id, pid in (line.split() for line in lines)]

    def wait_all_processed(self, ids: list[str], timeout: float) -> None:
        """Wait until every id ran and the queue holds nothing."""
        wait_for(lambda: {t for t, _ in self.done()} >= set(ids) and self.left() == 0,
                 timeout, interval=0.05)

    def stop_all(self) -> None:
        """SIGTERM every engine still running; each must exit 0."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            assert proc.wait(15) in (0, -signal.SIGKILL)

    def kill_all(self) -> None:
        """SIGKILL whatever still runs (test clean-up)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def enqueue(queue: Any, count: int, pause: float) -> list[str]:
    """Enqueue *count* QueueRecord messages sleeping *pause* seconds; return their ids."""
    ids = [f"m{i:04d}" for i in range(count)]
    for task_id in ids:
        queue.enqueue([task_id, "QueueRecord", pause])
    return ids


def check_kill_9_loses_nothing(engines: EngineProcesses, queue: Any) -> None:
    """Of two engines, one is killed with SIGKILL mid-run and restarted: every message
    runs, and only those the dead engine held (at most its threads' worth) run twice."""
    ids = enqueue(queue, 300, 0.02)
    victim, out = engines.start(threads=4, lease=1)
    bystander, bystander_out = engines.start(threads=2, lease=1)
    engines.wait_ready(victim, out)
    engines.wait_ready(bystander, bystander_out)
    wait_for(lambda: len(engines.done()) >= 60, 30)
    victim.kill()
    victim.wait(10)
    killed_at = len(engines.done())
    assert killed_at < len(ids), "the engines finished before one could be killed"
    restarted, out = engines.start(threads=4, lease=1)
    engines.wait_ready(restarted, out)
    engines.wait_all_processed(ids, 30)
    engines.stop_all()
    done = engines.done()
    counts = collections.Counter(task_id for task_id, _ in done)
    twice = sorted(task_id for task_id, count in counts.items() if count > 1)
    print(f"killed after {killed_at} of {len(ids)}; run twice: {twice}")
    assert sorted(counts) == ids  # at least once: none lost
    assert set(counts.values()) <= {1, 2} and len(twice) <= 4
    # Each rerun is one the dead engine had started.
    first_runs = {task_id: pid for task_id, pid in reversed(done)}
    assert all(first_runs[task_id] == victim.pid for task_id in twice)


def check_engines_share_the_work(engines: EngineProcesses, queue: Any) -> None:
    """Three engine processes on one queue run each of 300 messages exactly once."""
    started = [engines.start(threads=2, lease=30) for _ in range(3)]
    for proc, out in started:
        engines.wait_ready(proc, out)
    ids = enqueue(queue, 300, 0.005)
    engines.wait_all_processed(ids, 30)
    engines.stop_all()
    done = engines.done()
    counts = collections.Counter(task_id for task_id, _ in done)
    assert sorted(counts) == ids and set(counts.values()) == {1}
    print("per engine:", collections.Counter(pid for _, pid in done))
    assert len({pid for _, pid in done}) >= 2  # the work was shared


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
class EngineProcessChecks:
    """kill -9 and shared work, for the queue of the module's fixtures."""

    def test_kill_9_loses_nothing(self, engines: EngineProcesses, queues: Any) -> None:
        """An engine killed with SIGKILL mid-run: the others take over once its leases end."""
        check_kill_9_loses_nothing(engines, queues())

    def test_engines_share_the_work(self, engines: EngineProcesses, queues: Any) -> None:
        """Three engine processes on one queue run each of 300 messages exactly once."""
        check_engines_share_the_work(engines, queues())
