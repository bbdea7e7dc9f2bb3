"""The engine record: announced while running, forgotten at the finish, outcome deltas."""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from typing import Any

import pytest

import tempest
from tempest import Task, every
from tempest.queues import MemoryQueue

from .conftest import main_log, wait_for

RECORD_KEYS = {
    "engine_id", "name", "host", "pid", "threads", "coroutines", "guarantee", "version",
    "started_at", "announced_at", "uptime", "processed", "succeeded", "failed",
    "timed_out", "rejected", "retried", "abandoned", "busy", "running", "periodic",
    "stopping",
}


class RegistryQueue(MemoryQueue):
    """A MemoryQueue with the engine registry methods, over dicts, as a user would add
    them to a queue of their own (records expire *ttl* seconds after each announce)."""

    def __init__(self, fail: dict[str, int] | None = None) -> None:
        super().__init__()
        self.fail = dict(fail or {})
        """Method name -> how many of its next calls raise."""
        self.records: dict[str, tuple[dict[str, Any], float]] = {}
        self.buckets: dict[int, dict[str, int]] = {}
        self.calls: list[tuple[str, Any]] = []
        self.changed = threading.Condition()

    def _call(self, name: str, detail: Any) -> None:
        with self.changed:
            self.calls.append((name, detail))
            self.changed.notify_all()
            if self.fail.get(name):
                self.fail[name] -= 1
                raise ConnectionError(f"{name}: server went away")

    def announce(self, engine_id: str, record: dict[str, Any], ttl: float) -> None:
        self._call("announce", ttl)
        with self.changed:
            self.records[engine_id] = (json.loads(json.dumps(record)), time.time() + ttl)
            self.changed.notify_all()

    def engines(self) -> list[dict[str, Any]]:
        with self.changed:
            now = time.time()
            for engine_id, (_, expires) in list(self.records.items()):
                if expires <= now:
                    del self.records[engine_id]
            return [record for _, (record, _) in sorted(self.records.items())]

    def forget_engine(self, engine_id: str) -> None:
        self._call("forget_engine", engine_id)
        with self.changed:
            self.records.pop(engine_id, None)

    def add_outcomes(self, minute: int, counts: dict[str, int]) -> None:
        self._call("add_outcomes", (minute, dict(counts)))
        with self.changed:
            bucket = self.buckets.setdefault(minute, {})
            for outcome, count in counts.items():
                bucket[outcome] = bucket.get(outcome, 0) + count

    def outcomes(self, since: int) -> dict[int, dict[str, int]]:
        with self.changed:
            return {m: dict(c) for m, c in self.buckets.items() if m >= since}

    def record_where(self, predicate: Any, timeout: float = 10.0) -> dict[str, Any]:
        """Wait for an unexpired record satisfying *predicate*; return it."""
        found: list[dict[str, Any]] = []

        def look() -> bool:
            found[:] = [r for r in self.engines() if predicate(r)]
            return bool(found)

        with self.changed:
            assert self.changed.wait_for(look, timeout), self.engines()
        return found[0]

    def summed(self) -> dict[str, int]:
        """Every bucket's counts added up."""
        total: dict[str, int] = {}
        for counts in self.outcomes(0).values():
            for outcome, count in counts.items():
                total[outcome] = total.get(outcome, 0) + count
        return total


class AnnHold(Task):
    """Runs until the test releases it."""

    release = threading.Event()
    started = threading.Event()

    def process(self) -> None:
        AnnHold.started.set()
        AnnHold.release.wait(10)


class AnnAsyncHold(Task):
    """A coroutine task that runs until the test releases it."""

    release = threading.Event()

    async def process(self) -> str:
        import asyncio

        while not AnnAsyncHold.release.is_set():
            await asyncio.sleep(0.005)
        return "done"


class AnnOk(Task):
    def process(self, n: int) -> int:
        return n


class AnnBoom(Task):
    def process(self) -> None:
        raise ValueError("boom")


class AnnFlaky(Task):
    """Fails its first attempt, succeeds the second (retries = 1)."""

    class configure:
        retries = 1
        retry_delay = 0.01

    def process(self) -> str:
        if self.attempt == 1:
            raise RuntimeError("first try")
        return "ok"


@pytest.fixture(autouse=True)
def _release_holds() -> Any:
    for event in (AnnHold.release, AnnHold.started, AnnAsyncHold.release):
        event.clear()
    yield
    AnnHold.release.set()
    AnnAsyncHold.release.set()


def test_record_while_tasks_run(make_engine):
    """A running engine's record has every key, and lists the task it runs with its id."""
    queue = RegistryQueue()
    engine = make_engine(queue=queue, threads=3, coroutines=7, announce_every=0.05,
                         periodic=[every(3600, AnnOk, 1, name="hourly")])
    before = time.time()
    task_id = engine.submit(AnnHold)
    engine.start()
    try:
        record = queue.record_where(lambda r: r["running"])
        assert set(record) == RECORD_KEYS
        host, pid, name, suffix = record["engine_id"].split(":")
        assert (host, int(pid), name) == (socket.gethostname(), os.getpid(), engine.__name__)
        assert len(suffix) == 8 and int(suffix, 16) >= 0
        assert record["name"] == engine.__name__
        assert record["host"] == socket.gethostname() and record["pid"] == os.getpid()
        assert record["threads"] == 3 and record["coroutines"] == 7
        assert record["guarantee"] == "at-most-once"  # a MemoryQueue has no ack
        assert record["version"] == tempest.__version__
        assert before <= record["started_at"] <= record["announced_at"] <= time.time()
        assert record["uptime"] >= 0
        assert record["busy"] == 1 and record["stopping"] is False
        assert [r["task_id"] for r in record["running"]] == [task_id]
        running = record["running"][0]
        assert running["task"] == "AnnHold"
        assert record["started_at"] <= running["started_at"] <= record["announced_at"]
        (schedule,) = record["periodic"]
        assert schedule["name"] == "hourly" and schedule["every"] == 3600.0
        now = time.time()
        assert now < schedule["next_at"] <= now + 3600 and schedule["next_at"] % 3600 == 0
        for key in ("processed", "succeeded", "failed", "timed_out", "rejected", "retried",
                    "abandoned"):
            assert record[key] == 0, key
        # Announced again and again, each time with ttl = 3 * announce_every.
        wait_for(lambda: sum(1 for c in queue.calls if c[0] == "announce") >= 3)
        assert all(ttl == pytest.approx(0.15) for what, ttl in queue.calls if what == "announce")
    finally:
        AnnHold.release.set()
        assert engine.stop(timeout=10)


def test_running_lists_the_oldest_first_and_counts_move(make_engine):
    """``running`` lists tasks oldest first; the counters follow the outcomes."""
    queue = RegistryQueue()
    engine = make_engine(queue=queue, threads=3, announce_every=0.05)
    engine.start()
    try:
        engine.submit(AnnOk, 1)
        wait_for(lambda: engine.stats()["succeeded"] == 1)
        first = engine.submit(AnnHold)
        AnnHold.started.wait(5)
        second = engine.submit(AnnHold)
        record = queue.record_where(lambda r: len(r["running"]) == 2 and r["succeeded"] == 1)
        assert [r["task_id"] for r in record["running"]] == [first, second]
        assert record["running"][0]["started_at"] <= record["running"][1]["started_at"]
        assert record["processed"] == 1 and record["busy"] == 2
    finally:
        AnnHold.release.set()
        assert engine.stop(timeout=10)


def test_forgotten_at_finish_and_outcome_deltas_add_up(make_engine):
    """A finished run removes its record at once; the buckets hold every outcome once."""
    queue = RegistryQueue()
    engine = make_engine(queue=queue, announce_every=0.02)
    for n in range(7):
        engine.submit(AnnOk, n)
    engine.submit(AnnBoom)
    engine.submit(AnnBoom)
    engine.submit(AnnFlaky)
    queue.enqueue(["bad1", "NoSuchTask"])
    engine.start()
    wait_for(lambda: engine.stats()["succeeded"] == 8)  # AnnFlaky's retry included
    assert engine.stop(timeout=10)
    assert queue.engines() == []
    names = [what for what, _ in queue.calls]
    assert names[0] == "announce" and names[-1] == "forget_engine"
    assert queue.summed() == {"succeeded": 8, "failed": 2, "retried": 1, "rejected": 1}
    for minute, (_, counts) in [(m, (m, c)) for m, c in queue.outcomes(0).items()]:
        assert minute % 60 == 0 and abs(minute - time.time()) < 3600
        assert all(count > 0 for count in counts.values())
    # Only deltas were sent, never an empty one.
    for what, detail in queue.calls:
        if what == "add_outcomes":
            assert detail[1] and all(v > 0 for v in detail[1].values())


def test_coroutine_tasks_are_listed_and_counted(make_engine):
    """Coroutine tasks show in ``running`` while they run, and in the counts after."""
    queue = RegistryQueue()
    engine = make_engine(queue=queue, announce_every=0.05)
    task_id = engine.submit(AnnAsyncHold)
    engine.start()
    try:
        record = queue.record_where(lambda r: r["running"])
        assert record["running"][0]["task_id"] == task_id
        assert record["running"][0]["task"] == "AnnAsyncHold"
        AnnAsyncHold.release.set()
        record = queue.record_where(lambda r: r["succeeded"] == 1 and not r["running"])
        assert record["processed"] == 1
    finally:
        AnnAsyncHold.release.set()
        assert engine.stop(timeout=10)
    assert queue.summed() == {"succeeded": 1}


def test_stopping_is_announced_at_once_and_through_the_drain(make_engine):
    """A stop request is announced at once (``stopping``, no next firing); the record
    stays while running tasks drain, and goes when the engine has finished."""
    queue = RegistryQueue()
    engine = make_engine(queue=queue, announce_every=30, shutdown_timeout=10,
                         periodic=[every(60, AnnOk, 2, name="minutely")])
    engine.submit(AnnHold)
    engine.start()
    try:
        AnnHold.started.wait(5)
        queue.record_where(lambda r: not r["stopping"])  # the first, at start
        engine.stop(wait=False)
        # Well before the next 30 s beat.
        record = queue.record_where(lambda r: r["stopping"], timeout=5)
        assert record["periodic"][0]["next_at"] is None
        assert record["busy"] == 1
    finally:
        AnnHold.release.set()
        assert engine.stop(timeout=10)
    assert queue.engines() == []
    assert queue.summed() == {"succeeded": 1}


def test_announce_failures_are_logged_and_retried(make_engine):
    """A failing registry is logged as a warning and retried; the engine runs on."""
    queue = RegistryQueue(fail={"announce": 2, "add_outcomes": 1})
    engine = make_engine(queue=queue, announce_every=0.02)
    engine.start()
    try:
        for n in range(5):
            engine.submit(AnnOk, n)
        wait_for(lambda: engine.stats()["succeeded"] == 5)
        queue.record_where(lambda r: r["succeeded"] == 5)
        wait_for(lambda: queue.summed().get("succeeded") == 5)
        log = main_log(engine)
        assert "WARNING announce failed" in log and "attempt=2" in log
        assert "ConnectionError: announce: server went away" in log
        assert re.search(r"INFO +announce recovered attempts=2", log)
        assert "WARNING add_outcomes failed" in log
    finally:
        assert engine.stop(timeout=10)
    assert queue.summed() == {"succeeded": 5}  # the failed delta came with a later one


def test_a_failed_forget_leaves_the_record_to_expire(make_engine):
    """Where forget_engine fails at the finish, the record expires after its ttl."""
    queue = RegistryQueue(fail={"forget_engine": 1})
    engine = make_engine(queue=queue, announce_every=0.05)
    engine.start()
    queue.record_where(lambda r: True)
    assert engine.stop(timeout=10)
    assert "WARNING forget_engine failed" in main_log(engine)
    assert queue.records  # still stored, not yet expired
    wait_for(lambda: queue.engines() == [], timeout=5)


def test_announce_every_none_announces_nothing(make_engine):
    """``announce_every = None``: the queue's registry is never called."""
    queue = RegistryQueue()
    engine = make_engine(queue=queue, announce_every=None)
    engine.submit(AnnOk, 1)
    engine.run(burst=True)
    assert queue.calls == []
    assert not [t for t in threading.enumerate() if t.name.startswith("tempest-announce")]


def test_a_queue_with_part_of_the_registry_is_warned_about(make_engine):
    """A queue with some registry methods but not all: a warning names what is missing."""

    class HalfQueue:
        """A user's queue: a MemoryQueue inside, and announce() alone of the five."""

        def __init__(self) -> None:
            self.inner = MemoryQueue()

        def enqueue(self, message: Any) -> None:
            self.inner.enqueue(message)

        def dequeue(self, timeout: float | None = None) -> Any:
            return self.inner.dequeue(timeout=timeout)

        def announce(self, engine_id: str, record: dict[str, Any], ttl: float) -> None:
            raise AssertionError("never called without the other methods")

    engine = make_engine(queue=HalfQueue())
    engine.submit(AnnOk, 1)
    engine.run(burst=True)
    log = main_log(engine)
    assert "WARNING engine record unavailable" in log
    assert "forget_engine" in log and engine.stats()["succeeded"] == 1


def test_started_line_names_the_engine_id(make_engine):
    """The ``started`` line carries the id the record is stored under."""
    queue = RegistryQueue()
    engine = make_engine(queue=queue, announce_every=0.05)
    engine.start()
    try:
        record = queue.record_where(lambda r: True)
        assert f"engine_id={record['engine_id']}" in main_log(engine)
    finally:
        assert engine.stop(timeout=10)


def test_a_start_that_fails_half_way_stops_what_it_started(make_engine, monkeypatch):
    """A worker thread that cannot start (the process is at its thread limit): start()
    raises, and the metrics port, the announcer and the workers started are gone; the
    engine record is forgotten, and the engine can start again."""
    queue = MemoryQueue()
    engine = make_engine(queue=queue, threads=3, metrics_port=0, announce_every=0.05)
    real_start = threading.Thread.start
    started: list[str] = []

    def start(thread: threading.Thread) -> None:
        if thread.name.startswith("tempest-worker:") and len(started) == 2:
            raise RuntimeError("can't start new thread")
        if thread.name.startswith("tempest-worker:"):
            started.append(thread.name)
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        engine.start()
    monkeypatch.setattr(threading.Thread, "start", real_start)
    log = main_log(engine)
    assert "start-up failed" in log
    url = re.search(r"metrics served url=(\S+)", log).group(1)  # type: ignore[union-attr]
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port),
                                                                         timeout=2):
        pass
    name = engine.__name__
    wait_for(lambda: not [t for t in threading.enumerate() if t.name.endswith(f":{name}")])
    assert queue.engines() == []
    engine.submit(AnnOk, 1)
    engine.run(burst=True)  # a clean start after the failed one
    assert engine.stats()["succeeded"] == 1
