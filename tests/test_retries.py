"""Retries, backoff and the failed store, through a running engine on all four queues."""

from __future__ import annotations

import itertools
import re
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tempest import ConfigurationError, Engine, Retry, Task, TaskTimeout, Unsupported
from tempest.retries import JITTER, backoff

from .conftest import BUILT_IN_KINDS, built_in_queue, main_log, task_log, wait_for

KINDS = BUILT_IN_KINDS


@pytest.fixture(params=KINDS)
def queue(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """A fresh queue of each built-in kind; its storage is removed afterwards."""
    with built_in_queue(request.param, request, tmp_path,
                        f"retries_{uuid.uuid4().hex[:10]}") as made:
        yield made


class Journal:
    """What tasks and callbacks saw, in order, thread-safely."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[tuple[Any, ...]] = []

    def add(self, *event: Any) -> None:
        with self.lock:
            self.events.append((time.monotonic(), *event))

    def of(self, kind: str) -> list[tuple[Any, ...]]:
        with self.lock:
            return [e[1:] for e in self.events if e[1] == kind]

    def times(self, kind: str) -> list[float]:
        with self.lock:
            return [e[0] for e in self.events if e[1] == kind]


journal = Journal()


@pytest.fixture(autouse=True)
def _fresh_journal() -> Iterator[None]:
    global journal
    journal = Journal()
    yield


class Flaky(Task):
    """Fails (ValueError) until the attempt given, then returns the attempt."""

    class configure:
        retries = 3
        retry_delay = 0.05

    def process(self, succeed_on: int) -> int:
        journal.add("run", self.task_id, self.attempt)
        if self.attempt < succeed_on:
            raise ValueError(f"attempt {self.attempt} fails")
        return self.attempt

    def after_retry(self, exc: BaseException, delay: float) -> None:
        journal.add("retry", self.task_id, self.attempt, type(exc).__name__, delay)

    def after_failure(self, exc: BaseException) -> None:
        journal.add("failure", self.task_id, self.attempt)

    def after_success(self, result: Any) -> None:
        journal.add("success", self.task_id, self.attempt, result)


class Raiser(Task):
    """Raises the exception class named by its argument, every attempt."""

    class configure:
        retries = 2
        retry_delay = 0.05
        retry_on = (ConnectionError,)

    def process(self, kind: str) -> None:
        journal.add("run", self.task_id, self.attempt)
        raise {"connection": ConnectionError, "value": ValueError}[kind](f"{kind} error")


class Paced(Task):
    """Always fails; its backoff is measured."""

    class configure:
        retries = 3
        retry_delay = 0.1
        retry_max_delay = 0.3

    def process(self) -> None:
        journal.add("run", self.task_id, self.attempt)
        raise ValueError("again")


class Asker(Task):
    """raise Retry(delay=...) on every attempt."""

    class configure:
        retries = 1

    def process(self, delay: float) -> None:
        journal.add("run", self.task_id, self.attempt)
        raise Retry(delay=delay)


class Slowpoke(Task):
    """Outruns its timeout on the first attempt, succeeds on the second."""

    class configure:
        timeout = 0.2
        retries = 1
        retry_delay = 0.05

    def process(self) -> str:
        journal.add("run", self.task_id, self.attempt)
        if self.attempt == 1:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # interruptible: TaskTimeout lands here
                time.sleep(0.01)
        return "done"

    def after_timeout(self) -> None:
        journal.add("timeout", self.task_id, self.attempt)


class Hopeless(Task):
    """Always outruns its timeout; no retries."""

    class configure:
        timeout = 0.1

    def process(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            time.sleep(0.01)


class Failing(Task):
    """Always fails, no retries: straight to the failed store."""

    def process(self, n: int) -> None:
        raise RuntimeError(f"failure {n}")


class Forgotten(Task):
    """Always fails, and is kept out of the failed store."""

    class configure:
        keep_failed = False

    def process(self) -> None:
        raise RuntimeError("not kept")


def _stats_settle(engine: type[Engine], **expected: int) -> None:
    """Wait until every counter in *expected* has its value."""
    wait_for(lambda: all(engine.stats()[k] == v for k, v in expected.items()), 30)


def test_a_failing_task_is_retried_until_it_succeeds(queue: Any, make_engine: Any) -> None:
    """Two failed attempts, then success: one id, attempts 1-2-3, after_retry twice."""
    engine = make_engine(queue=queue)
    engine.start()
    task_id = engine.submit(Flaky, 3)
    wait_for(lambda: journal.of("success"), 30)
    assert journal.of("run") == [("run", task_id, 1), ("run", task_id, 2), ("run", task_id, 3)]
    assert [e[2] for e in journal.of("retry")] == [1, 2]
    assert all(e[3] == "ValueError" for e in journal.of("retry"))
    assert journal.of("success") == [("success", task_id, 3, 3)]
    assert journal.of("failure") == []
    _stats_settle(engine, processed=3, retried=2, succeeded=1, failed=0)
    log = main_log(engine)
    assert re.search(rf"task_id={task_id} task=Flaky outcome=failure .*attempt=1 "
                     rf"retry_in=0\.0\d+", log)
    assert re.search(rf"task_id={task_id} task=Flaky outcome=failure .*attempt=2 "
                     rf"retry_in=0\.\d+", log)
    assert re.search(rf"task_id={task_id} task=Flaky outcome=success duration=\S+ attempt=3",
                     log)
    story = [line for line in task_log(engine).splitlines() if line.startswith(task_id)]
    assert sum("failed, will retry" in line for line in story) == 2
    assert sum("ValueError: attempt 1 fails" in line for line in story) >= 1
    assert engine.failed_count() == 0


def test_the_last_attempt_goes_to_the_failed_store(queue: Any, make_engine: Any) -> None:
    """retries exhausted: after_failure once, an entry with attempts and traceback."""
    engine = make_engine(queue=queue)
    engine.start()
    before = time.time()
    task_id = engine.submit(Flaky, 99)
    wait_for(lambda: journal.of("failure"), 30)
    assert [e[2] for e in journal.of("run")] == [1, 2, 3, 4]
    assert journal.of("failure") == [("failure", task_id, 4)]
    _stats_settle(engine, processed=4, retried=3, failed=1)
    wait_for(lambda: engine.failed_count() == 1, 10)
    entry = engine.failed_task(task_id)
    assert entry["task"] == "Flaky" and entry["args"] == [99]
    assert entry["attempts"] == 4 and entry["error_type"] == "ValueError"
    assert entry["error"] == "attempt 4 fails"
    assert 'raise ValueError(f"attempt {self.attempt} fails")' in entry["traceback"]
    assert before - 1 <= entry["first_failed_at"] < entry["last_failed_at"] <= time.time() + 1
    assert engine.failed() == [entry]
    assert engine.stats()["failed_stored"] == 1
    assert re.search(rf"task_id={task_id} task=Flaky outcome=failure .*attempt=4 error=",
                     main_log(engine))


def test_backoff_delays_grow_within_their_jitter_and_cap(queue: Any, make_engine: Any
                                                        ) -> None:
    """retry_delay 0.1, cap 0.3: retry_in is 0.1-0.15, then 0.2-0.3, then 0.3; the
    attempts start no sooner than that after the one before."""
    engine = make_engine(queue=queue)
    engine.start()
    task_id = engine.submit(Paced)
    wait_for(lambda: len(journal.of("run")) == 4, 30)
    wait_for(lambda: engine.stats()["failed"] == 1, 10)
    delays = [float(d) for d in re.findall(rf"task_id={task_id} .*retry_in=([\d.]+)",
                                           main_log(engine))]
    assert len(delays) == 3
    assert 0.1 <= delays[0] <= 0.1 * JITTER + 0.001
    assert 0.2 <= delays[1] <= 0.3 + 0.001
    assert delays[2] == 0.3  # 0.4 to 0.6, capped
    starts = journal.times("run")
    for gap, delay in zip([b - a for a, b in itertools.pairwise(starts)], delays, strict=True):
        assert gap >= delay - 0.02, (gap, delay)  # never early (clocks: a few ms)
        assert gap < delay + 5  # generous: a busy machine


def test_retry_on_picks_the_failures_that_are_retried(queue: Any, make_engine: Any) -> None:
    """retry_on = (ConnectionError,): a ValueError is final at once."""
    engine = make_engine(queue=queue)
    engine.start()
    retried = engine.submit(Raiser, "connection")
    final = engine.submit(Raiser, "value")
    _stats_settle(engine, failed=2)
    runs = journal.of("run")
    assert [a for _, t, a in runs if t == retried] == [1, 2, 3]
    assert [a for _, t, a in runs if t == final] == [1]
    assert engine.failed_task(final)["attempts"] == 1
    assert engine.failed_task(retried)["error_type"] == "ConnectionError"


def test_raise_retry_asks_for_a_retry_with_its_delay(queue: Any, make_engine: Any) -> None:
    """Retry(delay=) is retried whatever retry_on says, after that delay; then final."""
    engine = make_engine(queue=queue)
    engine.start()
    task_id = engine.submit(Asker, 0.2)
    _stats_settle(engine, failed=1, retried=1)
    assert [a for _, _, a in journal.of("run")] == [1, 2]
    starts = journal.times("run")
    assert starts[1] - starts[0] >= 0.18
    assert f"task_id={task_id} task=Asker outcome=failure" in main_log(engine)
    assert "retry_in=0.2 " in main_log(engine)
    entry = engine.failed_task(task_id)
    assert entry["error_type"] == "Retry" and entry["attempts"] == 2


def test_a_timeout_is_retried_and_after_timeout_waits_for_the_last(queue: Any,
                                                                   make_engine: Any) -> None:
    """A timed-out attempt with retries left: logged with retry_in, then run again."""
    engine = make_engine(queue=queue)
    engine.start()
    task_id = engine.submit(Slowpoke)
    _stats_settle(engine, succeeded=1, retried=1, timed_out=0)
    assert [a for _, _, a in journal.of("run")] == [1, 2]
    assert journal.of("timeout") == []
    assert re.search(rf"task_id={task_id} task=Slowpoke outcome=timeout .*attempt=1 "
                     rf"timeout=0\.2 retry_in=", main_log(engine))


def test_a_final_timeout_is_stored_with_where_it_was(queue: Any, make_engine: Any) -> None:
    """No retries left: the entry says TaskTimeout and shows the thread's stack."""
    engine = make_engine(queue=queue)
    engine.start()
    task_id = engine.submit(Hopeless)
    _stats_settle(engine, timed_out=1)
    wait_for(lambda: engine.failed_count() == 1, 10)
    entry = engine.failed_task(task_id)
    assert entry["error_type"] == "TaskTimeout" and "0.1s" in entry["error"]
    assert "Stack of the task's thread" in entry["traceback"]
    assert "time.sleep(0.01)" in entry["traceback"]


def test_keep_failed_false_keeps_a_task_out_of_the_store(queue: Any, make_engine: Any
                                                         ) -> None:
    """keep_failed = False: the failure is logged and acked, not stored."""
    engine = make_engine(queue=queue)
    engine.start()
    task_id = engine.submit(Forgotten)
    _stats_settle(engine, failed=1)
    assert f"task_id={task_id} task=Forgotten outcome=failure" in main_log(engine)
    assert engine.failed_count() == 0


def test_the_store_is_bounded_by_failed_max(queue: Any, make_engine: Any) -> None:
    """failed_max = 3: five failures keep the latest three; two dropped, counted."""
    engine = make_engine(queue=queue, failed_max=3, threads=1)
    ids = [engine.submit(Failing, n) for n in range(5)]
    engine.start()
    _stats_settle(engine, failed=5)
    assert engine.failed_count() == 3
    assert engine.stats()["failed_dropped"] == 2
    assert sorted(e["task_id"] for e in engine.failed()) == sorted(ids[2:])


def test_the_api_runs_again_and_forgets_failed_tasks(queue: Any, make_engine: Any) -> None:
    """retry_failed runs the task again under its id from attempt 1; delete and purge
    forget; an unknown id is a KeyError naming it."""
    engine = make_engine(queue=queue)
    ids = [engine.submit(Flaky, 99) for _ in range(4)]
    engine.start()
    _stats_settle(engine, failed=4)
    assert engine.failed_count() == 4
    before = len(journal.of("run"))
    engine.retry_failed(ids[0])
    _stats_settle(engine, failed=5)  # counted once the entry is stored
    again = journal.of("run")[before:]
    assert [(t, a) for _, t, a in again] == [(ids[0], a) for a in (1, 2, 3, 4)]
    engine.delete_failed(ids[1])
    assert engine.failed_count() == 3
    with pytest.raises(KeyError, match="no-such-id"):
        engine.retry_failed("no-such-id")
    with pytest.raises(KeyError, match=ids[1]):
        engine.delete_failed(ids[1])
    with pytest.raises(KeyError, match="nope"):
        engine.failed_task("nope")
    assert [e["task_id"] for e in engine.failed(limit=1)] == [ids[0]]  # the latest
    assert engine.purge_failed() == 3
    assert engine.failed() == [] and engine.failed_count() == 0
    assert engine.retry_failed_all() == 0


def test_retry_failed_all_runs_each_again(queue: Any, make_engine: Any) -> None:
    """Every entry back into the queue at once."""
    engine = make_engine(queue=queue)
    ids = [engine.submit(Failing, n) for n in range(3)]
    engine.start()
    _stats_settle(engine, failed=3)
    assert engine.retry_failed_all() == 3
    _stats_settle(engine, failed=6)
    assert sorted(e["task_id"] for e in engine.failed()) == sorted(ids)


# -- the policy, without an engine ----------------------------------------------------


def test_backoff_formula_bounds() -> None:
    """Doubling from the base, times 1 to 1.5, at most the cap; huge attempts are fine."""
    for attempt in range(1, 12):
        value = backoff(attempt, 1.0, 3600)
        low = min(3600, 2.0 ** (attempt - 1))
        assert low <= value <= min(3600, low * JITTER)
    assert backoff(10_000, 1.0, 3600) == 3600


class Chooser(Task):
    class configure:
        retries = 2
        retry_delay = staticmethod(lambda attempt, exc: attempt * 0.05)

    def process(self) -> None:
        journal.add("run", self.task_id, self.attempt)
        raise ValueError("x")


class BadChooser(Task):
    class configure:
        retries = 1
        retry_delay = staticmethod(lambda attempt, exc: "soon")

    def process(self) -> None:
        raise ValueError("x")


def test_a_retry_delay_callable_chooses_the_delay(make_engine: Any) -> None:
    """retry_delay(attempt, exc): its seconds are the delay; a bad answer is logged and
    the backoff formula used instead."""
    engine = make_engine()
    engine.start()
    chosen = engine.submit(Chooser)
    bad = engine.submit(BadChooser)
    _stats_settle(engine, failed=2)
    log = main_log(engine)
    assert [float(d) for d in re.findall(rf"task_id={chosen} .*retry_in=([\d.]+)", log)] \
        == [0.05, 0.1]
    assert re.search(rf"retry_delay failed .*task_id={bad}", log)
    assert "returned 'soon'" in log


@pytest.mark.parametrize("options, fragment", [
    ({"retries": -1}, "retries"),
    ({"retries": True}, "retries"),
    ({"retry_on": "ValueError"}, "retry_on"),
    ({"retry_on": ()}, "retry_on"),
    ({"retry_delay": -1}, "retry_delay"),
    ({"retry_max_delay": float("nan")}, "retry_max_delay"),
    ({"keep_failed": 1}, "keep_failed"),
])
def test_bad_retry_options_are_refused(options: dict[str, Any], fragment: str) -> None:
    """A wrong value in a Task's block fails at class creation, naming the option."""
    with pytest.raises(ConfigurationError, match=fragment):
        type("BadRetryTask", (Task,), {"configure": type("configure", (), options),
                                       "process": lambda self: None})


@pytest.mark.parametrize("delay, error", [(-1, ValueError), (float("inf"), ValueError),
                                          ("1", TypeError), (True, TypeError)])
def test_retry_refuses_a_bad_delay(delay: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="delay"):
        Retry(delay=delay)


class PlainQueue:
    """A user's queue with only enqueue and dequeue."""

    def __init__(self) -> None:
        self.items: list[Any] = []

    def enqueue(self, message: Any) -> None:
        self.items.append(message)

    def dequeue(self) -> Any:
        return self.items.pop(0) if self.items else None


def test_retries_on_a_queue_that_cannot_retry_refuse_to_start(make_engine: Any) -> None:
    """retries > 0 with a user's queue lacking attempts()/retry(): ConfigurationError at
    start, naming what is missing; the failed-store API is Unsupported."""
    engine = make_engine(queue=PlainQueue(), retries=2)
    with pytest.raises(ConfigurationError, match=r"attempts\(\) or retry\(\)"):
        engine.start()
    plain = make_engine(queue=PlainQueue())
    for call in (plain.failed, plain.failed_count, plain.retry_failed_all, plain.purge_failed,
                 lambda: plain.retry_failed("x"), lambda: plain.delete_failed("x"),
                 lambda: plain.failed_task("x")):
        with pytest.raises(Unsupported, match="PlainQueue"):
            call()


def test_a_failure_on_a_plain_queue_is_final_as_before(make_engine: Any) -> None:
    """retries = 0 (the default) on a user's queue: a failure is logged, nothing else."""
    engine = make_engine(queue=PlainQueue())
    engine.start()
    task_id = engine.submit(Failing, 1)
    _stats_settle(engine, failed=1)
    assert re.search(rf"task_id={task_id} task=Failing outcome=failure .*attempt=1",
                     main_log(engine))
    assert "retries unavailable" in main_log(engine)  # Flaky & co. are registered


def test_timeout_retry_passes_a_task_timeout_to_after_retry(make_engine: Any) -> None:
    """after_retry gets the TaskTimeout of a timed-out attempt."""
    seen: list[Any] = []

    def engine_wide(task: Task, exc: BaseException, delay: float) -> None:
        seen.append((task.task_id, type(exc), delay))

    engine = make_engine(after_retry=engine_wide)
    engine.start()
    task_id = engine.submit(Slowpoke)
    _stats_settle(engine, succeeded=1)
    assert len(seen) == 1 and seen[0][0] == task_id and seen[0][1] is TaskTimeout
