"""Timeouts: TaskTimeout injected into pure-Python code, its callbacks, abandoned threads."""

from __future__ import annotations

import random
import re
import signal
import sys
import threading
import time
from typing import Any

import pytest

from tempest import Task, TaskTimeout, TooManyAbandoned

from .conftest import main_log, task_log, wait_for

OUTCOME = re.compile(
    r"task ended task_id=(\S+) task=(\S+) outcome=(\w+) duration=([0-9.e-]+)(.*)$",
    re.MULTILINE)


def outcomes(text: str) -> list[tuple[str, str, str, float, str]]:
    """(task_id, task, outcome, duration, rest of the line) for every outcome line."""
    return [(m[1], m[2], m[3], float(m[4]), m[5]) for m in OUTCOME.finditer(text)]


def outcomes_of(text: str, task_id: str) -> list[str]:
    return [o[2] for o in outcomes(text) if o[0] == task_id]


# Per-test state shared with the tasks (messages carry only JSON, so keys).
EVENTS: dict[str, threading.Event] = {}
RECORD: list[tuple[Any, ...]] = []
SEEN_TIMEOUT: set[str] = set()
THREADS: dict[str, threading.Thread] = {}


@pytest.fixture(autouse=True)
def _fresh_state():
    EVENTS.clear()
    RECORD.clear()
    SEEN_TIMEOUT.clear()
    THREADS.clear()
    yield
    for event in list(EVENTS.values()):  # never leave a task blocked behind
        event.set()


def _spin(seconds: float) -> None:
    """Busy pure-Python work for *seconds* (wall clock)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def records(task_id: str) -> list[tuple[Any, ...]]:
    return [r for r in RECORD if r[1] == task_id]


# -- tasks ---------------------------------------------------------------------------


class ToSpinner(Task):
    class configure:
        timeout = 0.2

    def process(self, key):
        THREADS[self.task_id] = threading.current_thread()
        try:
            try:
                _spin(5.0)
            except Exception:  # must NOT catch TaskTimeout
                RECORD.append(("except Exception", self.task_id))
                raise
        except BaseException as exc:
            RECORD.append(("raised", self.task_id, type(exc)))
            raise
        finally:
            RECORD.append(("finally", self.task_id))
        return "spun to the end"

    def after_success(self, result):
        RECORD.append(("after_success", self.task_id))

    def after_failure(self, exc):
        RECORD.append(("after_failure", self.task_id))

    def after_timeout(self):
        logged = "outcome=timeout" in main_log(self.engine)
        RECORD.append(("task after_timeout", self.task_id, threading.current_thread(), logged))


class ToQuick(Task):
    def process(self, key):
        THREADS[self.task_id] = threading.current_thread()
        RECORD.append(("quick", self.task_id))
        if key in EVENTS:
            EVENTS[key].set()
        return key


class ToSwallower(Task):
    class configure:
        timeout = 0.1

    def process(self, then_raise):
        try:
            _spin(5.0)
        except BaseException as exc:  # swallows TaskTimeout on purpose
            RECORD.append(("swallowed", self.task_id, type(exc)))
            self.task_logger.warning("swallowed", exc_info=exc)
        if then_raise:
            raise ValueError("raised after swallowing the timeout")
        return "finished anyway"

    def after_success(self, result):
        RECORD.append(("after_success", self.task_id))

    def after_failure(self, exc):
        RECORD.append(("after_failure", self.task_id))

    def after_timeout(self):
        RECORD.append(("after_timeout", self.task_id))


class ToDefaulted(Task):
    """No timeout of its own: the engine's default applies."""

    def process(self):
        _spin(5.0)


class ToUnlimited(Task):
    class configure:
        timeout = None

    def process(self, seconds):
        _spin(seconds)
        return "ran past the engine default"


class ToStraddler(Task):
    class configure:
        timeout = 0.01

    def process(self, seconds):
        try:
            _spin(seconds)
        except TaskTimeout:
            SEEN_TIMEOUT.add(self.task_id)
            raise
        return seconds


class ToTightStraddler(ToStraddler):
    class configure:
        timeout = 0.0002


class ToSteady(Task):
    """No time limit: it must never see a TaskTimeout, even right after one that did."""

    class configure:
        timeout = None

    def process(self, seconds):
        try:
            _spin(seconds)
        except BaseException:
            SEEN_TIMEOUT.add(self.task_id)
            raise
        return seconds


class ToLongLimit(Task):
    class configure:
        timeout = 1.0

    def process(self, seconds):
        THREADS[self.task_id] = threading.current_thread()
        _spin(seconds)
        return seconds


class ToStuck(Task):
    """Blocks in C (a lock acquire) past its timeout until the test releases it."""

    class configure:
        timeout = 0.1

    def process(self, key):
        THREADS[self.task_id] = threading.current_thread()
        RECORD.append(("stuck started", self.task_id))
        try:
            EVENTS[key].wait(15)
        finally:
            RECORD.append(("stuck unwound", self.task_id))
        return "late result"

    def after_success(self, result):
        RECORD.append(("after_success", self.task_id))

    def after_failure(self, exc):
        RECORD.append(("after_failure", self.task_id))

    def after_timeout(self):
        RECORD.append(("task after_timeout", self.task_id, threading.current_thread()))


def _engine_after_timeout(task):
    RECORD.append(("engine after_timeout", task.task_id, threading.current_thread(), task))


# -- a pure-Python timeout -------------------------------------------------------------------


def test_busy_loop_times_out_once_and_its_thread_is_reused(make_engine):
    """A spinning task times out once: TaskTimeout in process, callbacks in order, thread reused."""
    engine = make_engine(threads=1, after_timeout=_engine_after_timeout)
    done = EVENTS["after"] = threading.Event()
    spin_id = engine.submit(ToSpinner, "spin")
    quick_id = engine.submit(ToQuick, "after")
    engine.start()
    assert done.wait(10), "the message after the timed-out one was never processed"
    assert engine.stop(timeout=10)

    main = main_log(engine)
    lines = [o for o in outcomes(main) if o[0] == spin_id]
    assert len(lines) == 1, main
    _, name, outcome, duration, rest = lines[0]
    assert (name, outcome) == ("ToSpinner", "timeout")
    assert 0.2 <= duration < 0.6, duration
    assert "timeout=0.2" in rest
    assert outcomes_of(main, quick_id) == ["success"]
    assert "thread abandoned" not in main and "worker crashed" not in main
    assert any(line.startswith(f"{spin_id} ") and "timed out" in line
               for line in task_log(engine).splitlines())

    worker = THREADS[spin_id]
    mine = records(spin_id)
    assert [r[0] for r in mine] == [
        "raised", "finally", "task after_timeout", "engine after_timeout"], mine
    assert mine[0][2] is TaskTimeout  # and `except Exception` never saw it
    assert mine[2][2] is worker and mine[2][3], "after_timeout ran before the timeout line"
    assert mine[3][2] is worker
    assert isinstance(mine[3][3], ToSpinner) and mine[3][3].task_id == spin_id
    assert THREADS[quick_id] is worker, "the worker thread was not reused"

    stats = engine.stats()
    assert stats["timed_out"] == 1 and stats["succeeded"] == 1
    assert stats["abandoned"] == 0 and stats["failed"] == 0 and stats["processed"] == 2


def test_engine_default_timeout_and_task_none_override(make_engine):
    """The engine's timeout applies to tasks without one; a task's timeout=None means no limit."""
    engine = make_engine(timeout=0.1)
    limited = engine.submit(ToDefaulted)
    unlimited = engine.submit(ToUnlimited, 0.3)
    engine.run(burst=True)
    main = main_log(engine)
    assert outcomes_of(main, limited) == ["timeout"]
    assert outcomes_of(main, unlimited) == ["success"]
    assert engine.stats()["timed_out"] == 1 and engine.stats()["succeeded"] == 1


def test_task_swallowing_the_timeout_still_times_out(make_engine):
    """A task that catches TaskTimeout and returns (or raises) anyway has outcome timeout, once."""
    engine = make_engine()
    returns = engine.submit(ToSwallower, False)
    raises = engine.submit(ToSwallower, True)
    engine.run(burst=True)
    main = main_log(engine)
    for task_id in (returns, raises):
        assert outcomes_of(main, task_id) == ["timeout"], main
        assert [r[0] for r in records(task_id)] == ["swallowed", "after_timeout"]
        assert records(task_id)[0][2] is TaskTimeout
    stats = engine.stats()
    assert stats["timed_out"] == 2 and stats["succeeded"] == 0 and stats["failed"] == 0


def test_a_deadline_left_by_an_earlier_run_neither_delays_nor_cuts_the_next(make_engine):
    """In one thread, a deadline left by an earlier run neither delays nor cuts the next run."""
    engine = make_engine(threads=1)
    long_quick = engine.submit(ToLongLimit, 0.0)
    short = engine.submit(ToSpinner, "spin")       # 0.2 s limit, spins 5 s
    tight_quick = engine.submit(ToSwallower, True)  # 0.1 s limit: times out at 0.1
    long_slow = engine.submit(ToLongLimit, 0.5)    # 1 s limit: must not be cut at 0.1/0.2
    engine.run(burst=True)
    main = main_log(engine)
    assert outcomes_of(main, long_quick) == ["success"]
    assert outcomes_of(main, tight_quick) == ["timeout"]
    assert outcomes_of(main, long_slow) == ["success"], main
    (line,) = [o for o in outcomes(main) if o[0] == short]
    assert line[2] == "timeout" and 0.2 <= line[3] < 0.6, line
    assert THREADS[long_quick] is THREADS[short] is THREADS[long_slow]


# -- the injection never lands outside its task --------------------------------------------------


def _check_stress(engine, straddlers, steady):
    main = main_log(engine)
    assert "worker crashed" not in main, main[main.find("worker crashed") - 200:][:3000]
    assert "thread abandoned" not in main
    seen: dict[str, list[str]] = {}
    for task_id, _, outcome, _, rest in outcomes(main):
        seen.setdefault(task_id, []).append(outcome)
        assert "TaskTimeout" not in rest, f"a failure caused by TaskTimeout: {rest}"
    submitted = straddlers + steady
    assert {t: len(o) for t, o in seen.items() if len(o) != 1} == {}
    assert set(seen) == set(submitted)
    assert all(seen[t] == ["success"] for t in steady), "a task after a timeout did not succeed"
    assert not SEEN_TIMEOUT & set(steady), "a task without a time limit got a TaskTimeout"
    wrongly = [t for t in straddlers if seen[t] == ["success"] and t in SEEN_TIMEOUT]
    assert wrongly == [], "tasks saw a TaskTimeout but were logged as successes"
    assert all(seen[t] != ["failure"] for t in straddlers)
    stats = engine.stats()
    assert stats["succeeded"] + stats["timed_out"] + stats["failed"] == len(submitted)
    assert stats["failed"] == 0 and stats["running"] == 0
    return stats


def test_injection_never_escapes_into_the_engine_or_the_next_task(make_engine):
    """Hundreds of tasks straddling their timeout: one outcome each, no leak into later tasks."""
    engine = make_engine(threads=4)
    rnd = random.Random(1234)
    straddlers, steady = [], []
    for i in range(600):
        if i % 3 == 2:
            steady.append(engine.submit(ToSteady, 0.0005))
        else:
            straddlers.append(engine.submit(ToStraddler, rnd.uniform(0, 0.02)))
    engine.run(burst=True)
    stats = _check_stress(engine, straddlers, steady)
    assert stats["timed_out"] > 20 and stats["succeeded"] > len(steady)  # it did straddle


def test_injection_with_tiny_deadlines_and_frequent_thread_switches(make_engine):
    """Deadlines shorter than a thread switch: the injection still never lands outside a task."""
    engine = make_engine(threads=4, log_level="DEBUG")  # a longer start of each run
    rnd = random.Random(99)
    straddlers, steady = [], []
    for i in range(1000):
        if i % 4 == 3:
            steady.append(engine.submit(ToSteady, 0.0002))
        elif i % 8 == 1:  # a longer limit now and then: its deadline outlives its run
            straddlers.append(engine.submit(ToStraddler, rnd.uniform(0, 0.012)))
        else:
            straddlers.append(engine.submit(ToTightStraddler, rnd.uniform(0, 0.001)))
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        engine.run(burst=True)
    finally:
        sys.setswitchinterval(previous)
    _check_stress(engine, straddlers, steady)


# -- abandoned threads -------------------------------------------------------------------------


def _workers(engine) -> list[threading.Thread]:
    name = f"tempest-worker:{engine._options['name']}"
    return [t for t in threading.enumerate() if t.name == name and t.is_alive()]


def test_thread_blocked_in_c_is_abandoned_and_replaced(make_engine):
    """A task stuck in C past its timeout is abandoned after the grace; a replacement takes over."""
    engine = make_engine(threads=1, shutdown_timeout=5, after_timeout=_engine_after_timeout)
    stuck = EVENTS["stuck"] = threading.Event()
    stuck_id = engine.submit(ToStuck, "stuck")
    later = []
    for i in range(3):
        EVENTS[f"q{i}"] = threading.Event()
        later.append(engine.submit(ToQuick, f"q{i}"))
    engine.start()
    wait_for(lambda: "thread abandoned" in main_log(engine), 5)
    for i in range(3):
        assert EVENTS[f"q{i}"].wait(5), "the pool lost its only worker"

    stuck_thread = THREADS[stuck_id]
    assert stuck_thread.is_alive()
    assert all(THREADS[q] is not stuck_thread for q in later)
    assert [t for t in _workers(engine) if t is not stuck_thread] != []
    assert len([t for t in _workers(engine) if t is not stuck_thread]) == 1
    stats = engine.stats()
    assert stats["abandoned"] == 1 and stats["timed_out"] == 1 and stats["succeeded"] == 3
    assert stats["threads"] == 1

    # after_timeout ran once, task's then engine-wide, in the replacement thread
    callbacks = [r for r in records(stuck_id) if "after_timeout" in r[0]]
    assert [r[0] for r in callbacks] == ["task after_timeout", "engine after_timeout"]
    assert all(r[2] is not stuck_thread for r in callbacks)

    # the stuck call returns: its late result is discarded
    stuck.set()
    stuck_thread.join(5)
    assert not stuck_thread.is_alive()
    EVENTS["last"] = threading.Event()
    last = engine.submit(ToQuick, "last")
    assert EVENTS["last"].wait(5)
    assert engine.stop(timeout=10)

    main = main_log(engine)
    assert outcomes_of(main, stuck_id) == ["timeout"], main
    assert all(outcomes_of(main, q) == ["success"] for q in [*later, last])
    assert re.search(rf"thread abandoned task_id={stuck_id} task=ToStuck .*abandoned=1", main)
    assert "worker crashed" not in main
    assert [r[0] for r in records(stuck_id)] == [
        "stuck started", "task after_timeout", "engine after_timeout", "stuck unwound"]
    assert engine.stats()["abandoned"] == 1 and engine.stats()["succeeded"] == 4


def test_stop_during_the_grace_abandons_and_runs_after_timeout_once(make_engine):
    """stop() while a timed-out task is still stuck: it is abandoned, after_timeout runs once."""
    engine = make_engine(threads=1, shutdown_timeout=5, after_timeout=_engine_after_timeout)
    EVENTS["stuck"] = threading.Event()
    stuck_id = engine.submit(ToStuck, "stuck")
    engine.start()
    wait_for(lambda: "outcome=timeout" in main_log(engine), 5)
    started = time.monotonic()
    assert engine.stop(timeout=10)
    assert time.monotonic() - started < 3
    main = main_log(engine)
    assert outcomes_of(main, stuck_id) == ["timeout"]
    assert f"thread abandoned task_id={stuck_id}" in main
    assert [r[0] for r in records(stuck_id) if "after_timeout" in r[0]] == [
        "task after_timeout", "engine after_timeout"]
    assert engine.stats()["abandoned"] == 1
    EVENTS["stuck"].set()
    wait_for(lambda: not THREADS[stuck_id].is_alive(), 5)
    assert [r[0] for r in records(stuck_id) if r[0].startswith("after_")] == []


def test_drain_shorter_than_the_grace_still_counts_the_abandoned_thread(make_engine):
    """A drain that ends before the grace: the stuck thread is logged and counted as abandoned."""
    engine = make_engine(threads=1, shutdown_timeout=0.2, after_timeout=_engine_after_timeout)
    EVENTS["stuck"] = threading.Event()
    stuck_id = engine.submit(ToStuck, "stuck")
    engine.start()
    wait_for(lambda: "outcome=timeout" in main_log(engine), 5)
    assert engine.stop(timeout=10)
    main = main_log(engine)
    assert outcomes_of(main, stuck_id) == ["timeout"]
    assert f"thread abandoned task_id={stuck_id}" in main
    assert "interrupted" not in main
    assert [r[0] for r in records(stuck_id) if "after_timeout" in r[0]] == [
        "task after_timeout", "engine after_timeout"]
    assert engine.stats()["abandoned"] == 1
    assert re.search(r"stopped engine=.* abandoned=1", main)
    EVENTS["stuck"].set()
    wait_for(lambda: not THREADS[stuck_id].is_alive(), 5)


# -- max_abandoned -------------------------------------------------------------------------


def _two_stuck(engine) -> list[str]:
    ids = []
    for i in range(2):
        EVENTS[f"stuck{i}"] = threading.Event()
        ids.append(engine.submit(ToStuck, f"stuck{i}"))
    return ids


def _release(ids: list[str]) -> None:
    for event in EVENTS.values():
        event.set()
    for task_id in ids:
        wait_for(lambda t=task_id: t in THREADS, 5)
        THREADS[task_id].join(5)
        assert not THREADS[task_id].is_alive()


def test_started_engine_stops_itself_past_max_abandoned(make_engine):
    """Past max_abandoned a start()ed engine stops by itself and stop() raises TooManyAbandoned."""
    engine = make_engine(threads=2, max_abandoned=1, shutdown_timeout=5)
    ids = _two_stuck(engine)
    EVENTS["q"] = threading.Event()
    engine.submit(ToQuick, "q")
    engine.start()
    try:
        wait_for(lambda: re.search(r"\bstopped engine=", main_log(engine)), 8)
        with pytest.raises(TooManyAbandoned, match="max_abandoned=1"):
            engine.stop(timeout=5)
        assert engine.stop(timeout=5) is True  # the error is reported once
        main = main_log(engine)
        assert main.count("thread abandoned") == 2
        assert re.search(r"abandoned=2 max_abandoned=1", main)
        assert 'reason="too many abandoned threads"' in main
        assert engine.stats()["abandoned"] == 2
        assert all(outcomes_of(main, t) == ["timeout"] for t in ids)
    finally:
        _release(ids)


def test_run_raises_too_many_abandoned(make_engine):
    """run() returns by raising TooManyAbandoned after draining, and restores signal handlers."""
    engine = make_engine(threads=2, max_abandoned=1, shutdown_timeout=5)
    ids = _two_stuck(engine)
    handler = signal.getsignal(signal.SIGTERM)
    safety = threading.Timer(15, engine.stop, kwargs={"wait": False})
    safety.start()
    started = time.monotonic()
    try:
        with pytest.raises(TooManyAbandoned):
            engine.run()
    finally:
        safety.cancel()
        safety.join()
        _release(ids)
    assert time.monotonic() - started < 8
    assert signal.getsignal(signal.SIGTERM) is handler
    main = main_log(engine)
    assert 'reason="too many abandoned threads"' in main
    assert re.search(r"\bstopped engine=.*abandoned=2", main)


def test_run_in_a_thread_raises_too_many_abandoned(make_engine):
    """run() in a non-main thread raises TooManyAbandoned too."""
    engine = make_engine(threads=2, max_abandoned=1, shutdown_timeout=5)
    ids = _two_stuck(engine)
    errors: list[BaseException] = []

    def target():
        try:
            engine.run()
        except TooManyAbandoned as exc:
            errors.append(exc)

    runner = threading.Thread(target=target)
    runner.start()
    try:
        runner.join(10)
        if runner.is_alive():
            engine.stop(wait=False)
            runner.join(10)
            pytest.fail("run() did not stop past max_abandoned")
    finally:
        _release(ids)
    assert len(errors) == 1 and isinstance(errors[0], TooManyAbandoned), errors


# -- the supervisor itself ----------------------------------------------------------------------


def test_supervisor_moving_a_look_never_arms_a_run_still_before_its_try():
    """A look the supervisor moves to a later deadline must not arm the next, unarmed run."""
    from tempest import pool

    paused, proceed = threading.Event(), threading.Event()

    class PausingSlot(pool.Slot):
        """Holds the supervisor right after a look that found the deadline still ahead."""

        __slots__ = ()

        def expire(self, now, on_timeout):
            later = super().expire(now, on_timeout)
            if later is not None and not paused.is_set():
                paused.set()
                proceed.wait(5)
            return later

    class Open:
        closed = False

    timed_out: list[int] = []
    supervisor = pool.Supervisor(lambda slot: timed_out.append(slot.run),
                                 lambda *taken: None, grace=5.0)
    slot = PausingSlot()
    slot.ident = 0  # no such thread: an injection would go nowhere
    supervisor.start()
    try:
        slot.begin("task1", "message1", 0.05, Open)  # a short limit, met: leaves an early look
        supervisor.watch(slot, slot.deadline)
        assert slot.settle() == pool.WORKER
        slot.begin("task2", "message2", 0.3, Open)   # the early look finds it going
        supervisor.watch(slot, slot.deadline)
        second_deadline = slot.deadline
        assert paused.wait(5)
        assert slot.settle() == pool.WORKER
        slot.begin("task3", "message3", 0.01, Open)  # its worker has not reached its try yet
        proceed.set()
        wait_for(lambda: timed_out or (time.monotonic() > second_deadline + 0.05
                                       and supervisor.pending() == 0), 5)
        assert timed_out == [], "a run was timed out before it was armed"
        assert slot.claim is None
    finally:
        proceed.set()
        supervisor.stop()


IN_CALLBACK = threading.Event()
CALLBACK_GO = threading.Event()


class ToCountedLate(Task):
    class configure:
        timeout = 0.1

    def process(self):
        _spin(5.0)

    def after_timeout(self):
        IN_CALLBACK.set()
        assert CALLBACK_GO.wait(10)


def test_a_timeout_counts_as_processed_only_once_settled(make_engine):
    """While after_timeout runs (before the failed store has it), stats() shows the
    message running, not processed; both change together once it is settled."""
    IN_CALLBACK.clear()
    CALLBACK_GO.clear()
    engine = make_engine(threads=1)
    engine.submit(ToCountedLate)
    engine.start()
    try:
        assert IN_CALLBACK.wait(10)
        during = engine.stats()
        assert (during["processed"], during["timed_out"], during["running"]) == (0, 0, 1)
        CALLBACK_GO.set()
        wait_for(lambda: engine.stats()["processed"] == 1)
        after = engine.stats()
        assert (after["timed_out"], after["running"]) == (1, 0)
    finally:
        CALLBACK_GO.set()
        assert engine.stop(timeout=10)
