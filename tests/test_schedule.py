"""submit(delay=, at=, priority=): checks, Unsupported, the Task default, engines running them."""

from __future__ import annotations

import datetime
import math
import threading
import time

import pytest

from tempest import ConfigurationError, Task, TempestError, Unsupported

from .conftest import wait_for

STARTED: dict[str, float] = {}
ORDER: list[str] = []
LOCK = threading.Lock()


class SchedNote(Task):
    def process(self, label: str) -> None:
        with LOCK:
            STARTED[label] = time.time()
            ORDER.append(label)


class SchedUrgent(Task):
    class configure:
        priority = 7

    def process(self) -> None:
        pass


class PlainQueue:
    """A user's queue with only the two required methods."""

    def __init__(self) -> None:
        self.messages: list[list[object]] = []

    def enqueue(self, message: list[object]) -> None:
        self.messages.append(message)

    def dequeue(self) -> list[object] | None:
        return self.messages.pop(0) if self.messages else None


def queue_of(engine):
    return engine._options["queue"]


# -- bad arguments: a clear error, nothing enqueued -------------------------------------

NAIVE = datetime.datetime(2030, 1, 1, 12, 0)
AWARE = datetime.datetime(2030, 1, 1, 12, 0, tzinfo=datetime.timezone.utc)


@pytest.mark.parametrize(("options", "error", "names"), [
    ({"delay": -1}, ValueError, "delay"),
    ({"delay": -0.001}, ValueError, "delay"),
    ({"delay": datetime.timedelta(seconds=-5)}, ValueError, "delay"),
    ({"delay": math.nan}, ValueError, "delay"),
    ({"delay": math.inf}, ValueError, "delay"),
    ({"delay": True}, TypeError, "delay"),
    ({"delay": "5"}, TypeError, "delay"),
    ({"at": NAIVE}, ValueError, "at"),
    ({"at": False}, TypeError, "at"),
    ({"at": math.nan}, ValueError, "at"),
    ({"at": -math.inf}, ValueError, "at"),
    ({"at": "tomorrow"}, TypeError, "at"),
    ({"at": datetime.date(2030, 1, 1)}, TypeError, "at"),
    ({"delay": 1, "at": AWARE}, ValueError, "delay= or at="),
    ({"priority": True}, TypeError, "priority"),
    ({"priority": 1.5}, TypeError, "priority"),
    ({"priority": "high"}, TypeError, "priority"),
    ({"priority": 2**31}, ValueError, "priority"),
    ({"priority": -(2**31) - 1}, ValueError, "priority"),
])
def test_bad_schedule_arguments_enqueue_nothing(make_engine, options, error, names):
    """A bad delay, at or priority raises TypeError/ValueError naming it; the queue stays empty."""
    engine = make_engine()
    with pytest.raises(error, match=names):
        engine.submit(SchedNote, "x", **options)
    queue = queue_of(engine)
    assert len(queue) == 0 and queue.scheduled_count() == 0


def test_every_accepted_form_of_a_time(make_engine):
    """delay as int, float or timedelta; at as an aware datetime or a POSIX timestamp."""
    engine = make_engine()
    now = time.time()
    for options in ({"delay": 60}, {"delay": 60.5}, {"delay": datetime.timedelta(minutes=1)},
                    {"at": AWARE}, {"at": now + 60},
                    {"at": datetime.datetime.now(datetime.timezone(datetime.timedelta(
                        hours=-5))) + datetime.timedelta(minutes=1)}):
        engine.submit(SchedNote, "x", **options)
    assert queue_of(engine).scheduled_count() == 6


def test_at_in_another_zone_is_the_same_instant(make_engine):
    """An aware datetime in any zone means the same moment: it is stored as a timestamp."""
    engine = make_engine()
    queue = queue_of(engine)
    seen = []
    queue.schedule = lambda message, **kw: seen.append(kw)
    tokyo = datetime.timezone(datetime.timedelta(hours=9))
    engine.submit(SchedNote, "x", at=AWARE.astimezone(tokyo))
    assert seen == [{"delay": None, "at": AWARE.timestamp(), "priority": 0}]


def test_a_past_time_runs_now(make_engine):
    """at= in the past (and delay=0) is ready at once."""
    engine = make_engine()
    engine.submit(SchedNote, "past", at=time.time() - 3600)
    engine.submit(SchedNote, "zero", delay=0)
    assert len(queue_of(engine)) == 2 and queue_of(engine).scheduled_count() == 0


# -- queues that cannot schedule ----------------------------------------------------------


@pytest.mark.parametrize("options", [{"delay": 5}, {"at": AWARE}, {"priority": 1},
                                     {"priority": 0}])
def test_a_queue_without_schedule_is_unsupported(make_engine, options):
    """On a queue with only enqueue/dequeue: tempest.Unsupported naming it; nothing enqueued."""
    engine = make_engine(queue=PlainQueue())
    with pytest.raises(Unsupported, match=r"PlainQueue has no schedule\(\)") as caught:
        engine.submit(SchedNote, "x", **options)
    assert isinstance(caught.value, TempestError)
    assert next(iter(options)) + "=" in str(caught.value)
    assert queue_of(engine).messages == []


def test_a_plain_submit_needs_no_schedule(make_engine):
    """Without delay, at or priority, submit uses enqueue alone, on any queue."""
    engine = make_engine(queue=PlainQueue())
    engine.submit(SchedNote, "x")
    assert len(queue_of(engine).messages) == 1


def test_a_task_priority_needs_schedule_too(make_engine):
    """A task whose configure block sets a priority cannot go to a queue without schedule."""
    engine = make_engine(queue=PlainQueue())
    with pytest.raises(Unsupported):
        engine.submit(SchedUrgent)
    assert queue_of(engine).messages == []


# -- the Task's priority option -------------------------------------------------------------


def test_a_task_priority_is_the_default_of_submit(make_engine):
    """configure.priority applies unless submit says otherwise; by name it is 0."""
    engine = make_engine()
    seen = []
    queue_of(engine).schedule = lambda message, **kw: seen.append(kw["priority"])
    engine.submit(SchedUrgent)
    engine.submit(SchedUrgent, priority=-3)
    engine.submit("SchedUrgent", priority=2)
    assert seen == [7, -3, 2]


@pytest.mark.parametrize("bad", [1.5, True, "7", 2**31, None])
def test_a_bad_task_priority_fails_at_class_creation(bad):
    """A Task's priority must be an int in the 32-bit range: else ConfigurationError."""
    with pytest.raises(ConfigurationError, match="priority"):
        type("SchedBadPriority", (Task,), {
            "configure": type("configure", (), {"priority": bad}),
            "process": lambda self: None})


# -- running them ---------------------------------------------------------------------------


def test_delayed_tasks_run_once_their_time_comes(make_engine):
    """A running engine starts a delayed task at its time, never before."""
    engine = make_engine(threads=2)
    engine.start()
    due = {}
    for label, delay in (("d3", 0.3), ("d1", 0.1), ("d2", 0.2)):
        due[label] = time.time() + delay
        engine.submit(SchedNote, label, delay=delay)
    wait_for(lambda: all(label in STARTED for label in due), 10)
    for label, at in due.items():
        assert STARTED[label] >= at - 0.002, label
    assert engine.stats()["scheduled"] == 0
    assert engine.stop(timeout=10)


def test_priority_orders_what_waits(make_engine):
    """With one worker busy, waiting messages start by priority, then in order."""
    gate = threading.Event()

    class SchedGate(Task):
        def process(self) -> None:
            gate.wait(10)

    engine = make_engine(threads=1)
    engine.submit(SchedGate)
    for label, priority in (("low", -1), ("a", 0), ("high", 5), ("b", 0), ("mid", 2)):
        engine.submit(SchedNote, f"prio-{label}", priority=priority)
    engine.start()
    wait_for(lambda: engine.stats()["running"] == 1)
    gate.set()
    wait_for(lambda: engine.stats()["processed"] == 6, 10)
    with LOCK:
        order = [label for label in ORDER if label.startswith("prio-")]
    assert order == ["prio-high", "prio-mid", "prio-a", "prio-b", "prio-low"]
    assert engine.stop(timeout=10)


def test_stats_count_scheduled_apart_from_queued(make_engine):
    """stats() shows ready messages as queued and the others as scheduled."""
    engine = make_engine()
    engine.submit(SchedNote, "x")
    engine.submit(SchedNote, "y", delay=600)
    engine.submit(SchedNote, "z", at=time.time() + 600, priority=3)
    stats = engine.stats()
    assert stats["queued"] == 1 and stats["scheduled"] == 2


def test_a_burst_run_leaves_future_messages_queued(make_engine):
    """run(burst=True) ends once nothing is ready and nothing runs; later ones stay."""
    engine = make_engine()
    engine.submit(SchedNote, "burst-now")
    engine.submit(SchedNote, "burst-later", delay=600)
    engine.run(burst=True)
    assert "burst-now" in STARTED and "burst-later" not in STARTED
    assert queue_of(engine).scheduled_count() == 1


def test_a_task_submitting_a_delayed_follow_up(make_engine):
    """A task may schedule more work; a burst run waits for it only while it is ready."""
    engine = make_engine()

    class SchedChain(Task):
        def process(self) -> None:
            self.engine.submit(SchedNote, "chain-next", delay=0.05)

    engine.submit(SchedChain)
    engine.start()
    wait_for(lambda: "chain-next" in STARTED, 10)
    assert engine.stop(timeout=10)
