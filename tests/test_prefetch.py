"""The ``prefetch`` option: messages held ahead of a free worker, on every built-in queue."""

from __future__ import annotations

import collections
import threading
from typing import Any

import pytest

from tempest import ConfigurationError, Task

from .conftest import BUILT_IN_KINDS, built_in_queue, main_log, wait_for
from .test_ack_and_dequeue import AckingQueue

_gate = threading.Event()
_runs: collections.Counter[str] = collections.Counter()
_runs_lock = threading.Lock()


class PfHold(Task):
    """Counts its run, then waits for the test's gate."""

    def process(self, tag: str) -> str:
        with _runs_lock:
            _runs[tag] += 1
        if not _gate.wait(30):
            raise AssertionError("the gate never opened")
        return tag


class PfAsync(Task):
    """A coroutine task, for engines that run both kinds."""

    async def process(self, tag: str) -> str:
        with _runs_lock:
            _runs[tag] += 1
        return tag


@pytest.fixture(autouse=True)
def _fresh() -> Any:
    _gate.clear()
    _runs.clear()
    yield
    _gate.set()  # never leave a worker waiting


def _ran() -> int:
    with _runs_lock:
        return sum(_runs.values())


@pytest.mark.parametrize("value", [-1, True, 1.5, "2"])
def test_prefetch_must_be_a_whole_number_of_at_least_0(make_engine, value):
    with pytest.raises(ConfigurationError, match="prefetch"):
        make_engine(prefetch=value)


def test_prefetch_needs_a_queue_with_dequeue_many(make_engine):
    class Plain:
        def enqueue(self, message: Any) -> None: ...

        def dequeue(self, timeout: float | None = None) -> Any:
            return None

    engine = make_engine(queue=Plain(), prefetch=2)
    with pytest.raises(ConfigurationError, match=r"prefetch = 2.*dequeue_many"):
        engine.start()


@pytest.mark.parametrize("kind", BUILT_IN_KINDS)
@pytest.mark.parametrize("prefetch", [0, 3])
def test_holds_exactly_prefetch_messages_ahead_of_busy_workers(make_engine, request,
                                                               tmp_path, kind, prefetch):
    """With both workers busy, *prefetch* more are taken (and shown as prefetched);
    the rest wait in the queue. Once the workers are free, each message runs once."""
    with built_in_queue(kind, request, tmp_path, "tempest_prefetch") as queue:
        engine = make_engine(queue=queue, threads=2, prefetch=prefetch)
        for i in range(10):
            engine.submit(PfHold, f"m{i}")
        engine.start()
        wait_for(lambda: _ran() == 2 and engine.stats()["prefetched"] == prefetch
                 and len(queue) == 8 - prefetch)
        stats = engine.stats()
        assert (stats["running"], stats["prefetched"], len(queue)) == (2, prefetch,
                                                                        8 - prefetch)
        _gate.set()
        wait_for(lambda: engine.stats()["processed"] == 10 and len(queue) == 0)
        assert engine.stop(timeout=10)
        assert dict(_runs) == {f"m{i}": 1 for i in range(10)}
        stats = engine.stats()
        assert (stats["succeeded"], stats["running"], stats["prefetched"]) == (10, 0, 0)
        assert f"prefetch={prefetch}" in main_log(engine)


@pytest.mark.parametrize("kind", BUILT_IN_KINDS)
def test_a_stop_gives_the_held_messages_back(make_engine, request, tmp_path, kind):
    """Stopped while it holds two messages ahead, the engine gives them back: the next
    run (a burst) runs them, and every message ran once."""
    with built_in_queue(kind, request, tmp_path, "tempest_prefetch_stop") as queue:
        engine = make_engine(queue=queue, threads=1, prefetch=2)
        for i in range(5):
            engine.submit(PfHold, f"s{i}")
        engine.start()
        wait_for(lambda: _ran() == 1 and engine.stats()["prefetched"] == 2)
        stopped = threading.Thread(target=engine.stop, kwargs={"timeout": 20})
        stopped.start()
        wait_for(lambda: "given back" in main_log(engine))
        _gate.set()
        stopped.join(20)
        assert engine.stats()["processed"] == 1
        assert len(queue) == 4
        assert main_log(engine).count("given back") == 2
        engine.run(burst=True)
        assert dict(_runs) == {f"s{i}": 1 for i in range(5)}
        assert len(queue) == 0


@pytest.mark.parametrize("kind", BUILT_IN_KINDS)
def test_burst_with_prefetch_drains_everything_once(make_engine, request, tmp_path, kind):
    _gate.set()
    with built_in_queue(kind, request, tmp_path, "tempest_prefetch_burst") as queue:
        engine = make_engine(queue=queue, threads=3, prefetch=4)
        for i in range(200):
            engine.submit(PfHold, f"b{i}")
        engine.run(burst=True)
        assert dict(_runs) == {f"b{i}": 1 for i in range(200)}
        stats = engine.stats()
        assert (stats["succeeded"], stats["running"], stats["prefetched"]) == (200, 0, 0)
        assert len(queue) == 0


def test_prefetch_with_coroutine_tasks_runs_both_kinds(make_engine):
    """Coroutine messages taken ahead start on the loop; thread ones are held."""
    engine = make_engine(threads=1, prefetch=2)
    engine.submit(PfHold, "t0")
    for i in range(5):
        engine.submit(PfAsync, f"a{i}")
    for i in range(1, 4):
        engine.submit(PfHold, f"t{i}")
    engine.start()
    # The worker runs t0; the coroutines run meanwhile; two thread tasks are held.
    wait_for(lambda: _ran() == 6 and engine.stats()["prefetched"] == 2)
    _gate.set()
    wait_for(lambda: engine.stats()["processed"] == 9)
    assert engine.stop(timeout=10)
    assert dict(_runs) == {**{f"a{i}": 1 for i in range(5)}, **{f"t{i}": 1 for i in range(4)}}


class AcksThenTakes(AckingQueue):
    """AckingQueue without ack_and_dequeue: the prefetcher acks, then takes."""

    ack_and_dequeue = None  # type: ignore[assignment]


@pytest.mark.parametrize("queue_class", [AckingQueue, AcksThenTakes])
def test_every_ack_is_sent_before_its_message_counts_as_processed(make_engine, queue_class):
    """Acks the workers hand on go out with the prefetcher's takes (ack_and_dequeue, or
    acks then dequeue_many); a message counts as processed only once its ack is sent,
    and none is left unsent."""
    _gate.set()
    queue = queue_class()
    engine = make_engine(queue=queue, threads=4, prefetch=4)
    queue.engine = engine
    for i in range(300):
        engine.submit(PfHold, f"k{i}", task_id=f"k{i}")
    engine.run(burst=True)
    assert sorted(queue.acked) == sorted(f"k{i}" for i in range(300))
    assert queue.leased == {}
    # Each ack happened before its message was counted: never more processed than acked.
    assert all(seen < n for n, seen in enumerate(queue.processed_at_ack, start=1))
    assert engine.stats()["processed"] == 300
