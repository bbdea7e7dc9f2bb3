"""Coroutine tasks: ``async def process`` on the engine's event loop, beside thread tasks."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from typing import Any

import pytest

from tempest import ConfigurationError, Engine, Task, TaskFailed, TaskTimeout
from tempest.queues import MemoryQueue

from .conftest import main_log, task_log, wait_for

pytestmark = pytest.mark.timeout(60)

user_log = logging.getLogger("tests.coroutines")

seen: dict[str, Any] = {}
"""What the tasks below saw, by key (each test uses its own keys)."""


def note(key: str, value: Any) -> None:
    seen.setdefault(key, []).append(value)


class AEcho(Task):
    async def process(self, value: Any) -> Any:
        await asyncio.sleep(0)
        note("echo-thread", threading.current_thread().name)
        return value


class AFail(Task):
    async def process(self) -> None:
        await asyncio.sleep(0)
        raise ValueError("async failure")


class ASlow(Task):
    class configure:
        timeout = 0.2

    async def process(self, key: str) -> None:
        try:
            await asyncio.sleep(10)
        except TaskTimeout as exc:
            note(key, exc)
            raise


class ASwallow(Task):
    """Swallows its timeout; with *linger*, goes on running after it."""

    class configure:
        timeout = 0.2

    async def process(self, linger: float) -> str:
        try:
            await asyncio.sleep(10)
        except TaskTimeout:
            pass
        await asyncio.sleep(linger)
        note("swallow-ended", linger)
        return "swallowed"


class ACallbacks(Task):
    """Callbacks of its own, one async and one plain."""

    async def process(self, fail: bool) -> str:
        if fail:
            raise RuntimeError("asked to fail")
        return "ok"

    async def after_success(self, result: Any) -> None:
        await asyncio.sleep(0)
        note("callbacks", ("success", self.task_id, result))

    def after_failure(self, exc: BaseException) -> None:
        note("callbacks", ("failure", self.task_id, repr(exc)))


class AChatty(Task):
    """Logs its marker around awaits, so many of it interleave on the loop."""

    async def process(self, marker: str, rounds: int) -> None:
        for i in range(rounds):
            user_log.warning("marker=%s round=%d", marker, i)
            await asyncio.sleep(0.001)


class ACount(Task):
    """Counts how many of its kind run at once, until released."""

    running = 0
    peak = 0
    release: asyncio.Event | None = None

    async def process(self) -> None:
        cls = type(self)
        cls.running += 1
        cls.peak = max(cls.peak, cls.running)
        try:
            while not seen.get("count-release"):
                await asyncio.sleep(0.005)
        finally:
            cls.running -= 1


class ABlock(Task):
    async def process(self, seconds: float) -> None:
        time.sleep(seconds)  # blocking code in a coroutine: the loop is held


class ANap(Task):
    async def process(self, seconds: float) -> str:
        await asyncio.sleep(seconds)
        note("nap-done", self.task_id)
        return "rested"


class SyncEcho(Task):
    def process(self, value: Any) -> Any:
        note("sync-thread", threading.current_thread().name)
        return value


class AFlaky(Task):
    class configure:
        retries = 2
        retry_delay = 0.01

    async def process(self, key: str) -> int:
        note(key, self.attempt)
        if self.attempt < 2:
            raise ValueError("first attempt fails")
        return self.attempt


@pytest.fixture(autouse=True)
def _clear_seen() -> None:
    seen.clear()
    ACount.running = ACount.peak = 0


def outcomes(engine: type[Engine]) -> dict[str, str]:
    """task id -> outcome, from the main log."""
    return dict(re.findall(r"task ended task_id=(\S+) task=\S+ outcome=(\w+)",
                           main_log(engine)))


def finished(engine: type[Engine], count: int) -> None:
    wait_for(lambda: engine.stats()["processed"] >= count
             and engine.stats()["running"] == 0, 15)


def test_the_kind_of_a_task_is_known_at_class_creation():
    assert AEcho._is_async and not SyncEcho._is_async


def test_a_coroutine_task_succeeds_on_the_engine_loop(make_engine):
    engine = make_engine()
    engine.start()
    task_id = engine.submit(AEcho, {"a": 1})
    finished(engine, 1)
    assert outcomes(engine) == {task_id: "success"}
    assert seen["echo-thread"] == [f"tempest-loop:{engine.__name__}"]
    assert engine.stats()["succeeded"] == 1


def test_failure_and_its_callbacks_plain_and_async(make_engine):
    engine_seen: list[tuple[str, str]] = []

    async def engine_after_failure(task: Task, exc: BaseException) -> None:
        await asyncio.sleep(0)
        engine_seen.append((task.task_id, type(exc).__name__))

    engine = make_engine(after_failure=engine_after_failure)
    engine.start()
    ok, bad, plain = (engine.submit(ACallbacks, False), engine.submit(ACallbacks, True),
                      engine.submit(AFail))
    finished(engine, 3)
    assert outcomes(engine) == {ok: "success", bad: "failure", plain: "failure"}
    assert sorted(seen["callbacks"]) == sorted([
        ("success", ok, "ok"), ("failure", bad, "RuntimeError('asked to fail')")])
    assert sorted(engine_seen) == sorted([(bad, "RuntimeError"), (plain, "ValueError")])
    assert "async failure" in task_log(engine)


def test_a_timeout_is_a_task_timeout_inside_the_coroutine(make_engine):
    timeouts: list[str] = []
    engine = make_engine(after_timeout=lambda task: timeouts.append(task.task_id))
    engine.start()
    task_id = engine.submit(ASlow, "slow")
    finished(engine, 1)
    assert outcomes(engine) == {task_id: "timeout"}
    assert len(seen["slow"]) == 1 and isinstance(seen["slow"][0], TaskTimeout)
    assert timeouts == [task_id]
    stats = engine.stats()
    assert stats["timed_out"] == 1 and stats["swallowed"] == 0


def test_a_coroutine_that_swallows_its_timeout_is_logged_and_counted(make_engine):
    engine = make_engine()
    engine.start()
    task_id = engine.submit(ASwallow, 0.0)
    finished(engine, 1)
    wait_for(lambda: engine.stats()["swallowed"] == 1, 5)
    assert outcomes(engine) == {task_id: "timeout"}  # the outcome stays the timeout
    log = main_log(engine)
    assert re.search(rf"WARNING +coroutine swallowed its timeout task_id={task_id} "
                     rf".*state=\"ended after it\"", log), log


def test_one_still_running_after_the_grace_is_detached_and_its_slot_freed(make_engine):
    engine = make_engine(coroutines=1)
    engine.start()
    lingering = engine.submit(ASwallow, 3.0)  # runs on ~3 s after its timeout
    after = engine.submit(AEcho, "next")
    # The grace (1 s) passes: settled as timed out, the one slot free for the next.
    wait_for(lambda: outcomes(engine).get(after) == "success", 10)
    assert outcomes(engine)[lingering] == "timeout"
    assert "swallow-ended" not in seen
    assert engine.stats()["swallowed"] == 1
    assert re.search(r"coroutine swallowed its timeout .*still running 1s after it",
                     main_log(engine))
    wait_for(lambda: "swallow-ended" in seen, 10)  # it was left to run, not killed
    wait_for(lambda: "detached coroutine ended" in main_log(engine), 5)


def test_log_lines_of_interleaved_coroutines_go_to_their_own_task(make_engine):
    engine = make_engine(coroutines=50)
    ids = {engine.submit(AChatty, f"m{i}", 5): f"m{i}" for i in range(40)}
    engine.start()
    finished(engine, 40)
    lines = [line for line in task_log(engine).splitlines() if "marker=" in line]
    assert len(lines) == 40 * 5
    for line in lines:
        task_id, marker = line.split()[0], re.search(r"marker=(m\d+)", line).group(1)
        assert ids[task_id] == marker, line


def test_coroutines_bound_what_runs_at_once_and_nothing_is_prefetched(make_engine):
    queue = MemoryQueue()
    engine = make_engine(coroutines=3, queue=queue)
    engine.start()
    for _ in range(10):
        engine.submit(ACount)
    wait_for(lambda: ACount.running == 3, 10)
    # A message is dequeued only when it can start: the other seven wait in the queue.
    assert len(queue) == 7 and engine.stats()["running"] == 3
    seen["count-release"] = True
    finished(engine, 10)
    assert ACount.peak == 3


def test_a_mixed_engine_runs_both_kinds_from_one_queue(make_engine):
    engine = make_engine(threads=2, coroutines=10)
    engine.start()
    ids = [engine.submit(SyncEcho, i) if i % 2 else engine.submit(AEcho, i)
           for i in range(40)]
    finished(engine, 40)
    assert outcomes(engine) == dict.fromkeys(ids, "success")
    assert set(seen["sync-thread"]) <= {f"tempest-worker:{engine.__name__}"}
    assert set(seen["echo-thread"]) == {f"tempest-loop:{engine.__name__}"}
    assert len(seen["sync-thread"]) == len(seen["echo-thread"]) == 20


def test_retries_and_results_work_for_coroutines(make_engine):
    engine = make_engine()
    engine.start()
    assert engine.call(AFlaky, "flaky", timeout=10) == 2
    assert seen["flaky"] == [1, 2]
    with pytest.raises(TaskFailed) as failed:
        engine.call(AFail, timeout=10)
    assert failed.value.error_type == "ValueError"


def test_graceful_stop_drains_running_coroutines(make_engine):
    engine = make_engine(coroutines=20)
    engine.start()
    ids = [engine.submit(ANap, 0.3) for _ in range(10)]
    wait_for(lambda: engine.stats()["running"] == 10, 10)
    assert engine.stop(timeout=10)
    assert outcomes(engine) == dict.fromkeys(ids, "success")
    assert sorted(seen["nap-done"]) == sorted(ids)


def test_a_stop_past_shutdown_timeout_gives_the_coroutines_messages_back(make_engine):
    queue = MemoryQueue()
    engine = make_engine(coroutines=20, queue=queue, shutdown_timeout=0.2)
    engine.start()
    ids = [engine.submit(ANap, 30) for _ in range(3)]
    wait_for(lambda: engine.stats()["running"] == 3, 10)
    assert engine.stop(timeout=10)
    assert len(queue) == 3  # requeued, to run again
    assert sorted(message[0] for message in [queue.dequeue() for _ in ids]) == sorted(ids)
    assert main_log(engine).count("interrupted") == 3
    assert "nap-done" not in seen


def test_a_blocking_coroutine_is_named_in_a_warning(make_engine):
    engine = make_engine(loop_block_warning=0.05)
    engine.start()
    task_id = engine.submit(ABlock, 0.3)
    finished(engine, 1)
    log = main_log(engine)
    assert re.search(rf"WARNING +event loop blocked .*task_id={task_id} task=ABlock", log), log
    assert "test_coroutines.py" in re.search(r"event loop blocked .*", log).group(0)
    assert engine.stats()["loop_blocked"] == 1


def test_asubmit_enqueues_without_blocking_the_loop(make_engine):
    queue = MemoryQueue()
    engine = make_engine(queue=queue)

    async def produce() -> list[str]:
        return [await engine.asubmit(AEcho, i, priority=1) for i in range(3)]

    ids = asyncio.run(produce())
    assert [queue.dequeue()[0] for _ in ids] == ids


def test_acall_from_a_coroutine_waits_for_a_coroutine_task(make_engine):
    engine = make_engine()
    engine.start()

    async def ask() -> Any:
        return await engine.acall(AEcho, [1, "two"], timeout=10)

    assert asyncio.run(ask()) == [1, "two"]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "8"])
def test_bad_coroutines_option(bad, make_engine):
    with pytest.raises(ConfigurationError, match="coroutines"):
        make_engine(coroutines=bad)


@pytest.mark.parametrize("bad", [0, -0.1, "fast", float("nan")])
def test_bad_loop_block_warning_option(bad, make_engine):
    with pytest.raises(ConfigurationError, match="loop_block_warning"):
        make_engine(loop_block_warning=bad)


def test_a_thread_task_with_an_async_callback(make_engine):
    seen_ids: list[str] = []

    async def after_success(task: Task, result: Any) -> None:
        await asyncio.sleep(0)
        seen_ids.append(task.task_id)

    engine = make_engine(after_success=after_success)
    engine.start()
    task_id = engine.submit(SyncEcho, 1)
    finished(engine, 1)
    assert seen_ids == [task_id]


def test_a_burst_run_waits_for_the_coroutines_then_ends(make_engine):
    engine = make_engine(coroutines=10)
    ids = [engine.submit(ANap, 0.05) for _ in range(25)]
    done = threading.Event()

    def run() -> None:
        engine.run(burst=True)
        done.set()

    threading.Thread(target=run, daemon=True).start()
    assert done.wait(20)
    assert outcomes(engine) == dict.fromkeys(ids, "success")
    assert "reason=drained" in main_log(engine)
