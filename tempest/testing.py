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
are skipped. Override ``put_raw`` to let the suite store an undecodable
message. Needs pytest.
"""

from __future__ import annotations

import inspect
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tempest.queues.protocol import POISON_REASON

__all__ = ["QueueContract"]


_AT_MOST_ONCE = "an at-most-once queue (no ack): leases do not apply"


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
