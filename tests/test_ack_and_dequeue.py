"""Acks that travel with the worker's next dequeue (a queue with ``ack_and_dequeue``)."""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from typing import Any

from tempest import Task

from .conftest import main_log


class AdNoop(Task):
    def process(self, n):
        return n


class AdAsync(Task):
    """Registered here so that every test of this file runs with coroutine tasks
    registered too, as an application that has both kinds does."""

    async def process(self, n):
        return n


class AckingQueue:
    """A reliable in-memory queue with ``ack_and_dequeue``, recording every call.

    ``fail_combined``: that many ``ack_and_dequeue`` calls raise before doing anything.
    """

    def __init__(self, fail_combined: int = 0) -> None:
        self._cond = threading.Condition()
        self._ready: collections.deque[list[Any]] = collections.deque()
        self.leased: dict[str, list[Any]] = {}
        self.acked: list[str] = []
        self.combined = 0
        self.batches: list[int] = []  # acks per ack_and_dequeue call
        self.fail_combined = fail_combined
        self.processed_at_ack: list[int] = []
        self.engine: Any = None

    def enqueue(self, message: list[Any]) -> None:
        with self._cond:
            self._ready.append(list(message))
            self._cond.notify()

    def dequeue(self, timeout: float | None = None) -> Any:
        taken = self.dequeue_many(1, timeout)
        return taken[0] if taken else None

    def dequeue_many(self, count: int, timeout: float | None = None) -> list[Any]:
        with self._cond:
            if not self._ready and timeout:
                self._cond.wait(timeout)
            taken = []
            while self._ready and len(taken) < count:
                message = self._ready.popleft()
                self.leased[message[0]] = message
                taken.append(message)
            return taken

    def ack(self, message: Any) -> None:
        with self._cond:
            self.leased.pop(message[0])  # KeyError for a message not held
            self.acked.append(message[0])
            if self.engine is not None:
                self.processed_at_ack.append(self.engine.stats()["processed"])

    def ack_and_dequeue(self, messages: list[Any], count: int) -> list[Any]:
        with self._cond:
            if self.fail_combined:
                self.fail_combined -= 1
                raise ConnectionError("the server went away")
            self.combined += 1
            self.batches.append(len(messages))
        for message in messages:
            self.ack(message)
        return self.dequeue_many(count)

    def __len__(self) -> int:
        return len(self._ready)


def test_acks_go_with_the_next_dequeue_once_each_and_before_they_count(make_engine):
    queue = AckingQueue()
    engine = make_engine(threads=3, queue=queue)
    queue.engine = engine
    ids = [engine.submit(AdNoop, n) for n in range(300)]
    engine.run(burst=True)
    assert sorted(queue.acked) == sorted(ids)  # each acked exactly once
    assert queue.leased == {}
    assert queue.combined > 0  # the fast path was taken
    # No message was counted processed before its ack was stored.
    assert all(seen < len(ids) for seen in queue.processed_at_ack)
    stats = engine.stats()
    assert stats["processed"] == stats["succeeded"] == len(ids)
    assert stats["running"] == 0
    assert "worker crashed" not in main_log(engine)


def test_a_failed_combined_call_is_logged_and_the_engine_goes_on(make_engine):
    queue = AckingQueue(fail_combined=3)
    engine = make_engine(threads=1, queue=queue)
    ids = [engine.submit(AdNoop, n) for n in range(20)]
    engine.run(burst=True)
    main = main_log(engine)
    assert main.count("ack failed") == 3
    # The three whose acks failed are still leased (a real queue redelivers them
    # after the lease); every other was acked once, and all ran.
    assert len(queue.leased) == 3
    assert sorted(queue.acked + list(queue.leased)) == sorted(ids)
    assert engine.stats()["processed"] == len(ids)
    assert "worker crashed" not in main


def test_threads_and_coroutine_messages_mixed(make_engine):
    queue = AckingQueue()
    engine = make_engine(threads=2, queue=queue)
    ids = [engine.submit(AdNoop if n % 3 else AdAsync, n) for n in range(90)]
    engine.run(burst=True)
    assert sorted(queue.acked) == sorted(ids)
    assert queue.leased == {} and queue.combined > 0
    assert engine.stats()["processed"] == len(ids)
    assert "worker crashed" not in main_log(engine)


BARRIER = threading.Barrier(3, timeout=20)


class AdTogether(Task):
    """Three of these end together: each waits for the other two to start."""

    def process(self, n):
        BARRIER.wait()
        return n


class GatedQueue(AckingQueue):
    """Its first ``ack_and_dequeue`` is held until two acks were handed to the next
    leader meanwhile (or 20 s passed)."""

    def __init__(self) -> None:
        super().__init__()
        self.gated = threading.Event()
        self.handed_seen = 0

    def ack_and_dequeue(self, messages: list[Any], count: int) -> list[Any]:
        if not self.gated.is_set():
            self.gated.set()
            runtime = self.engine._state.control.runtime
            deadline = time.monotonic() + 20
            while len(runtime._handed) < 2 and time.monotonic() < deadline:
                time.sleep(0.001)  # bounded poll of the engine's own state
            self.handed_seen = len(runtime._handed)
        return super().ack_and_dequeue(messages, count)


def test_acks_handed_while_a_call_is_in_flight_go_together_in_the_next(make_engine):
    """Workers that end while the leader's call is in flight hand their acks to the
    next holder of the lock: one call then carries both, each acked once, and
    none is counted processed before its ack."""
    BARRIER.reset()
    queue = GatedQueue()
    engine = make_engine(threads=3, queue=queue)
    queue.engine = engine
    ids = [engine.submit(AdTogether, n) for n in range(3)]
    ids += [engine.submit(AdNoop, n) for n in range(3, 30)]
    engine.run(burst=True)
    assert queue.handed_seen == 2
    # The leader's own ack, then the two handed (and any handed since) in one call.
    assert queue.batches[0] == 1 and queue.batches[1] >= 2
    assert sorted(queue.acked) == sorted(ids) and queue.leased == {}
    assert all(seen < len(ids) for seen in queue.processed_at_ack)
    stats = engine.stats()
    assert stats["processed"] == stats["succeeded"] == len(ids) and stats["running"] == 0
    assert "worker crashed" not in main_log(engine)


class WaitingQueue(AckingQueue):
    """Notes whether each ack came while a dequeue waited on the empty queue."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = threading.Event()
        self.in_wait = False
        self.acked_in_wait: list[bool] = []

    def dequeue_many(self, count: int, timeout: float | None = None) -> list[Any]:
        with self._cond:
            if not self._ready and timeout:
                self.in_wait = True
                self.waiting.set()
                try:
                    self._cond.wait(timeout)
                finally:
                    self.in_wait = False
        return super().dequeue_many(count, None)

    def ack(self, message: Any) -> None:
        self.acked_in_wait.append(self.in_wait)
        super().ack(message)


WAITING: list[WaitingQueue] = []


class AdUntilWaiting(Task):
    def process(self):
        assert WAITING[0].waiting.wait(10)


def test_an_ack_is_sent_at_once_while_the_leader_waits_on_an_empty_queue(make_engine):
    """A worker that ends while the leader waits for a message does not hand its ack
    to it (the next call may be a wait away): it acks alone, during the wait."""
    queue = WaitingQueue()
    WAITING[:] = [queue]
    engine = make_engine(threads=2, queue=queue)
    task_id = engine.submit(AdUntilWaiting)
    engine.start()
    try:
        deadline = time.monotonic() + 10
        while not queue.acked and time.monotonic() < deadline:
            queue.waiting.wait(0.05)  # bounded: the ack is looked for in the loop
        assert queue.acked == [task_id]
        assert queue.acked_in_wait == [True] and queue.combined == 0
    finally:
        engine.stop(timeout=10)


GATES = {name: threading.Event() for name in ("q1", "q2", "slow", "slow_started")}


class AdGated(Task):
    def process(self, gate):
        assert GATES[gate].wait(20)


class AdSlowAsync(Task):
    async def process(self):
        GATES["slow_started"].set()
        for _ in range(2000):  # bounded: 20 s
            if GATES["slow"].is_set():
                return
            await asyncio.sleep(0.01)


def test_an_ack_is_sent_at_once_while_every_coroutine_slot_is_busy(make_engine):
    """A leader waiting for a free coroutine slot makes no queue call: a worker that
    ends meanwhile acks alone instead of handing its ack to it."""
    for gate in GATES.values():
        gate.clear()
    queue = AckingQueue()
    engine = make_engine(threads=2, coroutines=1, queue=queue)
    first = engine.submit(AdGated, "q1")
    second = engine.submit(AdGated, "q2")
    engine.submit(AdSlowAsync)
    engine.start()
    try:
        GATES["q1"].set()  # its worker leads next, takes the coroutine task, then waits
        assert GATES["slow_started"].wait(10)
        GATES["q2"].set()
        deadline = time.monotonic() + 5
        while second not in queue.acked and time.monotonic() < deadline:
            GATES["slow"].wait(0.02)  # bounded poll; "slow" stays unset meanwhile
        assert first in queue.acked and second in queue.acked
        assert not GATES["slow"].is_set()  # acked while the coroutine still ran
    finally:
        GATES["slow"].set()
        engine.stop(timeout=10)
