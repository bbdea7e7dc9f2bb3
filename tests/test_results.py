"""Task results: Engine.result, call, aresult and acall through a running engine,
on all four built-in queues."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tempest import Engine, Task, TaskFailed, Unsupported
from tempest.queues import MemoryQueue

from .conftest import BUILT_IN_KINDS, built_in_queue, main_log, wait_for

KINDS = BUILT_IN_KINDS
SCRIPTS = Path(__file__).parent / "scripts"


class Where:
    """Where a test's queue lives, for a second process to open it."""

    def __init__(self, kind: str, where: str = "", name: str = "") -> None:
        self.kind, self.where, self.name = kind, where, name


@pytest.fixture(params=KINDS)
def queue_and_where(request: pytest.FixtureRequest, tmp_path: Path
                    ) -> Iterator[tuple[Any, Where]]:
    """A fresh queue of each built-in kind, and where it lives; removed afterwards,
    once the engines made on it have stopped (not while they still use it)."""
    made = request.getfixturevalue("make_engine").made
    kind = request.param
    name = f"results_{uuid.uuid4().hex[:10]}"
    with built_in_queue(kind, request, tmp_path, name) as queue:
        if kind == "memory":
            where = Where(kind)
        elif kind == "sqlite":
            where = Where(kind, str(tmp_path / "queue.db"))
        else:
            fixture = "redis_url" if kind == "redis" else "postgres_dsn"
            where = Where(kind, request.getfixturevalue(fixture), name)
        yield queue, where
        for engine in made:
            with contextlib.suppress(Exception):  # its own test reports what went wrong
                engine.stop(timeout=10)


@pytest.fixture
def queue(queue_and_where: tuple[Any, Where]) -> Any:
    return queue_and_where[0]


class ResultsAdd(Task):
    def process(self, a: int, b: int) -> int:
        return a + b


class ResultsShape(Task):
    def process(self, value: Any) -> Any:
        return {"got": value, "pair": (1, 2)}


class ResultsBoom(Task):
    def process(self, why: str) -> None:
        raise ValueError(why)


class ResultsSlow(Task):
    class configure:
        timeout = 0.2

    def process(self) -> None:
        for _ in range(1000):  # short sleeps: the timeout lands between two
            time.sleep(0.01)


class ResultsSet(Task):
    def process(self) -> set[int]:
        return {1, 2}


class ResultsKept(Task):
    class configure:
        store_result = True

    def process(self, n: int) -> int:
        return n * 10


class ResultsBrief(Task):
    class configure:
        store_result = True
        result_ttl = 0.5

    def process(self) -> str:
        return "brief"


class ResultsFlaky(Task):
    """Fails until its attempt reaches the number it is given."""

    class configure:
        retries = 3
        retry_delay = 0.01

    def process(self, succeed_at: int) -> int:
        if self.attempt < succeed_at:
            raise RuntimeError(f"attempt {self.attempt}")
        return self.attempt


@pytest.fixture
def engine(make_engine, queue) -> type[Engine]:
    made = make_engine(queue=queue, threads=2)
    made.start()
    return made


def test_call_returns_the_value_as_json_gives_it_back(engine):
    assert engine.call(ResultsAdd, 2, 5, timeout=30) == 7
    assert engine.call("ResultsShape", [1, "a"], timeout=30) == {"got": [1, "a"],
                                                                 "pair": [1, 2]}


def test_a_store_result_task_is_kept_for_result_any_number_of_times(engine):
    task_id = engine.submit(ResultsKept, 4)
    assert engine.result(task_id, timeout=30) == 40
    assert engine.result(task_id, timeout=0) == 40  # kept: asked again, at once


def test_a_plain_submit_keeps_no_result(engine):
    task_id = engine.submit(ResultsAdd, 1, 1)
    marker = engine.submit(ResultsKept, 1)
    assert engine.result(marker, timeout=30) == 10  # ran after (or beside) the plain one
    wait_for(lambda: engine.stats()["processed"] >= 2, 30)
    with pytest.raises(TimeoutError, match=task_id):
        engine.result(task_id, timeout=0)


def test_a_failure_raises_task_failed_with_its_story(engine):
    with pytest.raises(TaskFailed) as caught:
        engine.call(ResultsBoom, "bad <input>", timeout=30)
    failed = caught.value
    assert (failed.error_type, failed.error, failed.attempts) == ("ValueError",
                                                                   "bad <input>", 1)
    assert "raise ValueError(why)" in failed.traceback
    assert failed.task_id in str(failed) and "ValueError: bad <input>" in str(failed)
    assert f"task_id={failed.task_id}" in main_log(engine)


def test_a_timeout_raises_task_failed(engine):
    with pytest.raises(TaskFailed) as caught:
        engine.call(ResultsSlow, timeout=30)
    assert caught.value.error_type == "TaskTimeout"
    assert "time.sleep" in caught.value.traceback  # where the thread was


def test_retries_run_before_the_result_and_exhausted_ones_fail(engine):
    assert engine.call(ResultsFlaky, 3, timeout=30) == 3  # the third attempt's value
    with pytest.raises(TaskFailed) as caught:
        engine.call(ResultsFlaky, 99, timeout=30)
    assert caught.value.attempts == 4 and caught.value.error == "attempt 4"


def test_a_non_json_return_value_fails_the_attempt_not_the_engine(engine):
    with pytest.raises(TaskFailed) as caught:
        engine.call(ResultsSet, timeout=30)
    assert caught.value.error_type == "TypeError"
    assert "ResultsSet.process returned set" in caught.value.error
    assert "not JSON-serializable" in caught.value.error
    assert "outcome=failure" in main_log(engine)
    assert engine.call(ResultsAdd, 1, 2, timeout=30) == 3  # still running


def test_a_result_is_gone_after_its_ttl(engine):
    task_id = engine.submit(ResultsBrief)
    assert engine.result(task_id, timeout=30) == "brief"

    def gone() -> bool:
        try:
            engine.result(task_id, timeout=0)
        except TimeoutError:
            return True
        return False

    assert wait_for(gone, 10)


def test_waiting_for_an_unknown_id_times_out(engine):
    began = time.monotonic()
    with pytest.raises(TimeoutError):
        engine.result("no-such-task", timeout=0)
    assert time.monotonic() - began < 2.0
    began = time.monotonic()
    with pytest.raises(TimeoutError, match=r"within 0\.3s"):
        engine.result("no-such-task", timeout=0.3)
    assert 0.25 < time.monotonic() - began < 5.0


def test_a_waiting_result_is_woken_by_the_outcome_not_a_poll(engine):
    """Ten calls of a no-op in a row: each returns in well under the 1 s a poll would take."""
    engine.call(ResultsAdd, 0, 0, timeout=30)  # warm: connections, scripts, tables
    took = []
    for i in range(10):
        began = time.monotonic()
        assert engine.call(ResultsAdd, i, 1, timeout=30) == i + 1
        took.append(time.monotonic() - began)
    assert sorted(took)[5] < 0.25, took  # the median; generous


@pytest.mark.parametrize("timeout", [-1, float("nan")])
def test_a_bad_timeout_is_a_value_error(engine, timeout):
    with pytest.raises(ValueError, match="timeout"):
        engine.result("x", timeout=timeout)
    with pytest.raises(ValueError, match="timeout"):
        engine.call(ResultsAdd, 1, 2, timeout=timeout)


def test_bad_call_arguments_enqueue_nothing(make_engine, queue):
    engine = make_engine(queue=queue)
    with pytest.raises(TypeError, match="timeout"):
        engine.call(ResultsAdd, 1, 2, timeout="soon")
    with pytest.raises(TypeError, match="unexpected keyword"):
        engine.call(ResultsAdd, 1, 2, prio=3)
    with pytest.raises(TypeError, match=r"ResultsAdd\.process"):
        engine.call(ResultsAdd, 1, timeout=1)
    with pytest.raises(ValueError, match="delay"):
        engine.call(ResultsAdd, 1, 2, delay=-1, timeout=1)
    assert len(queue) == 0 and queue.scheduled_count() == 0


def test_call_passes_submit_options(engine):
    assert engine.call(ResultsAdd, 1, 2, task_id="my-call-1", priority=5, delay=0.05,
                       timeout=30) == 3
    assert engine.result("my-call-1", timeout=0) == 3


def test_aresult_and_acall_leave_the_event_loop_free(engine):
    async def scenario() -> tuple[Any, Any, int]:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        ticker = asyncio.create_task(tick())
        task_id = engine.submit(ResultsKept, 7)
        waited = await engine.aresult(task_id, timeout=30)
        called = await engine.acall(ResultsAdd, 20, 22, timeout=30)
        before = ticks
        with pytest.raises(TimeoutError):
            await engine.aresult("no-such-task", timeout=0.3)
        ticked = ticks - before
        ticker.cancel()
        return waited, called, ticked

    waited, called, ticked = asyncio.run(scenario())
    assert (waited, called) == (70, 42)
    assert ticked >= 5  # the loop ran on while aresult waited 0.3 s


def test_acall_raises_task_failed(engine):
    with pytest.raises(TaskFailed, match="boom"):
        asyncio.run(engine.acall(ResultsBoom, "boom", timeout=30))


def test_a_second_process_calls_through_the_queue(engine, queue_and_where):
    """A caller in a process of its own (no worker) gets the answer of this engine."""
    _, where = queue_and_where
    if where.kind == "memory":
        pytest.skip("a MemoryQueue lives in one process")
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / "results_caller.py"), where.kind, where.where,
         where.name, f"Caller{uuid.uuid4().hex[:6]}", "20", "22"],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == 42


class StoringAndAcking(MemoryQueue):
    """A MemoryQueue with ``store_result_and_ack``: its calls recorded; raises while
    ``failing``, storing nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str]] = []
        self.failing = False

    def store_result_and_ack(self, message: Any, task_id: str, record: dict[str, Any], *,
                             ttl: float) -> None:
        self.calls.append((task_id, record["state"]))
        assert message[0] == task_id
        if self.failing:
            raise ConnectionError("the store went away")
        self.store_result(task_id, record, ttl=ttl)


def test_a_success_is_stored_with_its_ack_where_the_queue_can(make_engine):
    """A success whose result is kept goes through store_result_and_ack, a final
    failure through store_result; a failed store_result_and_ack is logged and
    stores nothing (the call times out)."""
    queue = StoringAndAcking()
    engine = make_engine(queue=queue)
    engine.start()
    assert engine.call(ResultsAdd, 2, 3, timeout=10) == 5
    assert [state for _, state in queue.calls] == ["succeeded"]
    with pytest.raises(TaskFailed):
        engine.call(ResultsBoom, "no", timeout=10)
    assert len(queue.calls) == 1
    queue.failing = True
    with pytest.raises(TimeoutError):
        engine.call(ResultsAdd, 1, 1, timeout=0.5)
    wait_for(lambda: "result store failed" in main_log(engine), 10)
    assert len(queue.calls) == 2
    wait_for(lambda: engine.stats()["processed"] == 3, 10)


class PlainQueue:
    """A user's queue: enqueue and dequeue only."""

    def __init__(self) -> None:
        self.items: list[Any] = []

    def enqueue(self, message: Any) -> None:
        self.items.append(message)

    def dequeue(self) -> Any:
        return self.items.pop(0) if self.items else None


def test_a_queue_without_results_is_unsupported_and_enqueues_nothing(make_engine):
    queue = PlainQueue()
    engine = make_engine(queue=queue)
    for call in (lambda: engine.call(ResultsAdd, 1, 2), lambda: engine.result("x"),
                 lambda: asyncio.run(engine.aresult("x")),
                 lambda: asyncio.run(engine.acall(ResultsAdd, 1, 2))):
        with pytest.raises(Unsupported, match=r"PlainQueue has no result_ttl\(\)"):
            call()
    assert queue.items == []


def test_a_store_result_task_on_such_a_queue_is_warned_of_at_start(make_engine):
    engine = make_engine(queue=PlainQueue())
    engine.start()
    wait_for(lambda: "results unavailable" in main_log(engine), 10)
    assert "ResultsKept" in main_log(engine)
