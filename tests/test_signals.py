"""Signals in ``run()``, in a real ``tempest run`` process: graceful stop, drain, reopen.

The engine is tests/scripts/sig_app.py (its docstring lists the knobs). Every
process is killed in a ``finally`` and every wait is bounded.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

import pytest

from tempest import Task

from .conftest import wait_for

pytestmark = pytest.mark.timeout(30)

SCRIPTS = Path(__file__).parent / "scripts"
ROOT = Path(__file__).parent.parent


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without systemd's variables (pytest may run under systemd)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(extra)
    return env


class Running:
    """A ``tempest run sig_app:SigEngine`` process and its files."""

    def __init__(self, proc: subprocess.Popen[str], tmp: Path) -> None:
        self.proc = proc
        self.dir = tmp
        self.main = tmp / "logs" / "SigEngine.log"
        self.tasks = tmp / "logs" / "SigEngine.task.log"

    @staticmethod
    def read(path: Path) -> str:
        return path.read_text(encoding="utf-8") if path.exists() else ""

    def wait_line(self, pattern: str, path: Path | None = None, timeout: float = 10.0) -> str:
        """Wait for a line matching the regex *pattern* in the main log (or *path*)."""
        path = path or self.main
        return wait_for(lambda: re.search(pattern, self.read(path), re.MULTILINE), timeout).group(0)

    def wait_ready(self) -> None:
        """Wait until the signal handlers are installed (the ``ready`` line)."""
        self.wait_line(event("ready"))

    def wait_started(self, *task_ids: str) -> None:
        wait_for(lambda: all((self.dir / f"{t}.started").exists() for t in task_ids), 10)

    def send(self, sig: int) -> float:
        self.proc.send_signal(sig)
        return time.monotonic()

    def exit_code(self, timeout: float = 10.0) -> int:
        return self.proc.wait(timeout)


def event(name: str) -> str:
    """A regex for a main-log line of event *name* (text format)."""
    return rf"^\S+ [A-Z]+ +{re.escape(name)}(?: .*)?$"


@contextmanager
def sig_engine(tmp_path: Path, *flags: str, **env: str) -> Iterator[Running]:
    """Start ``tempest run sig_app:SigEngine`` with SIG_* *env*; kill it afterwards."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tempest", "run", "sig_app:SigEngine",
         "--log-dir", str(tmp_path / "logs"), *flags],
        cwd=SCRIPTS, env=clean_env(SIG_DIR=str(tmp_path), **env),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        yield Running(proc, tmp_path)
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=10)
    assert err == "", err  # the engine writes to its log files only


def test_sigterm_lets_running_tasks_finish_and_exits_0(tmp_path):
    """SIGTERM: running tasks finish, nothing new starts, `stopping`/`stopped` logged, exit 0."""
    with sig_engine(tmp_path, SIG_TASKS="sleep:1,sleep:1,sleep:1,sleep:1") as run:
        run.wait_ready()
        run.wait_started("t0", "t1")
        sent = run.send(signal.SIGTERM)
        assert run.exit_code() == 0
        assert time.monotonic() - sent < 5
        main = run.read(run.main)
    for task_id in ("t0", "t1"):
        assert f"task_id={task_id} task=SigSleeper outcome=success" in main
    assert not (tmp_path / "t2.started").exists() and not (tmp_path / "t3.started").exists()
    assert re.search(event("stopping") + "", main, re.MULTILINE)
    assert 'reason="SIGTERM received"' in main
    stopped = re.search(event("stopped"), main, re.MULTILINE)
    assert stopped and "succeeded=2" in stopped.group(0) and "queued=2" in stopped.group(0)


def test_task_blocked_past_the_drain_is_interrupted_and_not_acked(tmp_path):
    """A task still running at shutdown_timeout is logged `interrupted`, not acked; exit 0."""
    with sig_engine(tmp_path, SIG_QUEUE="ack", SIG_SHUTDOWN="0.5",
                    SIG_TASKS="sleep:0,sleep:30") as run:
        run.wait_ready()
        run.wait_started("t1")
        wait_for(lambda: "t0" in run.read(tmp_path / "acks"))
        sent = run.send(signal.SIGTERM)
        assert run.exit_code() == 0
        assert time.monotonic() - sent < 0.5 + 2.5
        main = run.read(run.main)
    line = re.search(event("interrupted"), main, re.MULTILINE)
    assert line and "task_id=t1 task=SigSleeper" in line.group(0)
    assert "redelivery=\"after the queue's lease\"" in line.group(0)
    assert run.read(tmp_path / "acks").split() == ["t0"]  # t1 stays leased: redelivered
    assert re.search(event("stopped"), main, re.MULTILINE)


def test_interrupted_task_is_requeued_where_the_queue_can(tmp_path):
    """Where the queue has requeue, an interrupted message is given back at once, not acked."""
    with sig_engine(tmp_path, SIG_QUEUE="requeue", SIG_SHUTDOWN="0.3",
                    SIG_TASKS="sleep:30") as run:
        run.wait_ready()
        run.wait_started("t0")
        run.send(signal.SIGTERM)
        assert run.exit_code() == 0
        main = run.read(run.main)
    assert re.search(r"interrupted task_id=t0 .*redelivery=requeued", main)
    assert run.read(tmp_path / "requeued").split() == ["t0"]
    assert not (tmp_path / "acks").exists()


def test_second_sigint_stops_at_once(tmp_path):
    """A second SIGINT during the drain stops at once: the task is interrupted, exit 0."""
    with sig_engine(tmp_path, SIG_SHUTDOWN="30", SIG_TASKS="sleep:30") as run:
        run.wait_ready()
        run.wait_started("t0")
        run.send(signal.SIGINT)
        run.wait_line(event("stopping"))
        sent = run.send(signal.SIGINT)
        assert run.exit_code() == 0
        assert time.monotonic() - sent < 3
        main = run.read(run.main)
    assert re.search(event("stopping at once"), main, re.MULTILINE)
    assert re.search(r"interrupted task_id=t0 ", main)


def test_sighup_after_renaming_the_logs_writes_new_files(tmp_path):
    """logrotate `create`: rename both logs, SIGHUP, and new lines land in new files."""
    with sig_engine(tmp_path, SIG_TASKS="tick") as run:
        run.wait_ready()
        run.wait_line(r"^t0 .* tick n=\d+$", run.tasks)
        old_main, old_tasks = run.main.with_suffix(".log.1"), run.tasks.with_suffix(".log.1")
        run.main.rename(old_main)
        run.tasks.rename(old_tasks)
        run.send(signal.SIGHUP)
        run.wait_line(event("reopened log files"))
        run.wait_line(r"^t0 .* tick n=\d+$", run.tasks)
        (tmp_path / "stop_tick").touch()
        run.send(signal.SIGTERM)
        assert run.exit_code() == 0
    old_main_text, new_main_text = run.read(old_main), run.read(run.main)
    assert re.search(event("ready"), old_main_text, re.MULTILINE)
    assert "reopened log files" not in old_main_text
    assert re.search(event("stopped"), new_main_text, re.MULTILINE)
    assert "stopped" not in old_main_text

    def ticks(path: Path) -> list[int]:
        return [int(n) for n in re.findall(r" tick n=(\d+)$", run.read(path), re.MULTILINE)]

    before, after = ticks(old_tasks), ticks(run.tasks)
    assert before and after and max(before) < min(after)


class SigHandlerProbe(Task):
    """Records the SIGTERM handler in force while it runs."""

    seen: ClassVar[list[object]] = []

    def process(self) -> None:
        SigHandlerProbe.seen.append(signal.getsignal(signal.SIGTERM))


def test_run_installs_handlers_before_any_task_and_restores_them(make_engine):
    """Under run() even the first task sees the SIGTERM handler; the old ones come back after."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT,
                                                      signal.SIGHUP)}
    SigHandlerProbe.seen.clear()
    engine = make_engine()
    engine.submit(SigHandlerProbe)
    engine.run(burst=True)
    assert SigHandlerProbe.seen and SigHandlerProbe.seen[0] is not before[signal.SIGTERM]
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_start_installs_no_signal_handlers(make_engine):
    """start() (embedding) leaves the application's signal handlers alone."""
    before = signal.getsignal(signal.SIGTERM)
    SigHandlerProbe.seen.clear()
    engine = make_engine()
    engine.start()
    try:
        engine.submit(SigHandlerProbe)
        wait_for(lambda: SigHandlerProbe.seen)
    finally:
        assert engine.stop(timeout=10)
    assert SigHandlerProbe.seen == [before]
    assert signal.getsignal(signal.SIGTERM) is before
