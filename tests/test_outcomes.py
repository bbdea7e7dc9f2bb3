"""Outcomes and callbacks: one outcome per message, failures and callback errors logged by id."""

from __future__ import annotations

import random
import re
import threading
import time
from typing import Any

import pytest

from tempest import Task

from .conftest import main_log, task_log

OUTCOME = re.compile(
    r"task ended task_id=(\S+) task=(\S+) outcome=(\w+) duration=([0-9.e-]+)(.*)$",
    re.MULTILINE)

RECORD: list[tuple[Any, ...]] = []


@pytest.fixture(autouse=True)
def _fresh_record():
    RECORD.clear()
    yield


def outcome_map(text: str) -> dict[str, list[str]]:
    seen: dict[str, list[str]] = {}
    for m in OUTCOME.finditer(text):
        seen.setdefault(m[1], []).append(m[3])
    return seen


def outcome_line(text: str, task_id: str) -> str:
    lines = [m[0] for m in OUTCOME.finditer(text) if m[1] == task_id]
    assert len(lines) == 1, lines
    return lines[0]


def lines_of(text: str, task_id: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(f"{task_id} ")]


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


class _Recording:
    """Mixin: every task callback is recorded; the key argument says which ones raise."""

    def after_success(self, result):
        RECORD.append(("task after_success", self.task_id, result))
        if "success" in self.args[0]:
            raise RuntimeError(f"task after_success boom {self.task_id}")

    def after_failure(self, exc):
        RECORD.append(("task after_failure", self.task_id, exc))
        if "failure" in self.args[0]:
            raise RuntimeError(f"task after_failure boom {self.task_id}")

    def after_timeout(self):
        RECORD.append(("task after_timeout", self.task_id))
        if "timeout" in self.args[0]:
            raise RuntimeError(f"task after_timeout boom {self.task_id}")


class OcOk(_Recording, Task):
    def process(self, raising):
        return f"ok {self.task_id}"


class OcFail(_Recording, Task):
    def process(self, raising):
        def deeper():
            raise ValueError(f"bad value 42 in {self.task_id}")
        deeper()


class OcSlow(_Recording, Task):
    class configure:
        timeout = 0.02

    def process(self, raising):
        _spin(5.0)


class OcMultiline(Task):
    def process(self):
        raise ValueError("first line\nsecond line")


class OcUnprintableError(Exception):
    def __str__(self):
        raise RuntimeError("this exception cannot be printed")


class OcUnprintable(Task):
    def process(self):
        raise OcUnprintableError()


class OcUnprintableCallback(Task):
    def process(self):
        return 1

    def after_success(self, result):
        raise OcUnprintableError()


class OcExits(Task):
    def process(self, what):
        if what == "exit":
            raise SystemExit(3)
        raise KeyboardInterrupt

    def after_failure(self, exc):
        RECORD.append(("task after_failure", self.task_id, exc))


class OcInterruptingCallback(Task):
    def process(self):
        return "fine"

    def after_success(self, result):
        raise KeyboardInterrupt


def _engine_callbacks(raise_in: set[str]) -> dict[str, Any]:
    """Engine-wide callbacks that record, and raise LookupError for kinds in *raise_in*."""

    def make(which):
        def callback(task, *args):
            RECORD.append((f"engine after_{which}", task.task_id, *args))
            if which in raise_in:
                raise LookupError(f"engine {which} boom {task.task_id}")
        return callback

    return {f"after_{w}": make(w) for w in ("success", "failure", "timeout")}


# -- failures -------------------------------------------------------------------------------


def test_failure_logs_error_and_a_traceback_prefixed_with_the_id(make_engine):
    """A failure: main log has error=<Type: message>; every traceback line starts with the id."""
    engine = make_engine(**_engine_callbacks(set()))
    failing = engine.submit(OcFail, "")
    engine.run(burst=True)
    main = main_log(engine)
    line = outcome_line(main, failing)
    assert "task=OcFail outcome=failure" in line
    assert f'error="ValueError: bad value 42 in {failing}"' in line
    tasks = task_log(engine)
    assert tasks.strip(), "nothing in the task log"
    assert all(line.startswith(f"{failing} ") for line in tasks.splitlines()), tasks
    mine = lines_of(tasks, failing)
    assert any("Traceback (most recent call last):" in x for x in mine)
    assert any("in deeper" in x for x in mine)
    assert f"{failing} ValueError: bad value 42 in {failing}" in mine
    kinds = [r[0] for r in RECORD if r[1] == failing]
    assert kinds == ["task after_failure", "engine after_failure"]
    assert all(isinstance(r[2], ValueError) for r in RECORD)
    stats = engine.stats()
    assert stats["failed"] == 1 and stats["processed"] == 1


def test_multiline_error_stays_on_one_main_log_line(make_engine):
    """An exception message with a newline: one outcome line; each traceback line prefixed."""
    engine = make_engine()
    task_id = engine.submit(OcMultiline)
    engine.run(burst=True)
    main = main_log(engine)
    assert outcome_map(main) == {task_id: ["failure"]}
    assert "second line" in outcome_line(main, task_id)
    assert not any(line.startswith("second line") for line in main.splitlines())
    assert f"{task_id} second line" in task_log(engine).splitlines()


def test_exception_that_cannot_be_printed_is_still_one_failure(make_engine):
    """A task raising an exception whose str() fails: one failure outcome, engine goes on."""
    engine = make_engine(threads=1)
    bad = engine.submit(OcUnprintable)
    bad_cb = engine.submit(OcUnprintableCallback)
    after = engine.submit(OcOk, "")
    engine.run(burst=True)
    main = main_log(engine)
    assert "worker crashed" not in main, main
    assert outcome_map(main) == {bad: ["failure"], bad_cb: ["success"], after: ["success"]}
    assert "OcUnprintableError" in outcome_line(main, bad)
    assert re.search(rf"callback failed task_id={bad_cb} .*OcUnprintableError", main)
    stats = engine.stats()
    assert (stats["failed"], stats["succeeded"]) == (1, 2)


def test_system_exit_and_keyboard_interrupt_in_tasks_and_callbacks(make_engine):
    """SystemExit/KeyboardInterrupt from process is a failure; from a callback it is logged."""
    engine = make_engine(threads=1)
    exits = engine.submit(OcExits, "exit")
    interrupts = engine.submit(OcExits, "interrupt")
    callback = engine.submit(OcInterruptingCallback)
    after = engine.submit(OcOk, "")
    engine.run(burst=True)
    main = main_log(engine)
    assert outcome_map(main) == {exits: ["failure"], interrupts: ["failure"],
                                 callback: ["success"], after: ["success"]}
    assert 'error="SystemExit: 3"' in outcome_line(main, exits)
    assert "error=KeyboardInterrupt" in outcome_line(main, interrupts)
    assert re.search(rf"callback failed task_id={callback} task=OcInterruptingCallback "
                     r"callback=OcInterruptingCallback\.after_success error=KeyboardInterrupt",
                     main)
    assert [type(r[2]) for r in RECORD if r[1] in (exits, interrupts)] == [
        SystemExit, KeyboardInterrupt]


# -- callbacks that raise -------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["success", "failure", "timeout"])
def test_raising_callbacks_are_logged_and_the_engine_goes_on(make_engine, which):
    """Task and engine after_<outcome> raise: both logged with the id; the next task runs."""
    engine = make_engine(threads=1, **_engine_callbacks({which}))
    cls = {"success": OcOk, "failure": OcFail, "timeout": OcSlow}[which]
    task_id = engine.submit(cls, which)
    after = engine.submit(OcOk, "")
    engine.run(burst=True)
    main = main_log(engine)
    name = cls.__name__
    assert outcome_map(main)[task_id] == [which], main
    assert outcome_map(main)[after] == ["success"]
    assert "worker crashed" not in main
    assert re.search(
        rf"callback failed task_id={task_id} task={name} callback={name}\.after_{which} "
        rf'error="RuntimeError: task after_{which} boom {task_id}"', main), main
    assert re.search(
        rf"callback failed task_id={task_id} task={name} "
        rf"callback={engine.__name__}\.configure\.after_{which} "
        rf'error="LookupError: .?engine {which} boom {task_id}', main), main
    # the engine-wide callback still ran after the task's own one raised
    assert [r[0] for r in RECORD if r[1] == task_id] == [
        f"task after_{which}", f"engine after_{which}"]
    mine = lines_of(task_log(engine), task_id)
    assert sum("Traceback (most recent call last):" in x for x in mine) >= 2
    assert f"{task_id} RuntimeError: task after_{which} boom {task_id}" in mine
    assert any(x.startswith(f"{task_id} LookupError:") and "boom" in x for x in mine)
    stats = engine.stats()
    assert stats["processed"] == 2 and stats["succeeded"] >= 1


def test_a_mix_gives_exactly_one_outcome_and_one_set_of_callbacks_per_message(make_engine):
    """Successes, failures, timeouts and raising callbacks mixed: one outcome per message."""
    engine = make_engine(threads=4, **_engine_callbacks({"success", "failure", "timeout"}))
    rnd = random.Random(7)
    expected: dict[str, str] = {}
    kinds = [(OcOk, "success"), (OcFail, "failure"), (OcSlow, "timeout")]
    for _ in range(240):
        cls, outcome = rnd.choice(kinds)
        raising = rnd.choice(["", "success failure timeout"])
        expected[engine.submit(cls, raising)] = outcome
    engine.run(burst=True)
    main = main_log(engine)
    assert "worker crashed" not in main
    seen = outcome_map(main)
    assert {t: o for t, o in seen.items() if len(o) != 1} == {}
    assert {t: o[0] for t, o in seen.items()} == expected
    for task_id, outcome in expected.items():
        calls = [r[0] for r in RECORD if r[1] == task_id]
        assert calls == [f"task after_{outcome}", f"engine after_{outcome}"], (task_id, calls)
    tasks = task_log(engine)
    for line in tasks.splitlines():
        assert line.split(" ", 1)[0] in expected, f"a task-log line without a task id: {line!r}"
    stats = engine.stats()
    counts = {o: list(expected.values()).count(o) for o in ("success", "failure", "timeout")}
    assert (stats["succeeded"], stats["failed"], stats["timed_out"]) == (
        counts["success"], counts["failure"], counts["timeout"])
    assert stats["processed"] == len(expected) and stats["running"] == 0


def test_callbacks_run_in_the_worker_before_the_next_message(make_engine):
    """With one thread, a task's callbacks finish before the next message starts."""
    engine = make_engine(threads=1, **_engine_callbacks(set()))
    ids = [engine.submit(OcOk, "") for _ in range(5)]
    engine.run(burst=True)
    assert [r[0] for r in RECORD] == ["task after_success", "engine after_success"] * 5
    assert [r[1] for r in RECORD] == [i for i in ids for _ in range(2)]
    assert all(r[2] == f"ok {r[1]}" for r in RECORD)
    assert threading.active_count() >= 1
