"""Bad input: malformed messages are never run, never silently dropped, never stop the engine."""

from __future__ import annotations

import json
import threading

import pytest

from tempest import Task
from tempest.queues import MemoryQueue

from .conftest import main_log, wait_for

# -- tasks used here (names unique across the suite) ---------------------------------

CALLS: list[tuple] = []
CALLS_LOCK = threading.Lock()


class BadAdder(Task):
    def process(self, a, b):
        with CALLS_LOCK:
            CALLS.append((self.task_id, a, b))
        return a + b


@pytest.fixture(autouse=True)
def _clear_calls():
    CALLS.clear()
    yield
    CALLS.clear()


BAD_MESSAGES = [
    pytest.param(5, "NotAList", id="int"),
    pytest.param({"task": "BadAdder", "args": [1, 2]}, "NotAList", id="dict"),
    pytest.param(3.5, "NotAList", id="float"),
    pytest.param([], "TooShort", id="empty-list"),
    pytest.param(["bad-only-id"], "TooShort", id="only-id"),
    pytest.param(["bad-unknown", "BadNoSuchTask", 1, 2], "UnknownTask", id="unknown-task"),
    pytest.param(["bad-nonstr-name", 17, 1, 2], "UnknownTask", id="non-string-name"),
    pytest.param(["bad-dotted", "os.system", "true"], "UnknownTask", id="dotted-name"),
    pytest.param(["bad-too-few", "BadAdder", 1], "BadArguments", id="too-few-args"),
    pytest.param(["bad-too-many", "BadAdder", 1, 2, 3], "BadArguments", id="too-many-args"),
    pytest.param('["broken json', "Undecodable", id="undecodable-str"),
    pytest.param(b"\xff\xfe\x00garbage", "Undecodable", id="undecodable-bytes"),
    pytest.param([123, "BadAdder", 1, 2], "BadTaskId", id="int-task-id"),
    pytest.param(["", "BadAdder", 1, 2], "BadTaskId", id="empty-task-id"),
]


def _json_lines(engine):
    return [json.loads(line) for line in main_log(engine).splitlines() if line.strip()]


@pytest.mark.parametrize(("bad", "reason"), BAD_MESSAGES)
def test_bad_message_is_rejected_logged_and_engine_goes_on(make_engine, bad, reason):
    """A bad message is not run; it is logged whole with its reason, rejected and counted."""
    queue = MemoryQueue()
    engine = make_engine(queue=queue, log_format="json", threads=1)
    before = engine.submit(BadAdder, 1, 2)
    queue.enqueue(bad)
    after = engine.submit(BadAdder, 3, 4)
    engine.run(burst=True)

    assert sorted(CALLS) == sorted([(before, 1, 2), (after, 3, 4)])
    assert queue.rejected() == [(bad, reason)]
    stats = engine.stats()
    assert stats["rejected"] == 1
    assert stats["succeeded"] == 2
    assert stats["failed"] == 0 and stats["running"] == 0 and stats["queued"] == 0

    rejected = [obj for obj in _json_lines(engine) if obj.get("event") == "rejected"]
    assert len(rejected) == 1
    assert rejected[0]["reason"] == reason
    assert rejected[0]["message"] == repr(bad)
    outcomes = [obj for obj in _json_lines(engine) if obj.get("outcome")]
    assert {obj["task_id"] for obj in outcomes} == {before, after}


def test_rejected_line_in_text_format(make_engine):
    """In the text log a rejection is one line carrying the reason and the whole message."""
    queue = MemoryQueue()
    engine = make_engine(queue=queue)
    queue.enqueue(["bad-text-id", "BadUnknownInText", 1, "two"])
    engine.run(burst=True)
    lines = [line for line in main_log(engine).splitlines() if " rejected " in line]
    assert len(lines) == 1
    line = lines[0]
    assert "ERROR" in line
    assert "reason=UnknownTask" in line
    assert "bad-text-id" in line and "BadUnknownInText" in line and "two" in line


def test_interleaved_good_and_bad_messages_are_all_handled(make_engine):
    """Good messages around many different bad ones are all processed; every bad one rejected."""
    queue = MemoryQueue()
    engine = make_engine(queue=queue, threads=2)
    bads = [param.values for param in BAD_MESSAGES]
    good_ids = [engine.submit(BadAdder, 0, 0)]
    for n, (bad, _reason) in enumerate(bads):
        queue.enqueue(bad)
        good_ids.append(engine.submit(BadAdder, n, n))
    engine.run(burst=True)

    assert sorted(call[0] for call in CALLS) == sorted(good_ids)
    stats = engine.stats()
    assert stats["succeeded"] == len(good_ids)
    assert stats["rejected"] == len(bads)
    assert stats["processed"] == len(good_ids)
    got = queue.rejected()
    assert len(got) == len(bads)
    for bad, reason in bads:
        assert (bad, reason) in got
    log = main_log(engine)
    assert log.count(" rejected ") == len(bads)
    for task_id in good_ids:
        assert log.count(f"task_id={task_id} task=BadAdder outcome=success") == 1


def test_tuple_message_is_accepted(make_engine):
    """A message given as a tuple (not a list) is run like a list."""
    queue = MemoryQueue()
    engine = make_engine(queue=queue)
    queue.enqueue(("bad-tuple-ok", "BadAdder", 5, 6))
    engine.run(burst=True)
    assert CALLS == [("bad-tuple-ok", 5, 6)]
    assert queue.rejected() == []


class _PlainQueue:
    """A minimal queue: enqueue and dequeue only (no reject, no __len__)."""

    def __init__(self):
        self._items = []
        self._lock = threading.Lock()

    def enqueue(self, message):
        with self._lock:
            self._items.append(message)

    def dequeue(self):
        with self._lock:
            return self._items.pop(0) if self._items else None


class _RejectRaisesQueue(_PlainQueue):
    def __init__(self):
        super().__init__()
        self.attempts = []

    def reject(self, message, reason):
        self.attempts.append((message, reason))
        raise ConnectionError("dead-letter store is down")


def test_queue_without_reject_still_logs_and_goes_on(make_engine):
    """With a queue that has no reject(), bad input is logged and the engine goes on."""
    queue = _PlainQueue()
    engine = make_engine(queue=queue)
    first = engine.submit(BadAdder, 1, 1)
    queue.enqueue(["bad-plain", "BadNowhere"])
    second = engine.submit(BadAdder, 2, 2)
    engine.run(burst=True)
    assert sorted(c[0] for c in CALLS) == sorted([first, second])
    assert engine.stats()["rejected"] == 1
    assert "reason=UnknownTask" in main_log(engine)


def test_failing_reject_is_logged_and_engine_goes_on(make_engine):
    """A queue whose reject() raises does not stop the engine; the failure is logged."""
    queue = _RejectRaisesQueue()
    engine = make_engine(queue=queue)
    queue.enqueue(7)
    good = engine.submit(BadAdder, 1, 2)
    engine.run(burst=True)
    assert queue.attempts == [(7, "NotAList")]
    assert [c[0] for c in CALLS] == [good]
    log = main_log(engine)
    assert "reason=NotAList" in log
    assert "dead-letter store is down" in log


def test_bad_input_while_running(make_engine):
    """Bad messages arriving at a started engine are rejected while good ones keep running."""
    queue = MemoryQueue()
    engine = make_engine(queue=queue)
    engine.start()
    queue.enqueue({"not": "a list"})
    good = engine.submit(BadAdder, 2, 3)
    queue.enqueue([])
    wait_for(lambda: engine.stats()["rejected"] == 2 and engine.stats()["succeeded"] == 1, 5)
    assert engine.stop(timeout=10)
    assert [c[0] for c in CALLS] == [good]
    assert sorted(reason for _, reason in queue.rejected()) == ["NotAList", "TooShort"]
