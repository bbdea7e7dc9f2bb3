"""The engine's life cycle: start/stop/run, burst, stats, dispatch, queues, callbacks."""

from __future__ import annotations

import re
import signal
import threading
import time
import uuid
from typing import Any

import pytest

import tempest
from tempest import Task
from tempest.queues import MemoryQueue

from .conftest import main_log, wait_for

_SHARED: dict[str, Any] = {}


def share(obj: Any) -> str:
    """Hand *obj* to a task: its key travels in the (JSON) message."""
    key = uuid.uuid4().hex
    _SHARED[key] = obj
    return key


@pytest.fixture(autouse=True)
def _release_held(make_engine: Any) -> Any:
    """After each test (before its engines are stopped), release every held task."""
    yield
    for obj in _SHARED.values():
        if isinstance(obj, tuple) and isinstance(obj[-1], threading.Event):
            obj[-1].set()
    _SHARED.clear()


def pause(seconds: float) -> None:
    """Let time pass on purpose (an idle period being measured)."""
    threading.Event().wait(seconds)


def handlers() -> tuple[Any, ...]:
    return tuple(signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP))


# -- tasks ---------------------------------------------------------------------------


class EngAdd(Task):
    def process(self, a: int, b: int) -> int:
        return a + b


class EngHold(Task):
    """Counts itself in, then blocks until the test releases it."""

    def process(self, key: str) -> None:
        started, release = _SHARED[key]
        started.release()
        assert release.wait(10)


class EngChain(Task):
    def process(self, remaining: int) -> int:
        if remaining:
            self.engine.submit(EngChain, remaining - 1)
        return remaining


class EngStopper(Task):
    def process(self, key: str) -> None:
        _SHARED[key].append(self.engine.stop())


class EngBarrier(Task):
    def process(self, key: str) -> None:
        _SHARED[key].wait()


class EngCbOk(Task):
    def process(self, key: str, value: int) -> int:
        return value * 2

    def after_success(self, result: Any) -> None:
        _SHARED[self.args[0]].append(("task", "success", result))


class EngCbFail(Task):
    def process(self, key: str) -> None:
        raise LookupError("no such thing")

    def after_failure(self, exc: BaseException) -> None:
        _SHARED[self.args[0]].append(("task", "failure", exc))


class EngCbSlow(Task):
    class configure:
        timeout = 0.2

    def process(self, key: str) -> None:
        never = threading.Event()
        for _ in range(500):  # wakes every 10 ms, so TaskTimeout can be raised
            never.wait(0.01)

    def after_timeout(self) -> None:
        _SHARED[self.args[0]].append(("task", "timeout", None))


# -- queues --------------------------------------------------------------------------


class ListQueue:
    """A plain list-based queue: dequeue() has no timeout and never blocks."""

    def __init__(self, failures: float = 0) -> None:
        self.items: list[Any] = []
        self.lock = threading.Lock()
        self.failures = failures
        self.calls = 0

    def enqueue(self, message: Any) -> None:
        with self.lock:
            self.items.append(message)

    def dequeue(self) -> Any:
        with self.lock:
            self.calls += 1
            if self.calls <= self.failures:
                raise ConnectionError(f"queue server unreachable (call {self.calls})")
            return self.items.pop(0) if self.items else None

    def __len__(self) -> int:
        with self.lock:
            return len(self.items)


def hold(engine: Any, count: int) -> tuple[threading.Semaphore, threading.Event, list[str]]:
    """Submit *count* EngHold tasks; returns (started semaphore, release event, ids)."""
    started, release = threading.Semaphore(0), threading.Event()
    key = share((started, release))
    return started, release, [engine.submit(EngHold, key) for _ in range(count)]


# -- start / stop / run ----------------------------------------------------------------


def test_start_returns_at_once_and_processes_in_background(make_engine):
    """start() returns immediately; tasks submitted afterwards are processed in the background."""
    engine = make_engine()
    began = time.monotonic()
    engine.start()
    assert time.monotonic() - began < 1.0
    for i in range(5):
        engine.submit(EngAdd, i, i)
    wait_for(lambda: engine.stats()["succeeded"] == 5, 5)
    assert engine.stop() is True
    assert engine._state.control is None


def test_stop_with_timeout_returns_false_while_a_task_still_runs(make_engine):
    """stop(timeout=...) is False while a task outlives it, True once the task is released."""
    engine = make_engine()
    started, release, _ = hold(engine, 1)
    engine.start()
    assert started.acquire(timeout=5)
    began = time.monotonic()
    assert engine.stop(timeout=0.3) is False
    assert 0.25 <= time.monotonic() - began < 2
    release.set()
    assert engine.stop(timeout=5) is True
    assert engine.stats()["succeeded"] == 1


def test_stop_never_started_is_true(make_engine):
    """stop() on an engine that never ran returns True at once."""
    engine = make_engine()
    assert engine.stop() is True
    assert engine.stop(timeout=0) is True


def test_start_twice_is_an_error(make_engine):
    """A second start() while running raises TempestError; so does run()."""
    engine = make_engine()
    engine.start()
    with pytest.raises(tempest.TempestError):
        engine.start()
    with pytest.raises(tempest.TempestError):
        engine.run(burst=True)
    assert engine.stop(timeout=5)


def test_restart_after_stop_resets_stats(make_engine):
    """After stop, start() works again and the new run counts from zero."""
    engine = make_engine()
    engine.start()
    for i in range(3):
        engine.submit(EngAdd, i, 1)
    wait_for(lambda: engine.stats()["processed"] == 3, 5)
    assert engine.stop(timeout=5)
    engine.start()
    assert engine.stats()["processed"] == 0
    engine.submit(EngAdd, 1, 1)
    wait_for(lambda: engine.stats()["processed"] == 1, 5)
    assert engine.stop(timeout=5)
    assert engine.stats()["processed"] == 1
    assert main_log(engine).count(" started ") == 2


def test_start_installs_no_signal_handlers(make_engine):
    """start() leaves SIGTERM/SIGINT/SIGHUP handlers and the wakeup fd as they were."""
    before = handlers()
    fd = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(fd)
    engine = make_engine(report_every=0.05)
    engine.start()
    wait_for(lambda: " stats " in main_log(engine), 5)  # the control loop is running
    assert handlers() == before
    during = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(fd)
    assert during == fd
    assert engine.stop(timeout=5)
    assert handlers() == before


def test_run_in_a_non_main_thread_installs_no_signal_handlers(make_engine):
    """run() called from another thread leaves the signal handlers alone."""
    before = handlers()
    engine = make_engine(report_every=0.05)
    errors: list[BaseException] = []

    def runner() -> None:
        try:
            engine.run()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=runner)
    thread.start()
    try:
        # (main_log() only once the run's logs are open: run() sets them up first)
        wait_for(lambda: engine._state.control is not None
                 and engine._state.control.runtime.logs is not None, 5)
        wait_for(lambda: " stats " in main_log(engine), 5)  # the control loop is running
        assert handlers() == before
        engine.submit(EngAdd, 2, 3)
        wait_for(lambda: engine.stats()["succeeded"] == 1, 5)
    finally:
        assert engine.stop(timeout=5) is True
        thread.join(5)
    assert not thread.is_alive() and not errors
    assert handlers() == before
    engine.start()  # the stopped run() is forgotten: starting again works
    assert engine.stop(timeout=5)


# -- burst -----------------------------------------------------------------------------


@pytest.mark.parametrize("queue_type", [MemoryQueue, ListQueue])
def test_burst_waits_for_follow_up_tasks(make_engine, queue_type):
    """run(burst=True) returns only after a chain of 50 follow-up tasks was all processed."""
    queue = queue_type()
    engine = make_engine(queue=queue)
    engine.submit(EngChain, 50)
    engine.run(burst=True)
    stats = engine.stats()
    assert stats["processed"] == stats["succeeded"] == 51
    assert stats["running"] == 0 and len(queue) == 0
    assert main_log(engine).count("task=EngChain outcome=success") == 51


def test_burst_on_empty_queue_returns(make_engine):
    """run(burst=True) on an empty queue returns promptly."""
    engine = make_engine()
    began = time.monotonic()
    engine.run(burst=True)
    assert time.monotonic() - began < 2
    assert engine.stats()["processed"] == 0


# -- stop from inside ------------------------------------------------------------------


def test_stop_from_inside_a_started_engine_task(make_engine):
    """stop() called in a task only requests the stop; the engine then stops without deadlock."""
    engine = make_engine()
    results: list[bool] = []
    engine.submit(EngStopper, share(results))
    engine.start()
    wait_for(lambda: engine._state.control is None, 5)
    assert results == [False]
    assert engine.stop(timeout=5) is True
    stats = engine.stats()
    assert stats["succeeded"] == 1 and stats["running"] == 0


def test_stop_from_inside_a_run_task_ends_run(make_engine):
    """A task calling stop() makes a blocking run() return."""
    engine = make_engine()
    results: list[bool] = []
    engine.submit(EngStopper, share(results))
    thread = threading.Thread(target=engine.run)
    thread.start()
    thread.join(5)
    assert not thread.is_alive()
    assert results == [False]
    assert engine.stats()["succeeded"] == 1
    assert "reason=\"stop() called\"" in main_log(engine)


# -- stats -------------------------------------------------------------------------------

_KEYS = {"processed", "succeeded", "failed", "timed_out", "running", "prefetched", "threads",
         "abandoned",
         "uptime", "queued", "rejected"}


def test_stats_never_started(make_engine):
    """stats() works on an engine that never ran: zeros, threads and queued."""
    engine = make_engine(threads=3)
    engine.submit(EngAdd, 1, 2)
    stats = engine.stats()
    assert stats.keys() >= _KEYS
    assert stats["threads"] == 3 and stats["queued"] == 1
    assert stats["processed"] == stats["running"] == 0 and stats["uptime"] == 0


def test_stats_running_counts_tasks_in_progress_and_survive_stop(make_engine):
    """running counts held tasks; after stop, stats keep the last run's counts."""
    engine = make_engine(threads=2)
    started, release, _ = hold(engine, 3)
    engine.submit(EngCbFail, share([]))
    engine.start()
    assert started.acquire(timeout=5) and started.acquire(timeout=5)
    stats = engine.stats()
    assert stats.keys() >= _KEYS
    assert stats["running"] == 2 and stats["queued"] == 2 and stats["processed"] == 0
    assert stats["threads"] == 2 and stats["uptime"] >= 0
    release.set()
    wait_for(lambda: engine.stats()["processed"] == 4, 5)
    assert engine.stop(timeout=5)
    stats = engine.stats()
    assert (stats["processed"], stats["succeeded"], stats["failed"]) == (4, 3, 1)
    assert stats["running"] == 0 and stats["timed_out"] == 0 and stats["abandoned"] == 0
    assert stats["queued"] == 0
    pause(0.05)
    assert engine.stats()["uptime"] == stats["uptime"]  # a stopped engine's uptime stays put


# -- dispatch ------------------------------------------------------------------------------


def test_no_prefetch_messages_stay_in_the_queue(make_engine):
    """With 2 threads busy, only 2 of 10 messages are dequeued: 8 stay in the queue."""
    queue = MemoryQueue()
    engine = make_engine(threads=2, queue=queue)
    started, release, _ = hold(engine, 10)
    engine.start()
    assert started.acquire(timeout=5) and started.acquire(timeout=5)
    pause(0.3)  # give an eager dispatcher time to take more
    assert len(queue) == 8
    assert engine.stats()["running"] == 2
    assert not started.acquire(timeout=0)
    release.set()
    wait_for(lambda: engine.stats()["processed"] == 10, 5)
    assert engine.stop(timeout=5)


def test_four_threads_run_four_tasks_at_once(make_engine):
    """threads=4 runs 4 tasks concurrently: they meet the test thread at a Barrier(5)."""
    engine = make_engine(threads=4)
    barrier = threading.Barrier(5, timeout=5)
    key = share(barrier)
    for _ in range(4):
        engine.submit(EngBarrier, key)
    engine.start()
    barrier.wait()
    wait_for(lambda: engine.stats()["succeeded"] == 4, 5)
    assert engine.stop(timeout=5)


@pytest.mark.parametrize("queue_type", [MemoryQueue, ListQueue])
def test_idle_engine_does_not_spin(make_engine, queue_type):
    """An idle engine (blocking or non-blocking dequeue) uses little CPU."""
    engine = make_engine(queue=queue_type(), threads=4)
    engine.start()
    engine.submit(EngAdd, 1, 1)
    wait_for(lambda: engine.stats()["processed"] == 1, 5)
    cpu = time.process_time()
    pause(1.0)
    used = time.process_time() - cpu
    assert used < 0.2, f"idle engine used {used:.3f}s CPU in 1s"
    engine.submit(EngAdd, 2, 2)  # and it still answers
    wait_for(lambda: engine.stats()["processed"] == 2, 5)
    assert engine.stop(timeout=5)


def test_plain_list_queue_works(make_engine):
    """A queue whose dequeue() takes no timeout processes messages, including after idling."""
    queue = ListQueue()
    engine = make_engine(queue=queue)
    engine.start()
    pause(0.2)  # let the poll back off
    ids = [engine.submit(EngAdd, i, 0) for i in range(5)]
    wait_for(lambda: engine.stats()["succeeded"] == 5, 5)
    assert engine.stop(timeout=5)
    text = main_log(engine)
    assert all(f"task_id={i} task=EngAdd outcome=success" in text for i in ids)


def test_failing_dequeue_is_logged_retried_and_recovers(make_engine):
    """dequeue errors are logged with attempt counts; the engine goes on and processes later."""
    queue = ListQueue(failures=3)
    engine = make_engine(queue=queue)
    for i in range(3):
        engine.submit(EngAdd, i, i)
    engine.start()
    wait_for(lambda: engine.stats()["succeeded"] == 3, 10)
    assert engine.stop(timeout=5)
    failed = [line for line in main_log(engine).splitlines() if " dequeue failed " in line]
    assert [re.search(r" attempt=(\d+)", line)[1] for line in failed] == ["1", "2", "3"]
    assert all("ConnectionError: queue server unreachable" in line for line in failed)
    assert "dequeue recovered attempts=3" in main_log(engine)


def test_stop_during_dequeue_error_backoff_is_prompt(make_engine):
    """stop() while the engine backs off after dequeue errors returns quickly."""
    engine = make_engine(queue=ListQueue(failures=float("inf")))
    engine.start()
    wait_for(lambda: " attempt=5 " in main_log(engine), 5)  # now backing off 1.6 s
    began = time.monotonic()
    assert engine.stop(timeout=5) is True
    assert time.monotonic() - began < 1.0


# -- engine-wide callbacks -------------------------------------------------------------------


def test_engine_callbacks_get_the_right_arguments_after_the_tasks_own(make_engine):
    """Engine-wide after_success/after_failure/after_timeout run after the task's own."""
    calls: list[tuple[Any, ...]] = []
    key = share(calls)
    engine = make_engine(
        after_success=lambda task, result: calls.append(("engine", "success", task, result)),
        after_failure=lambda task, exc: calls.append(("engine", "failure", task, exc)),
        after_timeout=lambda task: calls.append(("engine", "timeout", task)),
    )
    ok = engine.submit(EngCbOk, key, 21)
    engine.run(burst=True)
    bad = engine.submit(EngCbFail, key)
    engine.run(burst=True)
    slow = engine.submit(EngCbSlow, key)
    engine.run(burst=True)

    assert [c[:2] for c in calls] == [
        ("task", "success"), ("engine", "success"),
        ("task", "failure"), ("engine", "failure"),
        ("task", "timeout"), ("engine", "timeout")]
    assert calls[0][2] == 42 and calls[1][3] == 42
    assert isinstance(calls[1][2], EngCbOk) and calls[1][2].task_id == ok
    assert calls[1][2].args == (key, 21) and calls[1][2].engine is engine
    assert isinstance(calls[3][2], EngCbFail) and calls[3][2].task_id == bad
    assert isinstance(calls[3][3], LookupError) and calls[3][3] is calls[2][2]
    assert isinstance(calls[5][2], EngCbSlow) and calls[5][2].task_id == slow
    assert f"task_id={slow} task=EngCbSlow outcome=timeout" in main_log(engine)


def test_failing_engine_callback_is_logged_and_engine_goes_on(make_engine):
    """An engine-wide callback that raises is logged; later tasks still run."""
    def broken(task: Task, result: Any) -> None:
        raise RuntimeError("callback bug")

    engine = make_engine(after_success=broken)
    engine.submit(EngAdd, 1, 1)
    engine.submit(EngAdd, 2, 2)
    engine.run(burst=True)
    assert engine.stats()["succeeded"] == 2
    text = main_log(engine)
    assert text.count("callback failed") == 2 and "RuntimeError: callback bug" in text


# -- stop() from awkward places ----------------------------------------------------------


def test_start_right_after_stop_of_a_run_in_another_thread(make_engine):
    """Once stop() returned True, the run is forgotten: start() works at once."""
    engine = make_engine()
    thread = threading.Thread(target=engine.run)
    thread.start()
    try:
        wait_for(lambda: engine._state.control is not None
                 and engine._state.control.runtime.logs is not None, 5)
        assert engine.stop(timeout=5) is True
        engine.start()  # no "already running", though run() may not have returned yet
        assert engine.stop(timeout=5) is True
    finally:
        thread.join(5)
    assert not thread.is_alive()


@pytest.mark.parametrize("how", ["start", "run"])
def test_stop_from_after_initialize_does_not_deadlock(make_engine, how):
    """after_initialize runs in the starting thread: its stop() only requests the stop."""
    answers: list[bool] = []
    engine = make_engine(after_initialize=lambda eng: answers.append(eng.stop()))
    engine.submit(EngAdd, 1, 2)
    if how == "start":
        engine.start()
        assert engine.stop(timeout=5) is True
    else:
        thread = threading.Thread(target=engine.run)
        thread.start()
        thread.join(5)
        assert not thread.is_alive()
    assert answers == [False]
    assert 'reason="stop() called"' in main_log(engine)


# -- batches: dequeue_many -------------------------------------------------------------


class BatchQueue(MemoryQueue):
    """A MemoryQueue recording the counts dequeue_many is asked for."""

    def __init__(self, on_batch: Any = None) -> None:
        super().__init__()
        self.counts: list[int] = []
        self.on_batch = on_batch

    def dequeue_many(self, count: int, timeout: float | None = None) -> list[Any]:
        self.counts.append(count)
        messages = super().dequeue_many(count, timeout)
        if self.on_batch is not None and len(messages) > 1:
            self.on_batch()
        return messages


def test_batches_serve_waiting_workers_and_never_exceed_them(make_engine):
    """dequeue_many is asked for at most one message per worker; each runs exactly once."""
    queue = BatchQueue()
    engine = make_engine(queue=queue, threads=4)
    for i in range(2000):
        engine.submit(EngAdd, i, 1)
    engine.run(burst=True)
    stats = engine.stats()
    assert stats["succeeded"] == stats["processed"] == 2000 and len(queue) == 0
    assert max(queue.counts) <= 4
    assert any(count > 1 for count in queue.counts)  # workers did wait behind the leader


def test_stop_gives_back_what_was_taken_for_waiting_workers(make_engine):
    """A stop just after a batch came back: the messages not started go back to the queue."""
    engines: list[Any] = []
    batched = threading.Event()

    def on_batch() -> None:
        engines[0].stop(wait=False)
        batched.set()

    queue = BatchQueue(on_batch=on_batch)
    engine = make_engine(queue=queue, threads=4)
    engines.append(engine)
    for i in range(50):
        engine.submit(EngAdd, i, 1)
    engine.start()
    assert batched.wait(10)
    assert engine.stop(timeout=10)
    stats = engine.stats()
    assert stats["running"] == 0
    # Every message either ran or is back in the queue: none was lost.
    assert stats["processed"] + len(queue) == 50
    assert "given back" in main_log(engine)


class TimeoutRecordingQueue(MemoryQueue):
    """A MemoryQueue recording the timeout of every dequeue."""

    def __init__(self) -> None:
        super().__init__()
        self.timeouts: list[float | None] = []

    def dequeue(self, timeout: float | None = None) -> Any:
        self.timeouts.append(timeout)
        return super().dequeue(timeout)


def test_burst_never_waits_long_while_the_last_tasks_run(make_engine):
    """In burst mode the dispatcher waits briefly, so the run ends right after the last task."""
    from tempest.runtime import BURST_WAIT

    queue = TimeoutRecordingQueue()
    engine = make_engine(queue=queue, threads=2)
    release = threading.Event()
    engine.submit(EngHold, share((threading.Semaphore(0), release)))
    thread = threading.Thread(target=engine.run, kwargs={"burst": True})
    thread.start()
    wait_for(lambda: len(queue.timeouts) >= 5, 10)  # it polls while the task runs
    release.set()
    thread.join(10)
    assert not thread.is_alive()
    assert max(t for t in queue.timeouts if t is not None) <= BURST_WAIT
