"""Crashes and signals: an engine run() in a real subprocess, killed or stopped by a signal."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import wait_for

SCRIPT = Path(__file__).parent / "scripts" / "crash_engine.py"
REPO = Path(__file__).resolve().parent.parent

OUTCOME = re.compile(r"task ended task_id=(\S+) task=CrashNap outcome=(\w+)")

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


class EngineProcess:
    """One crash_engine.py process and its files."""

    def __init__(self, tmp_path: Path, mode: str, shutdown_timeout: float = 10.0) -> None:
        self.dir = tmp_path
        self.out_path = tmp_path / f"{mode}.out"
        self.err_path = tmp_path / f"{mode}.err"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(SCRIPT), str(tmp_path), mode, str(shutdown_timeout)],
                stdout=out, stderr=err, cwd=tmp_path, env=env)

    def out(self) -> str:
        return self.out_path.read_text()

    def err(self) -> str:
        return self.err_path.read_text()

    def main(self) -> str:
        path = self.dir / "CrashEngine.log"
        return path.read_text() if path.exists() else ""

    def started(self) -> list[str]:
        return re.findall(r"^started (\S+)$", self.out(), re.MULTILINE)

    def wait_started(self, count: int) -> list[str]:
        def enough():
            if self.proc.poll() is not None:
                raise AssertionError(f"the engine exited early: {self.proc.returncode}\n"
                                     f"{self.err()}")
            return len(self.started()) >= count
        wait_for(enough, 10)
        return self.started()

    def outcomes(self) -> dict[str, list[str]]:
        seen: dict[str, list[str]] = {}
        for task_id, outcome in OUTCOME.findall(self.main()):
            seen.setdefault(task_id, []).append(outcome)
        return seen

    def wait(self, timeout: float) -> tuple[int, float]:
        """Wait for the exit; (returncode, seconds waited)."""
        began = time.monotonic()
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the engine did not exit within {timeout}s:\n"
                                 f"{self.main()}\n{self.err()}") from None
        return code, time.monotonic() - began

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator:
    made: list[EngineProcess] = []

    def factory(mode: str, shutdown_timeout: float = 10.0) -> EngineProcess:
        engine = EngineProcess(tmp_path, mode, shutdown_timeout)
        made.append(engine)
        return engine

    yield factory
    for engine in made:
        engine.kill()


def test_kill_9_while_tasks_run_dies_at_once_and_a_new_process_starts_clean(spawn, tmp_path):
    """kill -9 mid-task: the process dies at once, nothing hangs; a fresh engine runs normally."""
    engine = spawn("nap")
    running = engine.wait_started(2)
    # (The log is written by a thread of its own, a moment after the line is logged.)
    wait_for(lambda: "guarantee=at-most-once" in engine.main(), 10)
    engine.proc.send_signal(signal.SIGKILL)
    code, waited = engine.wait(5)
    assert code == -signal.SIGKILL and waited < 2
    # At-most-once: the running tasks are gone with the process, never reported.
    assert all(task_id not in engine.outcomes() for task_id in running)
    assert "stopped" not in engine.main()

    again = spawn("burst")
    code, _ = again.wait(15)
    assert code == 0, again.err()
    assert "returned" in again.out()
    ran = again.started()
    assert len(ran) == 3
    assert all(again.outcomes()[t] == ["success"] for t in ran)
    assert all(t not in again.outcomes() for t in running)


def test_sigterm_lets_running_tasks_finish_and_exits_zero(spawn):
    """SIGTERM mid-task: running tasks finish and are logged, nothing new starts, exit 0."""
    engine = spawn("nap")
    running = engine.wait_started(2)
    sent = time.monotonic()
    engine.proc.send_signal(signal.SIGTERM)
    code, _ = engine.wait(10)
    took = time.monotonic() - sent
    assert code == 0, engine.err()
    assert took < 3.0
    main = engine.main()
    outcomes = engine.outcomes()
    assert {t: outcomes.get(t) for t in running} == {t: ["success"] for t in running}
    assert len(outcomes) == 2, "a queued task started after SIGTERM"
    assert engine.started() == running
    assert re.search(r'\bstopping reason="SIGTERM received" running=2', main), main
    assert re.search(r'\bstopped engine=CrashEngine reason="SIGTERM received"', main)
    assert main.index("stopping") < main.index("stopped engine")
    assert "interrupted" not in main
    assert "returned" in engine.out()
    assert engine.err() == ""


def test_sigterm_with_a_task_stuck_past_shutdown_timeout_interrupts_it(spawn):
    """SIGTERM with a task blocked past shutdown_timeout: logged interrupted, exit 0 in time."""
    engine = spawn("stuck", shutdown_timeout=1.0)
    (stuck,) = engine.wait_started(1)
    sent = time.monotonic()
    engine.proc.send_signal(signal.SIGTERM)
    code, _ = engine.wait(10)
    took = time.monotonic() - sent
    assert code == 0, engine.err()
    assert 0.9 <= took < 3.0, took
    main = engine.main()
    assert re.search(rf"\binterrupted task_id={stuck} task=CrashNap", main), main
    assert stuck not in engine.outcomes()
    assert re.search(r'\bstopped engine=CrashEngine reason="SIGTERM received"', main)
    assert "returned" in engine.out()


def test_second_sigint_during_the_drain_stops_at_once(spawn):
    """SIGINT starts a graceful stop; a second SIGINT during the drain stops at once."""
    engine = spawn("stuck", shutdown_timeout=30.0)
    (stuck,) = engine.wait_started(1)
    engine.proc.send_signal(signal.SIGINT)
    wait_for(lambda: re.search(r'\bstopping reason="SIGINT received"', engine.main()), 5)
    assert engine.proc.poll() is None, "the first SIGINT did not wait for the running task"
    sent = time.monotonic()
    engine.proc.send_signal(signal.SIGINT)
    code, _ = engine.wait(10)
    assert time.monotonic() - sent < 2.0
    assert code == 0, engine.err()
    main = engine.main()
    assert "stopping at once" in main
    assert re.search(rf"\binterrupted task_id={stuck}", main), main
    assert re.search(r"\bstopped engine=CrashEngine", main)
    assert "Traceback" not in engine.err() and "KeyboardInterrupt" not in engine.err()


def test_sigterm_as_soon_as_the_first_task_starts_is_still_graceful(spawn):
    """A SIGTERM that arrives while the first task starts stops the engine gracefully."""
    engine = spawn("early")
    code, _ = engine.wait(10)
    assert code == 0, f"exit {code}: the SIGTERM was fatal"
    assert re.search(r'task=CrashEarly outcome=success', engine.main())
    assert re.search(r'\bstopped engine=CrashEngine reason="SIGTERM received"', engine.main())
