"""Periodic tasks: every() and cron() schedules, their checks, and engines firing them."""

from __future__ import annotations

import collections
import datetime
import itertools
import threading
import time
from zoneinfo import ZoneInfo

import pytest

from tempest import ConfigurationError, Engine, Task, cron, every
from tempest.periodic import CATCH_UP, KEEP_MIN, stamp
from tempest.queues import MemoryQueue

from .conftest import main_log, wait_for

RAN: list[str] = []
LOCK = threading.Lock()


class PerTick(Task):
    def process(self, *args: object) -> None:
        with LOCK:
            RAN.append(self.task_id)


class PerUrgent(Task):
    class configure:
        priority = 4

    def process(self) -> None:
        pass


class PlainQueue:
    def enqueue(self, message: list[object]) -> None:
        pass

    def dequeue(self) -> None:
        return None


def ran(prefix: str) -> list[str]:
    with LOCK:
        return [task_id for task_id in RAN if task_id.startswith(prefix)]


# -- schedules: their slots, names and ids ----------------------------------------------


def test_every_slots_are_multiples_of_the_period():
    """every(30) fires at :00 and :30 of each minute, whoever computes it."""
    schedule = every(30, PerTick)
    assert schedule.after(1_000_000_000.0) == 1_000_000_020.0
    assert schedule.after(1_000_000_020.0) == 1_000_000_050.0
    assert list(schedule.slots(1_000_000_000.0, 1_000_000_080.0)) == [
        1_000_000_020.0, 1_000_000_050.0, 1_000_000_080.0]
    assert every(1.5, PerTick).after(10.0) == 10.5


def test_names_and_task_ids():
    """Default names come from the task and the schedule; a firing's id is name@UTC slot."""
    assert every(30, PerTick).name == "PerTick[every_30s]"
    assert every(0.5 + 1, "Other").name == "Other[every_1.5s]"
    daily = cron("0 3 * * *", PerTick, "daily", timezone="Europe/Berlin")
    assert daily.name == "PerTick[0_3_*_*_*]"
    slot = datetime.datetime(2026, 12, 6, 3, tzinfo=ZoneInfo("Europe/Berlin")).timestamp()
    assert daily.task_id(slot) == "PerTick[0_3_*_*_*]@20261206T020000Z"
    assert daily.message(slot) == ["PerTick[0_3_*_*_*]@20261206T020000Z", "PerTick", "daily"]
    assert every(1.5, PerTick, name="fast").task_id(10.5) == "fast@19700101T000010.500Z"
    assert stamp(0.25) == "19700101T000000.250Z"


def test_priority_defaults_to_the_tasks():
    """A schedule's priority is its own, else its task's, else none (0)."""
    assert every(5, PerUrgent).priority == 4
    assert every(5, PerUrgent, priority=-2).priority == -2
    assert every(5, PerTick).priority is None


def test_cron_follows_the_zone_and_its_daylight_saving_time():
    """cron() slots are wall-clock times in its zone; a skipped 02:30 fires at 03:00."""
    berlin = ZoneInfo("Europe/Berlin")
    schedule = cron("30 2 * * *", PerTick, timezone="Europe/Berlin")
    moment = datetime.datetime(2026, 3, 27, 12, tzinfo=berlin).timestamp()
    seen = []
    for _ in range(3):
        moment = schedule.after(moment)
        seen.append(datetime.datetime.fromtimestamp(moment, berlin).strftime("%d %H:%M %Z"))
    assert seen == ["28 02:30 CET", "29 03:00 CEST", "30 02:30 CEST"]
    autumn = datetime.datetime(2026, 10, 24, 12, tzinfo=berlin).timestamp()
    first = schedule.after(autumn)
    assert schedule.after(first) - first == 25 * 3600  # 02:30 happens twice: fired once


def test_keep_covers_twice_the_period():
    """A fired slot is remembered for an hour at least, and for two periods."""
    assert every(1, PerTick).keep == KEEP_MIN
    assert cron("0 3 * * *", PerTick).keep == 2 * 86400


@pytest.mark.parametrize("make", [
    lambda: every(0.5, PerTick),
    lambda: every(0, PerTick),
    lambda: every(True, PerTick),
    lambda: every(float("inf"), PerTick),
    lambda: every("10", PerTick),
    lambda: every(10, Task),
    lambda: every(10, ""),
    lambda: every(10, 42),
    lambda: every(10, PerUrgent, 1),  # process takes no argument
    lambda: every(10, PerTick, object()),
    lambda: every(10, PerTick, priority=2**40),
    lambda: every(10, PerTick, priority="high"),
    lambda: every(10, PerTick, name="with space"),
    lambda: every(10, PerTick, name="at@sign"),
    lambda: every(10, PerTick, name=""),
    lambda: cron("61 * * * *", PerTick),
    lambda: cron("* * *", PerTick),
    lambda: cron("not cron", PerTick),
    lambda: cron(5, PerTick),
    lambda: cron("0 3 * * *", PerTick, timezone="Mars/Olympus"),
    lambda: cron("0 3 * * *", PerTick, timezone="../../etc/passwd"),
    lambda: cron("0 3 * * *", PerTick, timezone=1),
])
def test_bad_schedules_are_configuration_errors(make):
    """A bad period, task, argument, priority, name, cron expression or zone: at once."""
    with pytest.raises(ConfigurationError):
        make()


def _engine(name: str, **options: object) -> type[Engine]:
    return type(name, (Engine,), {"configure": type("configure", (), options)})


def test_a_bad_cron_fails_the_engine_class():
    """A bad expression in a configure block fails when the class is created."""
    with pytest.raises(ConfigurationError, match="cron expression"):
        class PerBadCron(Engine):
            class configure:
                periodic = [cron("0 25 * * *", PerTick)]


@pytest.mark.parametrize("periodic", [every(5, PerTick), "every 5", [every(5, PerTick), 3],
                                      [every(5, PerTick), every(5, PerTick)]])
def test_bad_periodic_options(periodic):
    """periodic is a list of schedules with distinct names."""
    with pytest.raises(ConfigurationError, match="periodic"):
        _engine("PerBadOption", periodic=periodic)


def test_two_names_for_two_schedules_of_one_task():
    """The same task twice needs a name for one of them; then both are fine."""
    with pytest.raises(ConfigurationError, match="two schedules are named"):
        _engine("PerTwice", periodic=[every(5, PerTick, "a"), every(5, PerTick, "b")])
    engine = _engine("PerTwiceNamed", periodic=[every(5, PerTick, "a"),
                                                every(5, PerTick, "b", name="tick-b")])
    assert [s.name for s in engine._options["periodic"]] == ["PerTick[every_5s]", "tick-b"]


def test_a_queue_without_fire_cannot_take_periodic_tasks():
    """periodic on a queue lacking fire()/last_fired() fails at class creation, naming them."""
    with pytest.raises(ConfigurationError, match=r"PlainQueue has no fire\(\) or last_fired"):
        _engine("PerPlain", queue=PlainQueue(), periodic=[every(5, PerTick)])


# -- engines firing them ----------------------------------------------------------------------


def test_an_engine_fires_each_slot_once(make_engine):
    """every(1): each slot fires once, in order, with an id naming the slot; logged."""
    engine = make_engine(periodic=[every(1, PerTick, "one", name="per-one")])
    engine.start()
    wait_for(lambda: len(ran("per-one@")) >= 3, 10)
    assert engine.stop(timeout=10)
    ids = ran("per-one@")
    slots = [datetime.datetime.strptime(i.split("@")[1], "%Y%m%dT%H%M%SZ") for i in ids]
    assert len(set(ids)) == len(ids)
    assert all(b - a == datetime.timedelta(seconds=1) for a, b in itertools.pairwise(slots))
    log = main_log(engine)
    assert all(f"periodic fired schedule=per-one task_id={i}" in log for i in ids)


def test_engines_sharing_a_queue_fire_each_slot_once(make_engine):
    """Two engines on one queue, both declaring the schedule: every slot runs once."""
    shared = MemoryQueue()
    first = make_engine(queue=shared, periodic=[every(1, PerTick, name="per-shared")])
    second = make_engine(queue=shared, periodic=[every(1, PerTick, name="per-shared")])
    first.start()
    second.start()
    wait_for(lambda: len(ran("per-shared@")) >= 3, 10)
    assert first.stop(timeout=10) and second.stop(timeout=10)
    counts = collections.Counter(ran("per-shared@"))
    assert set(counts.values()) == {1}
    fired = [engine._state.last._scheduler.fired for engine in (first, second)]
    assert sum(fired) == len(counts)


def test_missed_slots_are_logged_at_start(make_engine):
    """Slots that passed while no engine ran are skipped, and said so at start."""
    queue = MemoryQueue()
    schedule = every(1, PerTick, name="per-missed")
    old = schedule.after(time.time() - 30)
    assert queue.fire(schedule.name, old, schedule.message(old), keep=schedule.keep)
    queue.dequeue()  # it ran long ago
    engine = make_engine(queue=queue, periodic=[schedule])
    engine.start()
    wait_for(lambda: "periodic slots missed" in main_log(engine), 10)
    line = next(line for line in main_log(engine).splitlines() if "slots missed" in line)
    missed = int(line.split(" missed=")[1].split()[0])
    assert 27 <= missed <= 31
    assert f"last_fired={stamp(old)}" in line
    assert engine.stop(timeout=10)
    assert not any(i.endswith(stamp(old + 1)) for i in ran("per-missed@"))  # not caught up


class FlakyQueue(MemoryQueue):
    """fire() fails twice, as a queue server going away would."""

    def __init__(self) -> None:
        super().__init__()
        self.failures = 2

    def fire(self, *args: object, **kwargs: object) -> bool:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("the queue is down")
        return super().fire(*args, **kwargs)  # type: ignore[arg-type]


def test_a_failing_fire_is_retried(make_engine):
    """A slot whose fire fails is retried with a backoff and fires once the queue is back."""
    engine = make_engine(queue=FlakyQueue(), periodic=[every(1, PerTick, name="per-flaky")])
    engine.start()
    wait_for(lambda: ran("per-flaky@"), 15)
    assert engine.stop(timeout=10)
    log = main_log(engine)
    assert "periodic fire failed" in log and "attempt=2" in log
    assert "ConnectionError: the queue is down" in log


def test_a_slot_too_late_to_fire_is_logged_as_missed(make_engine, monkeypatch):
    """A slot the queue could not take within CATCH_UP seconds is logged as missed."""
    from tempest import periodic

    queue = FlakyQueue()
    queue.failures = 10**6
    monkeypatch.setattr(periodic, "CATCH_UP", 0.3)
    engine = make_engine(queue=queue, periodic=[every(1, PerTick, name="per-late")])
    engine.start()
    wait_for(lambda: "periodic slot missed" in main_log(engine), 15)
    assert engine.stop(timeout=10)
    assert CATCH_UP == 300.0  # the default, restored
