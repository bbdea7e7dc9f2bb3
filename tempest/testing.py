"""Helpers for your own tests: a contract suite for queues.

Check that your queue class behaves as the engine expects, in one line::

    # test_my_queue.py
    from tempest.testing import QueueContract

    class TestMyQueue(QueueContract):
        def make_queue(self, **options):
            return MyQueue(self.storage_name, **options)

``make_queue`` may be called several times in one test: each call must return
a new handle (a new consumer) on the *same* storage, which must be fresh for
every test -- use ``self.storage_name`` (unique per test) and ``self.tmp_path``.
Reliable queues (those with ``ack``) must accept ``lease`` (seconds) and
``max_deliveries`` keyword options; the contract passes short leases to see
redelivery happen within a test. Tests that do not apply to a queue (leases
for an at-most-once queue, blocking for one without ``dequeue(timeout=)``)
are skipped, and so are the scheduling tests for a queue without
``schedule`` and ``scheduled_count`` (delayed and prioritised messages) or
without ``fire`` and ``last_fired`` (periodic tasks), and the retry tests
for a queue without ``attempts``, ``retry``, ``fail`` and the failed-store
methods, and the result tests for one without ``result_ttl``,
``store_result`` and ``result``, and the engine-record and inspection
tests for one without all of ``ENGINE_METHODS`` or ``INSPECT_METHODS``; see
:mod:`tempest.queues.protocol` for what those promise. Override ``put_raw``
to let the suite store an undecodable message. Needs pytest.
"""

from __future__ import annotations

import inspect
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tempest.queues.protocol import (
    ENGINE_METHODS,
    FAILED_FIELDS,
    FAILED_METHODS,
    INSPECT_METHODS,
    POISON_REASON,
    PRIORITY_MAX,
    PRIORITY_MIN,
    RESULT_FIELDS,
    RESULT_METHODS,
    RETRY_METHODS,
)

__all__ = ["QueueContract"]


_AT_MOST_ONCE = "an at-most-once queue (no ack): leases do not apply"
_NO_SCHEDULE = "the queue has no schedule(): delayed and prioritised messages do not apply"
_NO_FIRE = "the queue has no fire(): periodic tasks do not apply"
_NO_RESULTS = ("the queue lacks the result methods (result_ttl, store_result, result, "
               "schedule): results do not apply")
_NO_ENGINES = ("the queue lacks the engine methods (announce, engines, forget_engine, "
               "add_outcomes, outcomes): engine records do not apply")
_NO_INSPECT = ("the queue lacks the inspection methods (peek, peek_scheduled, rejected, "
               "rejected_count, find): inspection does not apply")
_NO_RETRY = ("the queue lacks the retry and failed-store methods (attempts, retry, fail, "
             "failed, ...): retries do not apply")


def _accepts_timeout(queue: Any) -> bool:
    try:
        params = inspect.signature(queue.dequeue).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "timeout" or p.kind is p.VAR_KEYWORD for p in params)


def _drain(queue: Any, limit: int = 10_000) -> list[Any]:
    """Dequeue (and ack, where the queue acks) until it is empty."""
    out = []
    for _ in range(limit):
        message = queue.dequeue()
        if message is None:
            break
        out.append(message)
        if callable(getattr(queue, "ack", None)):
            queue.ack(message)
    return out


def _until(predicate: Any, timeout: float) -> Any:
    """Poll *predicate* until truthy (returned) or *timeout* seconds pass (None)."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        pause.wait(0.02)
    return None


def _while_dequeue_waits(queue: Any, store: Any) -> tuple[Any, float]:
    """Call *store* while a thread waits in ``queue.dequeue(timeout=10)``.

    Returns what the dequeue returned and the seconds from *store* to then.
    """
    result: list[Any] = []
    waiting = threading.Event()

    def consume() -> None:
        waiting.set()
        result.append(queue.dequeue(timeout=10))

    thread = threading.Thread(target=consume)
    thread.start()
    waiting.wait(5)
    threading.Event().wait(0.2)  # let it block (the test holds either way)
    started = time.monotonic()
    store()
    thread.join(15)
    return (result[0] if result else None), time.monotonic() - started


class QueueContract:
    """The behaviour tempest's engine relies on, as a pytest test class.

    Subclass it (name the subclass ``Test...``) and define ``make_queue``.
    """

    fifo: bool = True
    """Whether the queue hands messages out in the order they were enqueued."""

    storage_name: str
    """Unique per test: name your queue's storage (a key, a table, a file) after it."""

    tmp_path: Path
    """pytest's tmp_path for the current test."""

    def make_queue(self, **options: Any) -> Any:
        """A new handle on this test's queue storage. Override this."""
        raise NotImplementedError("define make_queue(self, **options) in your subclass")

    def put_raw(self, queue: Any, raw: bytes) -> None:
        """Store *raw* (not JSON) as a message; override to enable that test."""
        pytest.skip("put_raw is not defined for this queue")

    # -- plumbing ---------------------------------------------------------------------

    @pytest.fixture(autouse=True)
    def _contract_storage(self, tmp_path: Path) -> Iterator[None]:
        self.storage_name = f"contract-{uuid.uuid4().hex[:12]}"
        self.tmp_path = tmp_path
        self._made: list[Any] = []
        yield
        for queue in self._made:
            close = getattr(queue, "close", None)
            if callable(close):
                close()

    def _queue(self, **options: Any) -> Any:
        queue = self.make_queue(**options)
        self._made.append(queue)
        return queue

    def _having(self, method: str, why: str, **options: Any) -> Any:
        """A new handle; the test is skipped (*why*) if the queue has no *method*."""
        queue = self._queue(**options)
        if not callable(getattr(queue, method, None)):
            pytest.skip(why)
        return queue

    def _reliable(self, **options: Any) -> Any:
        return self._having("ack", _AT_MOST_ONCE, **options)

    # -- every queue ---------------------------------------------------------------------

    def test_roundtrip_keeps_json_values(self) -> None:
        """A message comes back equal to what was enqueued, JSON types intact."""
        queue = self._queue()
        message = ["id-1", "Task", 1, 2.5, "text ü", None, True, [1, [2]], {"k": {"n": 1}}]
        queue.enqueue(message)
        got = queue.dequeue()
        assert list(got) == message

    def test_empty_dequeue_returns_none_at_once(self) -> None:
        """dequeue() on an empty queue returns None without waiting."""
        queue = self._queue()
        started = time.monotonic()
        assert queue.dequeue() is None
        assert time.monotonic() - started < 1.0

    def test_order(self) -> None:
        """Messages come out in the order they went in (where the queue is FIFO)."""
        if not self.fifo:
            pytest.skip("the queue does not promise FIFO order")
        queue = self._queue()
        for i in range(20):
            queue.enqueue([f"id-{i}", "Task", i])
        assert [m[2] for m in _drain(queue)] == list(range(20))

    def test_len_counts_waiting_messages(self) -> None:
        """len(queue), where defined, counts the messages waiting."""
        queue = self._queue()
        if not hasattr(type(queue), "__len__"):
            pytest.skip("the queue has no __len__")
        assert len(queue) == 0
        for i in range(3):
            queue.enqueue([f"id-{i}", "Task"])
        assert len(queue) == 3
        _drain(queue)
        assert len(queue) == 0

    def test_blocking_dequeue_times_out(self) -> None:
        """dequeue(timeout=t) on an empty queue waits about t, then returns None."""
        queue = self._queue()
        if not _accepts_timeout(queue):
            pytest.skip("dequeue takes no timeout")
        started = time.monotonic()
        assert queue.dequeue(timeout=0.3) is None
        elapsed = time.monotonic() - started
        assert 0.1 <= elapsed < 3.0

    def test_blocking_dequeue_wakes_on_enqueue(self) -> None:
        """A waiting dequeue(timeout=...) returns as soon as another thread enqueues."""
        queue = self._queue()
        producer = self._queue()
        if not _accepts_timeout(queue):
            pytest.skip("dequeue takes no timeout")
        result: list[Any] = []
        waiting = threading.Event()

        def consume() -> None:
            waiting.set()
            result.append(queue.dequeue(timeout=10))

        thread = threading.Thread(target=consume)
        thread.start()
        waiting.wait(5)
        started = time.monotonic()
        producer.enqueue(["id-w", "Task", 7])
        thread.join(10)
        assert result and result[0] is not None and list(result[0]) == ["id-w", "Task", 7]
        assert time.monotonic() - started < 5.0  # far less than the 10 s it may wait

    def test_concurrent_consumers_get_each_message_once(self) -> None:
        """Several consumers (threads, each its own handle) never get one message twice."""
        total = 200
        producer = self._queue()
        for i in range(total):
            producer.enqueue([f"id-{i}", "Task", i])
        seen: list[int] = []
        lock = threading.Lock()

        def consume(handle: Any) -> None:
            for message in _drain(handle):
                with lock:
                    seen.append(message[2])

        handles = [self._queue() for _ in range(4)]
        threads = [threading.Thread(target=consume, args=(h,)) for h in handles]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(seen) == list(range(total))

    def test_reject_keeps_the_message_aside(self) -> None:
        """A rejected message is not handed out again and, where listed, is kept."""
        queue = self._queue()
        if not callable(getattr(queue, "reject", None)):
            pytest.skip("the queue has no reject")
        queue.enqueue(["id-r", "Nope"])
        message = queue.dequeue()
        queue.reject(message, "UnknownTask")
        assert queue.dequeue() is None
        if callable(getattr(queue, "rejected", None)):
            kept = [(list(m) if isinstance(m, (list, tuple)) else m, r)
                    for m, r in queue.rejected()]
            assert (["id-r", "Nope"], "UnknownTask") in kept

    def test_requeue_gives_the_message_back(self) -> None:
        """A requeued message can be dequeued again at once."""
        queue = self._queue()
        if not callable(getattr(queue, "requeue", None)):
            pytest.skip("the queue has no requeue")
        queue.enqueue(["id-q", "Task", 1])
        queue.requeue(queue.dequeue())
        again = queue.dequeue()
        assert again is not None and list(again) == ["id-q", "Task", 1]

    def test_undecodable_message_is_returned_raw(self) -> None:
        """What the queue cannot decode comes back raw (str/bytes) and can be rejected."""
        queue = self._queue()
        self.put_raw(queue, b"\xff not json")
        raw = queue.dequeue()
        assert isinstance(raw, (str, bytes))
        if callable(getattr(queue, "reject", None)):
            queue.reject(raw, "Undecodable")
        assert queue.dequeue() is None

    # -- batches (dequeue_many) -----------------------------------------------------------

    def _batching(self, **options: Any) -> Any:
        return self._having("dequeue_many", "the queue has no dequeue_many", **options)

    def test_dequeue_many_takes_up_to_count_in_order(self) -> None:
        """dequeue_many(n) returns at most n messages, oldest first, each only once."""
        queue = self._batching()
        for i in range(5):
            queue.enqueue([f"id-{i}", "Task", i])
        first = queue.dequeue_many(3, timeout=1)
        second = queue.dequeue_many(3, timeout=1)
        got = [m[2] for m in [*first, *second]]
        assert len(first) <= 3 and len(second) <= 3
        assert sorted(got) == list(range(len(got))) and len(got) >= 2
        if self.fifo:
            assert got == sorted(got)
        got += [m[2] for m in _drain(queue)]
        assert sorted(got) == list(range(5))

    def test_dequeue_many_on_an_empty_queue(self) -> None:
        """An empty list at once for timeout=0; after about the timeout otherwise."""
        queue = self._batching()
        started = time.monotonic()
        assert list(queue.dequeue_many(4, timeout=0)) == []
        assert time.monotonic() - started < 1.0
        started = time.monotonic()
        assert list(queue.dequeue_many(4, timeout=0.3)) == []
        assert 0.1 <= time.monotonic() - started < 3.0

    def test_dequeue_many_wakes_on_enqueue(self) -> None:
        """A waiting dequeue_many returns as soon as another thread enqueues."""
        queue = self._batching()
        producer = self._queue()
        result: list[Any] = []
        waiting = threading.Event()

        def consume() -> None:
            waiting.set()
            result.append(queue.dequeue_many(4, timeout=10))

        thread = threading.Thread(target=consume)
        thread.start()
        waiting.wait(5)
        started = time.monotonic()
        producer.enqueue(["id-w", "Task", 7])
        thread.join(10)
        assert result and [list(m) for m in result[0]] == [["id-w", "Task", 7]]
        assert time.monotonic() - started < 5.0

    def test_each_message_of_a_batch_is_settled_on_its_own(self) -> None:
        """Acked messages of a batch are gone; an unacked one returns after its lease."""
        queue = self._batching(lease=0.5)
        if not callable(getattr(queue, "ack", None)):
            pytest.skip(_AT_MOST_ONCE)
        for i in range(3):
            queue.enqueue([f"id-{i}", "Task", i])
        batch = queue.dequeue_many(3, timeout=1)
        if len(batch) < 3:  # a queue may hand out fewer than asked: ask again
            batch += _until(lambda: queue.dequeue_many(3 - len(batch), timeout=1), 5) or []
        assert sorted(m[2] for m in batch) == [0, 1, 2]
        for message in batch:
            if message[2] != 1:
                queue.ack(message)
        other = self._reliable(lease=0.5)
        again = _until(other.dequeue, 10.0)
        assert again is not None and list(again) == ["id-1", "Task", 1]
        other.ack(again)
        assert _until(other.dequeue, 1.0) is None

    # -- reliable queues -------------------------------------------------------------------

    @pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
    def test_a_forked_child_is_a_consumer_of_its_own(self) -> None:
        """In a forked child the queue object holds none of its parent's messages."""
        queue = self._reliable()
        queue.enqueue(["id-parent", "Task"])
        held = _until(queue.dequeue, 5)
        assert held is not None
        queue.enqueue(["id-child", "Task"])
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports by its exit code only
            code = 1
            try:
                try:
                    queue.ack(held)
                    code = 2  # acked its parent's message
                except ValueError:
                    message = _until(queue.dequeue, 5)
                    if message is not None and list(message) == ["id-child", "Task"]:
                        queue.ack(message)
                        code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        queue.ack(held)  # still the parent's to settle
        assert len(queue) == 0

    @pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
    def test_close_in_a_forked_child_leaves_the_parent_working(self) -> None:
        """A child that closes its copy of the queue closes none of its parent's connections."""
        queue = self._queue()
        queue.enqueue(["id-1", "Task"])
        assert _until(queue.dequeue, 5) is not None  # the parent's connections are open
        if not callable(getattr(queue, "close", None)):
            pytest.skip("the queue has no close")
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports by its exit code only
            code = 1
            try:
                queue.close()
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        queue.enqueue(["id-2", "Task"])  # the parent's connections still work
        message = _until(queue.dequeue, 5)
        assert message is not None and list(message) == ["id-2", "Task"]

    def test_acked_message_is_gone(self) -> None:
        """After ack, the message is never delivered again, even after its lease."""
        queue = self._reliable(lease=0.3)
        queue.enqueue(["id-a", "Task"])
        queue.ack(queue.dequeue())
        other = self._reliable(lease=0.3)
        assert _until(other.dequeue, 1.0) is None

    def test_ack_and_dequeue_acks_then_leases_the_next(self) -> None:
        """``ack_and_dequeue``: the acked message is gone, the ones taken are leased."""
        queue = self._having("ack_and_dequeue", "the queue has no ack_and_dequeue",
                             lease=0.5)
        for i in range(4):
            queue.enqueue([f"id-{i}", "Task", i])
        first = queue.dequeue()
        assert first is not None and list(first) == ["id-0", "Task", 0]
        taken = queue.ack_and_dequeue(first, 2)
        assert [list(m) for m in taken] == [["id-1", "Task", 1], ["id-2", "Task", 2]]
        last = queue.ack_and_dequeue(taken[0], 5)  # fewer waiting than asked
        assert [list(m) for m in last] == [["id-3", "Task", 3]]
        assert queue.ack_and_dequeue(last[0], 1) == []  # acked, with nothing to take
        other = self._reliable(lease=0.5)
        # Only the one never acked comes back, once its lease ran out.
        again = _until(other.dequeue, 10.0)
        assert again is not None and list(again) == ["id-2", "Task", 2]
        other.ack(again)
        assert _until(other.dequeue, 1.0) is None

    def test_ack_and_dequeue_of_an_unknown_message_raises(self) -> None:
        """Like ``ack``: a message this queue object does not hold is an error."""
        queue = self._having("ack_and_dequeue", "the queue has no ack_and_dequeue")
        queue.enqueue(["id-u", "Task"])
        with pytest.raises(ValueError):
            queue.ack_and_dequeue(["id-u", "Task"], 1)
        message = _until(queue.dequeue, 5.0)  # nothing was taken by the failed call
        assert message is not None and list(message) == ["id-u", "Task"]

    def test_unacked_message_returns_after_the_lease(self) -> None:
        """A consumer that dies holding a message: another gets it once the lease ends."""
        dead = self._reliable(lease=0.5)
        dead.enqueue(["id-d", "Task", 1])
        assert dead.dequeue() is not None  # and never acked, nor heartbeats again
        other = self._reliable(lease=0.5)
        assert other.dequeue() is None  # still leased
        started = time.monotonic()
        again = _until(other.dequeue, 10.0)
        assert again is not None and list(again) == ["id-d", "Task", 1]
        assert time.monotonic() - started < 10.0

    def test_heartbeat_keeps_a_long_task_leased(self) -> None:
        """While its consumer heartbeats, a message outlives its lease undelivered."""
        alive = self._reliable(lease=0.4)
        if not callable(getattr(alive, "heartbeat", None)):
            pytest.skip("the queue has no heartbeat")
        alive.enqueue(["id-h", "Task"])
        assert alive.dequeue() is not None
        other = self._reliable(lease=0.4)
        deadline = time.monotonic() + 1.5
        pause = threading.Event()
        while time.monotonic() < deadline:
            alive.heartbeat()
            assert other.dequeue() is None
            pause.wait(0.1)

    def test_poison_message_is_set_aside(self) -> None:
        """A message delivered max_deliveries times without an outcome is rejected."""
        options = {"lease": 0.2, "max_deliveries": 2}
        first = self._reliable(**options)
        first.enqueue(["id-p", "Task"])
        deliveries = 0
        deadline = time.monotonic() + 15
        pause = threading.Event()
        while time.monotonic() < deadline:
            consumer = self._reliable(**options)  # each "engine" takes it and dies
            if consumer.dequeue() is not None:
                deliveries += 1
            if callable(getattr(consumer, "rejected", None)) and any(
                    r == POISON_REASON for _, r in consumer.rejected()):
                break
            pause.wait(0.05)
        assert deliveries == 2
        assert any(r == POISON_REASON for _, r in first.rejected())

    # -- scheduling (schedule, scheduled_count) -------------------------------------------

    def _scheduling(self, **options: Any) -> Any:
        return self._having("schedule", _NO_SCHEDULE, **options)

    def _wait_for_one(self, queue: Any, limit: float) -> tuple[Any, float]:
        """The next message dequeue(timeout=) gives within *limit* s, and how long it took."""
        started = time.monotonic()
        if _accepts_timeout(queue):
            message = queue.dequeue(timeout=limit)
        else:
            message = _until(queue.dequeue, limit)
        return message, time.monotonic() - started

    def test_delayed_message_waits_for_its_time(self) -> None:
        """A message scheduled with delay= is not dequeued before its time, then is."""
        queue = self._scheduling()
        started = time.monotonic()
        queue.schedule(["id-late", "Task", 1], delay=0.4)
        assert queue.dequeue() is None
        assert queue.scheduled_count() == 1
        assert len(queue) == 0 if hasattr(type(queue), "__len__") else True
        message, _ = self._wait_for_one(queue, 10)
        assert message is not None and list(message) == ["id-late", "Task", 1]
        assert time.monotonic() - started >= 0.4
        assert queue.scheduled_count() == 0

    def test_message_at_a_time_waits_for_it(self) -> None:
        """A message scheduled at= a POSIX time is not dequeued before then."""
        queue = self._scheduling()
        at = time.time() + 0.4
        queue.schedule(["id-at", "Task"], at=at)
        assert queue.dequeue() is None
        message, _ = self._wait_for_one(queue, 10)
        assert message is not None and list(message) == ["id-at", "Task"]
        assert time.time() >= at - 0.05  # the queue's clock may be another machine's

    def test_a_time_in_the_past_means_now(self) -> None:
        """at= in the past, and delay=0, make a message ready at once."""
        queue = self._scheduling()
        queue.schedule(["id-past", "Task"], at=time.time() - 3600)
        queue.schedule(["id-zero", "Task"], delay=0.0)
        assert queue.scheduled_count() == 0
        got = [list(m) for m in _drain(queue)]
        assert got == [["id-past", "Task"], ["id-zero", "Task"]]

    def test_higher_priority_first_then_in_order(self) -> None:
        """Ready messages come out by priority (higher first), equal ones in order."""
        queue = self._scheduling()
        priorities = [0, 5, -1, 5, 3, 0, PRIORITY_MAX, PRIORITY_MIN, -1]
        for i, priority in enumerate(priorities):
            queue.schedule([f"id-{i}", "Task", i], priority=priority)
        queue.enqueue(["id-plain", "Task", 99])  # priority 0, after the others of 0
        order = [m[2] for m in _drain(queue)]
        expected = sorted(range(len(priorities)), key=lambda i: (-priorities[i], i))
        expected.insert(expected.index(5) + 1, 99)
        assert order == expected

    def test_equal_priority_in_the_order_messages_became_ready(self) -> None:
        """At one priority, a delayed message takes its turn from its time, not its enqueue."""
        queue = self._scheduling()
        queue.schedule(["id-delayed", "Task"], delay=0.3)
        queue.enqueue(["id-now", "Task"])
        _until(lambda: queue.scheduled_count() == 0, 10)
        queue.enqueue(["id-later", "Task"])
        assert [m[0] for m in _drain(queue)] == ["id-now", "id-delayed", "id-later"]

    def test_a_ready_priority_message_passes_delayed_ones(self) -> None:
        """Priorities order ready messages only: a later time is kept, whatever the priority."""
        queue = self._scheduling()
        queue.schedule(["id-urgent-later", "Task"], delay=30, priority=100)
        queue.schedule(["id-low-now", "Task"], priority=-5)
        assert [m[0] for m in _drain(queue)] == ["id-low-now"]
        assert queue.scheduled_count() == 1

    def test_len_counts_ready_and_scheduled_count_the_rest(self) -> None:
        """len() counts ready messages (any priority); scheduled_count() those not ready."""
        queue = self._scheduling()
        if not hasattr(type(queue), "__len__"):
            pytest.skip("the queue has no __len__")
        for i in range(3):
            queue.enqueue([f"id-{i}", "Task"])
        queue.schedule(["id-p", "Task"], priority=7)
        queue.schedule(["id-d1", "Task"], delay=60)
        queue.schedule(["id-d2", "Task"], at=time.time() + 60, priority=3)
        assert len(queue) == 4
        assert queue.scheduled_count() == 2
        assert len(_drain(queue)) == 4
        assert len(queue) == 0 and queue.scheduled_count() == 2

    def test_waiting_dequeue_wakes_when_the_time_comes(self) -> None:
        """A waiting dequeue(timeout=) returns a delayed message soon after its time."""
        queue = self._scheduling()
        if not _accepts_timeout(queue):
            pytest.skip("dequeue takes no timeout")
        producer = self._queue()
        producer.schedule(["id-soon", "Task"], delay=0.3)
        started = time.monotonic()
        message = queue.dequeue(timeout=10)
        elapsed = time.monotonic() - started
        assert message is not None and list(message) == ["id-soon", "Task"]
        assert elapsed < 3.0  # its time, plus a bounded lateness; far from 10 s

    def test_waiting_dequeue_wakes_for_an_earlier_message(self) -> None:
        """A message scheduled while a dequeue waits, earlier than any it knew of, wakes it."""
        queue = self._scheduling()
        if not _accepts_timeout(queue):
            pytest.skip("dequeue takes no timeout")
        producer = self._queue()
        producer.schedule(["id-far", "Task"], delay=60)
        message, took = _while_dequeue_waits(
            queue, lambda: producer.schedule(["id-near", "Task"], delay=0.3))
        assert message is not None and list(message) == ["id-near", "Task"]
        assert took < 3.0

    def test_waiting_dequeue_wakes_for_a_priority_message(self) -> None:
        """A waiting dequeue returns at once a message stored ready with a priority."""
        queue = self._scheduling()
        if not _accepts_timeout(queue):
            pytest.skip("dequeue takes no timeout")
        producer = self._queue()
        message, took = _while_dequeue_waits(
            queue, lambda: producer.schedule(["id-vip", "Task"], priority=9))
        assert message is not None and list(message) == ["id-vip", "Task"]
        assert took < 3.0

    def test_waiting_dequeue_wakes_on_enqueue_while_messages_are_delayed(self) -> None:
        """With delayed messages waiting, a plain enqueue still wakes a waiting dequeue."""
        queue = self._scheduling()
        if not _accepts_timeout(queue):
            pytest.skip("dequeue takes no timeout")
        producer = self._queue()
        producer.schedule(["id-far", "Task"], delay=60)
        message, took = _while_dequeue_waits(queue, lambda: producer.enqueue(["id-now", "Task"]))
        assert message is not None and list(message) == ["id-now", "Task"]
        assert took < 3.0

    def test_dequeue_many_takes_by_priority_and_never_early(self) -> None:
        """dequeue_many gives ready messages by priority and none before its time."""
        queue = self._scheduling()
        if not callable(getattr(queue, "dequeue_many", None)):
            pytest.skip("the queue has no dequeue_many")
        queue.schedule(["id-later", "Task"], delay=30, priority=50)
        for i, priority in enumerate([1, 3, 2]):
            queue.schedule([f"id-{i}", "Task"], priority=priority)
        batch = queue.dequeue_many(10, timeout=1)
        assert [m[0] for m in batch] == ["id-1", "id-2", "id-0"]
        for message in batch:
            if callable(getattr(queue, "ack", None)):
                queue.ack(message)

    def test_requeue_keeps_the_priority(self) -> None:
        """A message given back takes its turn again at its own priority."""
        queue = self._scheduling()
        if not callable(getattr(queue, "requeue", None)):
            pytest.skip("the queue has no requeue")
        queue.enqueue(["id-plain", "Task"])
        queue.schedule(["id-high", "Task"], priority=5)
        first = queue.dequeue()
        assert first is not None and first[0] == "id-high"
        queue.requeue(first)
        assert [m[0] for m in _drain(queue)] == ["id-high", "id-plain"]

    def test_a_redelivered_message_keeps_its_priority(self) -> None:
        """A message whose consumer died comes back at its priority once the lease ends."""
        dead = self._reliable(lease=0.5)
        if not callable(getattr(dead, "schedule", None)):
            pytest.skip(_NO_SCHEDULE)
        dead.schedule(["id-high", "Task"], priority=5)
        assert dead.dequeue() is not None  # and never acked
        other = self._reliable(lease=0.5)
        other.enqueue(["id-plain", "Task"])
        got = _until(lambda: [m[0] for m in _drain(other)], 10.0) or []
        if got == ["id-plain"]:  # taken before the lease ran out: the other comes later
            got += _until(lambda: [m[0] for m in _drain(other)], 10.0) or []
            assert got == ["id-plain", "id-high"]
        else:
            assert got == ["id-high", "id-plain"]

    def test_scheduled_message_outlives_its_producer(self) -> None:
        """On a durable queue, a new handle sees and gets what another one scheduled."""
        producer = self._reliable()
        if not callable(getattr(producer, "schedule", None)):
            pytest.skip(_NO_SCHEDULE)
        producer.schedule(["id-kept", "Task"], delay=0.3, priority=2)
        close = getattr(producer, "close", None)
        if callable(close):
            close()
        consumer = self._reliable()
        assert consumer.scheduled_count() == 1
        message, _ = self._wait_for_one(consumer, 10)
        assert message is not None and list(message) == ["id-kept", "Task"]

    # -- periodic slots (fire, last_fired) ------------------------------------------------

    def _firing(self, **options: Any) -> Any:
        return self._having("fire", _NO_FIRE, **options)

    def test_a_slot_fires_once(self) -> None:
        """fire() stores the message for a slot once; again for that slot it does nothing."""
        queue = self._firing()
        other = self._queue()
        slot = round(time.time() - 10, 3)
        assert queue.last_fired("sched") is None
        assert queue.fire("sched", slot, ["sched@1", "Task", 1], keep=60) is True
        assert other.fire("sched", slot, ["sched@1", "Task", 1], keep=60) is False
        assert queue.fire("other", slot, ["other@1", "Task"], keep=60) is True
        assert queue.fire("sched", slot + 1, ["sched@2", "Task", 2], keep=60) is True
        assert other.last_fired("sched") == slot + 1
        assert sorted(m[0] for m in _drain(queue)) == ["other@1", "sched@1", "sched@2"]
        assert queue.fire("sched", slot, ["sched@1", "Task", 1], keep=60) is False  # ran

    def test_a_slot_in_the_future_is_ready_at_its_time(self) -> None:
        """A fired slot's message becomes ready at the slot's time, not before."""
        queue = self._firing()
        slot = round(time.time() + 0.4, 3)
        assert queue.fire("sched", slot, ["sched@f", "Task"], priority=4, keep=60)
        assert queue.dequeue() is None
        message, _ = self._wait_for_one(queue, 10)
        assert message is not None and list(message) == ["sched@f", "Task"]
        assert time.time() >= slot - 0.05

    def test_concurrent_firings_store_each_slot_once(self) -> None:
        """Handles racing to fire the same slots: each slot is stored exactly once."""
        slots = [round(time.time() - 100 + i, 3) for i in range(25)]
        handles = [self._firing() for _ in range(4)]
        wins: list[float] = []
        lock = threading.Lock()
        start = threading.Barrier(len(handles))

        def race(handle: Any) -> None:
            start.wait(10)
            for slot in slots:
                if handle.fire("race", slot, [f"race@{slot}", "Task"], keep=60):
                    with lock:
                        wins.append(slot)

        threads = [threading.Thread(target=race, args=(h,)) for h in handles]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(wins) == slots
        assert sorted(m[0] for m in _drain(handles[0])) == sorted(f"race@{s}" for s in slots)

    # -- retries and the failed store (attempts, retry, fail, failed, ...) ---------------

    def _failing(self, **options: Any) -> Any:
        queue = self._queue(**options)
        lacking = [m for m in (*RETRY_METHODS, *FAILED_METHODS)
                   if not callable(getattr(queue, m, None))]
        if lacking:
            pytest.skip(_NO_RETRY)
        return queue

    def _settle(self, queue: Any, message: Any) -> None:
        if callable(getattr(queue, "ack", None)):
            queue.ack(message)

    def _take(self, queue: Any, limit: float = 10.0) -> Any:
        message, _ = self._wait_for_one(queue, limit)
        assert message is not None, f"no message within {limit}s"
        return message

    def _fail_one(self, queue: Any, task_id: str, when: float, *, keep: int = 100,
                  ttl: float = 3600.0, args: tuple[Any, ...] = (1, "two")) -> int:
        """Enqueue, take and fail a message of *task_id*; return what fail() returned."""
        queue.enqueue([task_id, "Task", *args])
        message = self._take(queue)
        assert list(message) == [task_id, "Task", *args]
        return int(queue.fail(message, _record(task_id, args, when), keep=keep, ttl=ttl))

    def test_a_first_delivery_has_no_failed_attempts(self) -> None:
        """attempts() is 0 for a message that never failed."""
        queue = self._failing()
        queue.enqueue(["id-r0", "Task", 1])
        message = self._take(queue)
        assert queue.attempts(message) == 0
        self._settle(queue, message)

    def test_retry_waits_for_its_delay_and_counts_the_attempt(self) -> None:
        """A retried message is not ready before its delay; it comes back one attempt up."""
        queue = self._failing()
        queue.enqueue(["id-r1", "Task", 1])
        message = self._take(queue)
        started = time.monotonic()
        queue.retry(message, delay=0.4, failed_at=time.time())
        assert queue.dequeue() is None
        if callable(getattr(queue, "scheduled_count", None)):
            assert queue.scheduled_count() == 1
        again = self._take(queue)
        assert time.monotonic() - started >= 0.3
        assert list(again) == ["id-r1", "Task", 1]
        assert queue.attempts(again) == 1
        queue.retry(again, delay=0, failed_at=time.time())
        third = self._take(queue)
        assert queue.attempts(third) == 2
        self._settle(queue, third)
        assert _drain(queue) == []

    def test_retry_keeps_the_priority(self) -> None:
        """A retried message takes its turn at its own priority again."""
        queue = self._failing()
        if not callable(getattr(queue, "schedule", None)):
            pytest.skip(_NO_SCHEDULE)
        queue.schedule(["id-high", "Task"], priority=7)
        message = self._take(queue)
        queue.enqueue(["id-plain", "Task"])
        queue.retry(message, delay=0, failed_at=time.time())
        assert [m[0] for m in _drain(queue)] == ["id-high", "id-plain"]

    def test_retry_stores_the_message_as_given(self) -> None:
        """The engine fills in a missing task id before retry(): the queue keeps it."""
        queue = self._failing()
        queue.enqueue([None, "Task", 3])
        message = self._take(queue)
        message[0] = "id-filled"
        queue.retry(message, delay=0, failed_at=time.time())
        again = self._take(queue)
        assert list(again) == ["id-filled", "Task", 3]
        self._settle(queue, again)

    def test_requeue_keeps_the_attempts(self) -> None:
        """A message given back unrun keeps the count of its failed attempts."""
        queue = self._failing()
        if not callable(getattr(queue, "requeue", None)):
            pytest.skip("the queue has no requeue")
        queue.enqueue(["id-rq", "Task"])
        queue.retry(self._take(queue), delay=0, failed_at=time.time())
        message = self._take(queue)
        queue.requeue(message)
        again = self._take(queue)
        assert queue.attempts(again) == 1
        self._settle(queue, again)

    def test_a_redelivered_message_keeps_its_attempts(self) -> None:
        """A crash is not a failed attempt: after the lease, the count is what it was."""
        dead = self._failing(lease=0.5)
        if not callable(getattr(dead, "ack", None)):
            pytest.skip(_AT_MOST_ONCE)
        dead.enqueue(["id-crash", "Task"])
        dead.retry(self._take(dead), delay=0, failed_at=time.time())
        assert dead.attempts(self._take(dead)) == 1  # ...and its consumer dies
        other = self._failing(lease=0.5)
        again = _until(other.dequeue, 10.0)
        assert again is not None and list(again) == ["id-crash", "Task"]
        assert other.attempts(again) == 1
        other.ack(again)

    def test_a_retried_message_is_settled(self) -> None:
        """retry() settles the delivery: it is not delivered again after its lease."""
        queue = self._failing(lease=0.3)
        if not callable(getattr(queue, "ack", None)):
            pytest.skip(_AT_MOST_ONCE)
        queue.enqueue(["id-once", "Task"])
        message = self._take(queue)
        queue.retry(message, delay=0, failed_at=time.time())
        with pytest.raises(ValueError):
            queue.ack(message)
        again = self._take(queue)
        queue.ack(again)
        assert _until(self._failing(lease=0.3).dequeue, 1.0) is None

    def test_fail_stores_an_entry_and_settles_the_message(self) -> None:
        """fail() keeps the record with the first failure time; the message is gone."""
        queue = self._failing(lease=0.3)
        if callable(getattr(queue, "schedule", None)):
            queue.schedule(["id-f", "Task", 1, {"k": [2]}], priority=3)
        else:
            queue.enqueue(["id-f", "Task", 1, {"k": [2]}])
        first = time.time() - 30
        queue.retry(self._take(queue), delay=0, failed_at=first)
        message = self._take(queue)
        last = time.time()
        record = _record("id-f", (1, {"k": [2]}), last, attempts=2)
        assert queue.fail(message, record, keep=100, ttl=3600) == 0
        entry = queue.find_failed("id-f")
        assert entry is not None and set(entry) == set(FAILED_FIELDS)
        assert entry["task"] == "Task" and entry["args"] == [1, {"k": [2]}]
        assert entry["attempts"] == 2 and entry["error_type"] == "ValueError"
        assert entry["error"] == "bad value" and "Traceback" in entry["traceback"]
        assert abs(entry["first_failed_at"] - first) < 0.01
        assert abs(entry["last_failed_at"] - last) < 0.01
        assert abs(entry["expires_at"] - (last + 3600)) < 0.01
        assert entry["priority"] == (3 if callable(getattr(queue, "schedule", None)) else 0)
        assert queue.failed_count() == 1 and queue.failed() == [entry]
        if callable(getattr(queue, "ack", None)):
            with pytest.raises(ValueError):
                queue.ack(message)
            assert _until(self._failing(lease=0.3).dequeue, 1.0) is None

    def test_a_first_failure_is_its_own_first_failed_at(self) -> None:
        """A message failed for good on its first attempt: first and last failure agree."""
        queue = self._failing()
        when = time.time()
        self._fail_one(queue, "id-1st", when)
        entry = queue.find_failed("id-1st")
        assert entry["first_failed_at"] == entry["last_failed_at"]
        assert abs(entry["last_failed_at"] - when) < 0.01

    def test_fail_replaces_an_entry_of_the_same_id(self) -> None:
        """One entry per task id: the later failure replaces the earlier one."""
        queue = self._failing()
        now = time.time()
        self._fail_one(queue, "id-same", now - 5, args=(1,))
        self._fail_one(queue, "id-same", now, args=(2,))
        assert queue.failed_count() == 1
        assert queue.find_failed("id-same")["args"] == [2]

    def test_failed_lists_latest_first_and_pages(self) -> None:
        """failed(limit, offset) pages through the entries, the latest failure first."""
        queue = self._failing()
        now = time.time()
        for i in range(5):
            self._fail_one(queue, f"id-p{i}", now - 50 + i)
        ids = [e["task_id"] for e in queue.failed()]
        assert ids == [f"id-p{i}" for i in (4, 3, 2, 1, 0)]
        assert [e["task_id"] for e in queue.failed(limit=2, offset=1)] == ["id-p3", "id-p2"]
        assert queue.failed(limit=10, offset=5) == []

    def test_the_store_keeps_at_most_keep_entries(self) -> None:
        """Beyond *keep* entries, the ones that failed longest ago are dropped, counted."""
        queue = self._failing()
        now = time.time()
        dropped = sum(self._fail_one(queue, f"id-k{i}", now - 50 + i, keep=3)
                      for i in range(5))
        assert dropped == 2
        assert queue.failed_count() == 3
        assert sorted(e["task_id"] for e in queue.failed()) == ["id-k2", "id-k3", "id-k4"]
        assert queue.find_failed("id-k0") is None

    def test_expired_entries_are_neither_listed_nor_counted(self) -> None:
        """An entry past its ttl disappears from failed() and failed_count()."""
        queue = self._failing()
        self._fail_one(queue, "id-old", time.time() - 10, ttl=5)  # expired already
        self._fail_one(queue, "id-new", time.time(), ttl=3600)
        assert queue.failed_count() == 1
        assert [e["task_id"] for e in queue.failed()] == ["id-new"]
        assert queue.find_failed("id-old") is None
        assert queue.retry_failed("id-old") is False

    def test_retry_failed_runs_the_task_again_from_its_first_attempt(self) -> None:
        """retry_failed() moves the entry back into the queue, same id, attempts reset."""
        queue = self._failing()
        self._fail_one(queue, "id-again", time.time(), args=(5, [6]))
        other = self._failing()  # another handle, another process: the same store
        assert other.retry_failed("id-again") is True
        assert queue.find_failed("id-again") is None and queue.failed_count() == 0
        message = self._take(queue)
        assert list(message) == ["id-again", "Task", 5, [6]]
        assert queue.attempts(message) == 0
        self._settle(queue, message)
        assert other.retry_failed("id-again") is False

    def test_retry_failed_all_delete_and_purge(self) -> None:
        """Every entry back at once; one forgotten; all forgotten."""
        queue = self._failing()
        now = time.time()
        for i in range(3):
            self._fail_one(queue, f"id-all{i}", now - 10 + i)
        assert queue.retry_failed_all() == 3
        assert queue.failed_count() == 0
        assert sorted(m[0] for m in _drain(queue)) == ["id-all0", "id-all1", "id-all2"]
        for i in range(3):
            self._fail_one(queue, f"id-del{i}", now - 10 + i)
        assert queue.delete_failed("id-del1") is True
        assert queue.delete_failed("id-del1") is False
        assert queue.failed_count() == 2
        assert queue.purge_failed() == 2
        assert queue.failed_count() == 0 and queue.failed() == []
        assert queue.retry_failed_all() == 0

    # -- results (result_ttl, store_result, result; schedule(result_ttl=)) ---------------

    def _keeping(self, **options: Any) -> Any:
        queue = self._queue(**options)
        lacking = [m for m in RESULT_METHODS if not callable(getattr(queue, m, None))]
        if lacking:
            pytest.skip(_NO_RESULTS)
        return queue

    def test_result_ttl_travels_with_the_message(self) -> None:
        """schedule(result_ttl=) is read back by result_ttl(); enqueue asks for none."""
        queue = self._keeping()
        queue.schedule(["id-res1", "Task", 1], result_ttl=120.0)
        queue.enqueue(["id-res2", "Task", 2])
        first, second = self._take(queue), self._take(queue)
        assert [list(first), list(second)] == [["id-res1", "Task", 1], ["id-res2", "Task", 2]]
        assert queue.result_ttl(first) == 120.0
        assert queue.result_ttl(second) is None
        for message in (first, second):
            self._settle(queue, message)

    def test_requeue_and_retry_keep_the_result_ttl(self) -> None:
        """A message given back, or retried, still asks for its result."""
        queue = self._keeping()
        queue.schedule(["id-res3", "Task"], result_ttl=60.0)
        message = self._take(queue)
        if callable(getattr(queue, "requeue", None)):
            queue.requeue(message)
            message = self._take(queue)
            assert queue.result_ttl(message) == 60.0
        if callable(getattr(queue, "retry", None)):
            queue.retry(message, delay=0, failed_at=time.time())
            message = self._take(queue)
            assert queue.result_ttl(message) == 60.0
            assert queue.attempts(message) == 1
        self._settle(queue, message)

    def test_a_stored_result_is_read_back_by_any_handle(self) -> None:
        """store_result() then result(): the record as JSON gives it back, expires_at added."""
        queue, other = self._keeping(), self._keeping()
        before = time.time()
        queue.store_result("id-res4", _result("id-res4", (1, {"a": [2]})), ttl=60.0)
        record = other.result("id-res4", 0)
        assert record is not None
        assert {k: record[k] for k in RESULT_FIELDS if k != "expires_at"} == {
            **_result("id-res4", [1, {"a": [2]}])}
        assert before + 55 < record["expires_at"] < time.time() + 65
        queue.store_result("id-res4", _result("id-res4", "again"), ttl=60.0)
        assert other.result("id-res4", 0)["value"] == "again"  # replaced

    def test_result_of_an_unknown_id_waits_its_timeout(self) -> None:
        """None at once for timeout 0; None after about *timeout* seconds otherwise."""
        queue = self._keeping()
        began = time.monotonic()
        assert queue.result("id-none", 0) is None
        assert time.monotonic() - began < 1.0
        began = time.monotonic()
        assert queue.result("id-none", 0.3) is None
        assert 0.25 < time.monotonic() - began < 5.0

    def test_a_waiting_result_wakes_when_it_is_stored(self) -> None:
        """Two waiters on one id and one on another: the store wakes both of the first,
        well within their wait (no once-a-second poll); the third waits on."""
        queue, producer = self._keeping(), self._keeping()
        got: dict[str, Any] = {}
        lock = threading.Lock()

        def wait(key: str, task_id: str, timeout: float) -> None:
            record = queue.result(task_id, timeout)
            with lock:
                got[key] = (record, time.monotonic())

        waiters = [threading.Thread(target=wait, args=("a", "id-res5", 20)),
                   threading.Thread(target=wait, args=("b", "id-res5", 20)),
                   threading.Thread(target=wait, args=("c", "id-res6", 1.5))]
        for t in waiters:
            t.start()
        # A pause for the waiters to block. Not a synchronisation: one that starts
        # waiting after the store finds the record at once, and passes as well.
        threading.Event().wait(0.3)
        stored = time.monotonic()
        producer.store_result("id-res5", _result("id-res5", 5), ttl=60.0)
        for t in waiters:
            t.join(30)
        assert not any(t.is_alive() for t in waiters)
        for key in ("a", "b"):
            record, woke = got[key]
            assert record is not None and record["value"] == 5
            assert woke - stored < 0.9
        assert got["c"][0] is None

    def test_an_expired_result_is_not_returned(self) -> None:
        """A record past its ttl is gone for result(), even before it is removed."""
        queue = self._keeping()
        queue.store_result("id-res7", _result("id-res7", 7), ttl=0.3)
        assert queue.result("id-res7", 0) is not None
        deadline = time.monotonic() + 10
        while queue.result("id-res7", 0) is not None:
            assert time.monotonic() < deadline, "the result outlived its ttl by 10 s"
            threading.Event().wait(0.05)  # a bounded poll for the expiry
        queue.store_result("id-res8", _result("id-res8", 8), ttl=60.0)  # may sweep
        assert queue.result("id-res7", 0) is None
        assert queue.result("id-res8", 0)["value"] == 8

    # -- engine records and outcomes (ENGINE_METHODS) ------------------------------------

    def _watching(self, **options: Any) -> Any:
        queue = self._queue(**options)
        if any(not callable(getattr(queue, m, None)) for m in ENGINE_METHODS):
            pytest.skip(_NO_ENGINES)
        return queue

    def test_announced_engines_are_listed_until_they_expire(self) -> None:
        """engines() lists the records by engine id, as JSON gives them back, to every
        handle; a record not announced again is gone once its ttl ran out."""
        queue, other = self._watching(), self._watching()
        lasting = _engine("id-b", threads=8)
        brief = _engine("id-a", threads=2)
        queue.announce("id-b", lasting, 60)
        queue.announce("id-a", brief, 0.5)
        assert other.engines() == [brief, lasting]
        assert _until(lambda: other.engines() == [lasting], 10), "id-a outlived its ttl"
        changed = _engine("id-b", threads=16)
        other.announce("id-b", changed, 60)  # replaced, from any handle
        assert queue.engines() == [changed]

    def test_announcing_again_keeps_an_engine_listed(self) -> None:
        """An engine announced again before its ttl ran out stays listed past the first ttl."""
        queue = self._watching()
        queue.announce("id-kept", _engine("id-kept"), 0.5)
        queue.announce("id-gone", _engine("id-gone"), 0.5)
        queue.announce("id-kept", _engine("id-kept", threads=3), 60)
        assert _until(lambda: [e["engine_id"] for e in queue.engines()] == ["id-kept"], 10)
        assert queue.engines() == [_engine("id-kept", threads=3)]

    def test_a_forgotten_engine_is_gone_at_once(self) -> None:
        """forget_engine() drops one record now; forgetting an unknown one does nothing."""
        queue, other = self._watching(), self._watching()
        queue.announce("id-1", _engine("id-1"), 60)
        queue.announce("id-2", _engine("id-2"), 60)
        other.forget_engine("id-1")
        assert queue.engines() == [_engine("id-2")]
        other.forget_engine("id-unknown")
        queue.forget_engine("id-2")
        assert other.engines() == []

    def test_outcomes_of_every_handle_add_up(self) -> None:
        """add_outcomes() from two handles adds into one bucket per minute."""
        queue, other = self._watching(), self._watching()
        minute = int(time.time() // 60) * 60
        queue.add_outcomes(minute, {"succeeded": 3, "failed": 1})
        other.add_outcomes(minute, {"succeeded": 2, "retried": 4, "timed_out": 0})
        other.add_outcomes(minute, {})
        expected = {"succeeded": 5, "failed": 1, "retried": 4}
        assert {k: v for k, v in queue.outcomes(minute)[minute].items() if v} == expected
        assert set(other.outcomes(minute)) == {minute}

    def test_outcomes_since_a_minute(self) -> None:
        """outcomes(since) gives the buckets of the minutes from *since* on, by minute."""
        queue = self._watching()
        minute = int(time.time() // 60) * 60
        for back, count in ((2, 1), (1, 2), (0, 3)):
            queue.add_outcomes(minute - 60 * back, {"rejected": count})
        got = queue.outcomes(minute - 60)
        assert sorted(got) == [minute - 60, minute]
        assert got[minute - 60]["rejected"] == 2 and got[minute]["rejected"] == 3
        assert sorted(queue.outcomes(minute - 600)) == [minute - 120, minute - 60, minute]
        assert queue.outcomes(minute + 60) == {}

    def test_engine_methods_refuse_bad_arguments(self) -> None:
        """Wrong types raise TypeError, wrong values ValueError; nothing is stored."""
        queue = self._watching()
        minute = int(time.time() // 60) * 60
        _each_raises(TypeError,
                     lambda: queue.announce(1, {}, 5),
                     lambda: queue.announce("id-x", ["not", "a", "dict"], 5),
                     lambda: queue.announce("id-x", {"x": object()}, 5),
                     lambda: queue.add_outcomes(str(minute), {"failed": 1}),
                     lambda: queue.add_outcomes(minute, {"failed": 1.5}),
                     lambda: queue.add_outcomes(minute, [("failed", 1)]),
                     lambda: queue.outcomes("yesterday"),
                     lambda: queue.forget_engine(None))
        _each_raises(ValueError,
                     lambda: queue.announce("id-x", {}, 0),
                     lambda: queue.announce("id-x", {}, -1),
                     lambda: queue.announce("id-x", {"x": float("nan")}, 5),
                     lambda: queue.add_outcomes(minute + 1, {"failed": 1}),
                     lambda: queue.add_outcomes(minute, {"failed": -1}),
                     lambda: queue.add_outcomes(minute, {"exploded": 1}))
        assert queue.engines() == []
        assert queue.outcomes(0) == {}

    # -- inspection (INSPECT_METHODS) ------------------------------------------------------

    def _inspecting(self, **options: Any) -> Any:
        queue = self._queue(**options)
        if any(not callable(getattr(queue, m, None)) for m in INSPECT_METHODS):
            pytest.skip(_NO_INSPECT)
        return queue

    def test_peek_lists_ready_messages_in_the_order_they_are_taken(self) -> None:
        """peek() gives the ready messages by priority, then in order; a delayed one and
        one taken (leased) are not in it; the takes that follow give the same order."""
        queue = self._inspecting()
        scheduling = callable(getattr(queue, "schedule", None))
        priorities = [0, 5, -1, 5, 3, 0] if scheduling else [0] * 6
        queue.enqueue(["id-first", "Task"])
        for i, priority in enumerate(priorities):
            if scheduling:
                queue.schedule([f"id-{i}", "Task", i], priority=priority)
            else:
                queue.enqueue([f"id-{i}", "Task", i])
        if scheduling:
            queue.schedule(["id-later", "Task"], delay=60, priority=9)
        taken = queue.dequeue()  # leased where the queue leases, gone otherwise
        expected = sorted(range(len(priorities)), key=lambda i: (-priorities[i], i))
        assert taken is not None and taken[0] == (f"id-{expected[0]}" if scheduling
                                                  else "id-first")
        order = [f"id-{i}" for i in expected]
        order.insert(order.index("id-0"), "id-first")
        order.remove(taken[0])
        listed = queue.peek()
        assert [e["message"][0] for e in listed] == order
        by_id = {e["message"][0]: e for e in listed}
        assert by_id["id-4"] == {"message": ["id-4", "Task", 4],
                                 "priority": priorities[4], "attempts": 0}
        assert queue.peek() == listed  # nothing was taken
        if hasattr(type(queue), "__len__"):
            assert len(queue) == len(order)
        got = [m[0] for m in _drain(self._queue())]
        assert got == order

    def test_peek_pages(self) -> None:
        """peek(limit, offset) pages through the ready messages."""
        queue = self._inspecting()
        for i in range(5):
            queue.enqueue([f"id-{i}", "Task", i])
        assert [e["message"][2] for e in queue.peek(limit=2, offset=1)] == [1, 2]
        assert [e["message"][2] for e in queue.peek(limit=10, offset=3)] == [3, 4]
        assert queue.peek(limit=10, offset=5) == []
        assert queue.peek(limit=0) == []
        assert [e["message"][2] for e in queue.peek()] == [0, 1, 2, 3, 4]

    def test_peek_counts_no_delivery(self) -> None:
        """Peeking never counts as a delivery: with max_deliveries=1 the message still runs."""
        queue = self._inspecting(max_deliveries=1, lease=0.5)
        queue.enqueue(["id-once", "Task"])
        for _ in range(3):
            assert [e["message"] for e in queue.peek()] == [["id-once", "Task"]]
            assert queue.find("id-once")["status"] == "waiting"
        message = queue.dequeue()
        assert message is not None and list(message) == ["id-once", "Task"]
        assert queue.rejected_count() == 0
        self._settle(queue, message)

    def test_peek_shows_failed_attempts(self) -> None:
        """A retried message is listed with the attempts stored with it."""
        queue = self._inspecting()
        if not callable(getattr(queue, "retry", None)):
            pytest.skip(_NO_RETRY)
        queue.enqueue(["id-again", "Task"])
        queue.retry(self._take(queue), delay=0, failed_at=time.time())
        assert queue.peek() == [{"message": ["id-again", "Task"], "priority": 0,
                                 "attempts": 1}]
        assert queue.find("id-again")["attempts"] == 1

    def test_peek_scheduled_lists_the_soonest_first(self) -> None:
        """peek_scheduled() gives delayed messages by their time, with ``at``; ready
        messages are not in it."""
        queue = self._inspecting()
        if not callable(getattr(queue, "schedule", None)):
            pytest.skip(_NO_SCHEDULE)
        now = time.time()
        queue.schedule(["id-300", "Task", 1], at=now + 300, priority=2)
        queue.schedule(["id-100", "Task"], delay=100)
        queue.schedule(["id-200", "Task"], at=now + 200, priority=-4)
        queue.enqueue(["id-now", "Task"])
        listed = queue.peek_scheduled()
        assert [e["message"][0] for e in listed] == ["id-100", "id-200", "id-300"]
        assert listed[2] == {"message": ["id-300", "Task", 1], "priority": 2, "attempts": 0,
                             "at": listed[2]["at"]}
        assert abs(listed[2]["at"] - (now + 300)) < 0.01
        assert abs(listed[1]["at"] - (now + 200)) < 0.01 and listed[1]["priority"] == -4
        assert abs(listed[0]["at"] - (now + 100)) < 5  # the queue's clock may be another's
        assert [e["message"][0] for e in queue.peek_scheduled(limit=1, offset=1)] == ["id-200"]
        assert queue.peek_scheduled(offset=3) == []
        assert [e["message"][0] for e in queue.peek()] == ["id-now"]

    def test_rejected_pages_and_counts(self) -> None:
        """rejected(limit, offset) pages, oldest first; rejected_count() counts them all."""
        queue = self._inspecting()
        assert queue.rejected_count() == 0 and queue.rejected() == []
        for i in range(5):
            queue.enqueue([f"id-{i}", "Task"])
            queue.reject(queue.dequeue(), f"Reason{i}")
        every = [(list(m), r) for m, r in queue.rejected()]
        assert every == [([f"id-{i}", "Task"], f"Reason{i}") for i in range(5)]
        assert [r for _, r in queue.rejected(2, 1)] == ["Reason1", "Reason2"]
        assert [r for _, r in queue.rejected(offset=3)] == ["Reason3", "Reason4"]
        assert [r for _, r in queue.rejected(limit=10, offset=4)] == ["Reason4"]
        assert queue.rejected(limit=0) == [] and queue.rejected(offset=5) == []
        assert queue.rejected_count() == 5

    def test_find_tells_where_a_message_is(self) -> None:
        """find() says whether a message waits, waits for its time or is leased; None
        for one that is gone or never was."""
        queue = self._inspecting()
        scheduling = callable(getattr(queue, "schedule", None))
        queue.enqueue(["id-lease", "Task", 1])
        taken = queue.dequeue()
        assert taken is not None
        if scheduling:
            queue.schedule(["id-wait", "Task", {"a": 1}], priority=3)
            queue.schedule(["id-later", "Task"], delay=120, priority=-2)
        else:
            queue.enqueue(["id-wait", "Task", {"a": 1}])
        other = self._inspecting()
        assert other.find("id-wait") == {"status": "waiting",
                                         "message": ["id-wait", "Task", {"a": 1}],
                                         "priority": 3 if scheduling else 0, "attempts": 0}
        if scheduling:
            later = other.find("id-later")
            assert later is not None and later["status"] == "scheduled"
            assert later["message"] == ["id-later", "Task"] and later["priority"] == -2
            assert abs(later["at"] - (time.time() + 120)) < 5
        leased = other.find("id-lease")
        if callable(getattr(queue, "ack", None)):
            assert leased == {"status": "leased", "message": ["id-lease", "Task", 1],
                              "priority": 0, "attempts": 0}
            queue.ack(taken)
        assert other.find("id-lease") is None
        assert other.find("id-none") is None and other.find("") is None
        assert other.find("id-wai") is None  # a whole id, not a prefix

    def test_inspection_refuses_bad_arguments(self) -> None:
        """A negative limit or offset is a ValueError; a limit or id of a wrong type a
        TypeError."""
        queue = self._inspecting()
        _each_raises(ValueError, lambda: queue.peek(-1), lambda: queue.peek(offset=-1),
                     lambda: queue.peek_scheduled(-1), lambda: queue.rejected(-1),
                     lambda: queue.rejected(offset=-2))
        _each_raises(TypeError, lambda: queue.peek("10"), lambda: queue.peek(1.5),
                     lambda: queue.peek(None), lambda: queue.peek_scheduled(offset="1"),
                     lambda: queue.rejected("all"), lambda: queue.find(5),
                     lambda: queue.find(None))


def _each_raises(error: type[Exception], *calls: Callable[[], Any]) -> None:
    """Each of *calls* raises *error*."""
    for call in calls:
        with pytest.raises(error):
            call()


def _engine(engine_id: str, threads: int = 4) -> dict[str, Any]:
    """An engine record as an engine announces it (fewer keys: the queue keeps any)."""
    return {"engine_id": engine_id, "name": "Engine", "host": "host-1", "pid": 4242,
            "threads": threads, "uptime": 12.5, "running": [{"task_id": "t1", "task": "T"}],
            "stopping": False, "periodic": [], "next_at": None}


def _result(task_id: str, value: Any) -> dict[str, Any]:
    """A success record as the engine makes it (without expires_at)."""
    return {"task_id": task_id, "task": "Task", "state": "succeeded", "value": value,
            "error_type": None, "error": None, "traceback": None, "attempts": 1,
            "finished_at": 1733500000.5}


def _record(task_id: str, args: tuple[Any, ...], when: float, attempts: int = 1
            ) -> dict[str, Any]:
    """A failed-store record as the engine makes it, for a ValueError('bad value')."""
    return {"task_id": task_id, "task": "Task", "args": list(args), "attempts": attempts,
            "error_type": "ValueError", "error": "bad value",
            "traceback": "Traceback (most recent call last):\n  ...\nValueError: bad value\n",
            "last_failed_at": when}
