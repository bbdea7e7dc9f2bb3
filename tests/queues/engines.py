"""Engines in processes of their own on one durable queue: kill -9 and sharing tests.

Each backend's test module builds an :class:`EngineProcesses` for its queue
and calls :func:`check_kill_9_loses_nothing` and :func:`check_engines_share_the_work`.
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
    """An engine killed with SIGKILL mid-run: another takes over once its leases expire."""
    ids = enqueue(queue, 200, 0.02)
    first, out = engines.start(threads=4, lease=1)
    engines.wait_ready(first, out)
    wait_for(lambda: len(engines.done()) >= 40, 15)
    first.kill()
    first.wait(10)
    killed_at = len(engines.done())
    assert killed_at < len(ids), "the first engine finished before it could be killed"
    second, out = engines.start(threads=4, lease=1)
    engines.wait_ready(second, out)
    engines.wait_all_processed(ids, 30)
    engines.stop_all()
    done = engines.done()
    runs = [task_id for task_id, _ in done]
    print(f"killed after {killed_at} of {len(ids)}; run twice: {len(runs) - len(ids)}")
    assert set(runs) == set(ids)  # at least once: none lost
    # Run twice: only what the dead engine held (four threads' worth), and
    # the first run of each of those was the dead engine's.
    assert len(runs) - len(ids) <= 4
    first_runner = {}
    for task_id, pid in done:
        first_runner.setdefault(task_id, pid)
    twice = [t for t, n in collections.Counter(runs).items() if n > 1]
    assert all(first_runner[t] == first.pid for t in twice)


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
