"""MemoryQueue: FIFO order, blocking dequeue, thread safety, requeue and rejected messages."""

from __future__ import annotations

import collections
import threading
import time

from tempest import Task
from tempest.queues import MemoryQueue

from ..conftest import main_log


def test_fifo_order():
    """Messages come out in the order they went in."""
    queue = MemoryQueue()
    messages = [[f"id{i}", "MemQTask", i] for i in range(100)]
    for message in messages:
        queue.enqueue(message)
    assert [queue.dequeue() for _ in range(100)] == messages
    assert queue.dequeue() is None


def test_message_object_is_kept_as_is():
    """MemoryQueue hands back the very object it was given (no copy, no decoding)."""
    queue = MemoryQueue()
    message = ["id", "MemQTask", {"k": [1]}]
    queue.enqueue(message)
    assert queue.dequeue() is message
    raw = b"\xff raw bytes"
    queue.enqueue(raw)
    assert queue.dequeue() is raw


def test_dequeue_on_empty_returns_none_immediately():
    """dequeue() (and timeout=0) on an empty queue returns None without waiting."""
    queue = MemoryQueue()
    started = time.monotonic()
    assert queue.dequeue() is None
    assert queue.dequeue(timeout=0) is None
    assert queue.dequeue(timeout=None) is None
    assert time.monotonic() - started < 0.5


def test_blocking_dequeue_returns_when_a_message_arrives():
    """dequeue(timeout=2) returns the moment another thread enqueues, not at the timeout."""
    queue = MemoryQueue()
    ready = threading.Event()
    got: list = []
    returned_at: list[float] = []

    def waiter():
        ready.set()
        got.append(queue.dequeue(timeout=2))
        returned_at.append(time.monotonic())

    thread = threading.Thread(target=waiter)
    started = time.monotonic()
    thread.start()
    assert ready.wait(2)
    enqueued_at = time.monotonic()
    queue.enqueue(["id", "MemQTask"])
    thread.join(5)
    assert not thread.is_alive()
    assert got == [["id", "MemQTask"]]
    assert returned_at[0] - enqueued_at < 0.5
    assert returned_at[0] - started < 1.0  # well before the 2 s timeout


def test_blocking_dequeue_returns_none_after_the_timeout():
    """dequeue(timeout=...) with nothing arriving returns None after about the timeout."""
    queue = MemoryQueue()
    started = time.monotonic()
    assert queue.dequeue(timeout=0.2) is None
    elapsed = time.monotonic() - started
    assert 0.15 <= elapsed < 1.5


def test_blocked_dequeue_does_not_block_other_operations():
    """While dequeues wait, enqueue, len, reject and rejected return promptly."""
    queue = MemoryQueue()
    waiting = threading.Barrier(3)
    got: list = []
    lock = threading.Lock()

    def waiter():
        waiting.wait(2)
        message = queue.dequeue(timeout=2)
        with lock:
            got.append(message)

    threads = [threading.Thread(target=waiter) for _ in range(2)]
    for t in threads:
        t.start()
    waiting.wait(2)
    started = time.monotonic()
    assert len(queue) == 0
    queue.reject(["x"], "TooShort")
    assert queue.rejected() == [(["x"], "TooShort")]
    queue.enqueue(["a", "MemQTask"])
    queue.enqueue(["b", "MemQTask"])
    assert time.monotonic() - started < 0.5
    for t in threads:
        t.join(5)
        assert not t.is_alive()
    assert sorted(m[0] for m in got) == ["a", "b"]
    assert time.monotonic() - started < 1.5  # well before the 2 s timeout


def test_many_producers_and_consumers_each_message_once():
    """4 producers x 2000 messages and 4 consumers: every message is received exactly once."""
    queue = MemoryQueue()
    producers_done = threading.Event()
    received: list[list] = [[] for _ in range(4)]
    errors: list[BaseException] = []

    def produce(p):
        try:
            for i in range(2000):
                queue.enqueue([f"{p}-{i}", "MemQTask", p, i])
        except BaseException as exc:
            errors.append(exc)

    def consume(c):
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            message = queue.dequeue(timeout=0.05)
            if message is not None:
                received[c].append(message[0])
            elif producers_done.is_set() and len(queue) == 0:
                return

    # Daemons: a thread stuck in a wait fails the test below without holding pytest at exit.
    consumers = [threading.Thread(target=consume, args=(c,), daemon=True) for c in range(4)]
    producers = [threading.Thread(target=produce, args=(p,), daemon=True) for p in range(4)]
    for t in consumers + producers:
        t.start()
    for t in producers:
        t.join(20)
    producers_done.set()
    for t in consumers:
        t.join(25)
    assert not any(t.is_alive() for t in consumers + producers)
    assert errors == []
    counts = collections.Counter(i for part in received for i in part)
    assert len(counts) == 8000
    assert set(counts.values()) == {1}
    assert len(queue) == 0


def test_per_producer_order_is_kept_for_a_single_consumer():
    """With one consumer, each producer's messages arrive in the order it enqueued them."""
    queue = MemoryQueue()

    def produce(p):
        for i in range(500):
            queue.enqueue([p, i])

    producers = [threading.Thread(target=produce, args=(p,)) for p in range(3)]
    for t in producers:
        t.start()
    for t in producers:
        t.join(10)
    last = {0: -1, 1: -1, 2: -1}
    while (message := queue.dequeue()) is not None:
        p, i = message
        assert i == last[p] + 1
        last[p] = i
    assert last == {0: 499, 1: 499, 2: 499}


def test_len_counts_waiting_messages():
    """len() is the number of messages waiting."""
    queue = MemoryQueue()
    assert len(queue) == 0
    for i in range(5):
        queue.enqueue([str(i), "MemQTask"])
    assert len(queue) == 5
    queue.dequeue()
    queue.dequeue()
    assert len(queue) == 3
    while queue.dequeue() is not None:
        pass
    assert len(queue) == 0


def test_requeue_gives_the_message_back_at_the_end():
    """requeue puts a dequeued message back; it comes out after those already waiting."""
    queue = MemoryQueue()
    queue.enqueue(["first", "MemQTask"])
    queue.enqueue(["second", "MemQTask"])
    taken = queue.dequeue()
    queue.requeue(taken)
    assert len(queue) == 2
    assert queue.dequeue() == ["second", "MemQTask"]
    assert queue.dequeue() is taken
    assert queue.dequeue() is None


def test_requeue_wakes_a_blocked_dequeue():
    """A requeued message wakes a consumer waiting in dequeue(timeout=...)."""
    queue = MemoryQueue()
    ready = threading.Event()
    got: list = []
    thread = threading.Thread(target=lambda: (ready.set(), got.append(queue.dequeue(timeout=2))))
    started = time.monotonic()
    thread.start()
    assert ready.wait(2)
    queue.requeue(["back", "MemQTask"])
    thread.join(5)
    assert got == [["back", "MemQTask"]]
    assert time.monotonic() - started < 1.0


def test_reject_keeps_messages_with_reasons_oldest_first():
    """reject() keeps messages aside with their reason; rejected() lists them oldest first."""
    queue = MemoryQueue()
    assert queue.rejected() == []
    queue.reject(5, "NotAList")
    queue.reject(b"\xff", "Undecodable")
    queue.reject(["id", "Nope"], "UnknownTask")
    assert queue.rejected() == [(5, "NotAList"), (b"\xff", "Undecodable"),
                                (["id", "Nope"], "UnknownTask")]
    assert len(queue) == 0  # rejected messages are not waiting
    assert queue.dequeue() is None


def test_rejected_returns_a_copy():
    """Changing the list rejected() returned does not change what the queue keeps."""
    queue = MemoryQueue()
    queue.reject(["x"], "TooShort")
    listing = queue.rejected()
    listing.clear()
    assert queue.rejected() == [(["x"], "TooShort")]


def test_reject_is_thread_safe():
    """Concurrent reject() calls from many threads lose nothing."""
    queue = MemoryQueue()

    def reject_many(t):
        for i in range(500):
            queue.reject([t, i], "TooShort")

    threads = [threading.Thread(target=reject_many, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(queue.rejected()) == 2000


def test_queues_are_independent():
    """Two MemoryQueue instances share nothing."""
    first, second = MemoryQueue(), MemoryQueue()
    first.enqueue(["a", "MemQTask"])
    first.reject(["b"], "TooShort")
    assert len(second) == 0 and second.dequeue() is None and second.rejected() == []


def test_repr_shows_waiting_count():
    """repr() of a MemoryQueue shows how many messages wait."""
    queue = MemoryQueue()
    queue.enqueue(["a", "MemQTask"])
    assert "MemoryQueue" in repr(queue) and "1" in repr(queue)


def test_memory_queue_has_no_ack():
    """MemoryQueue is at-most-once: it has no ack method (the engine logs that guarantee)."""
    assert not hasattr(MemoryQueue(), "ack")


def test_engine_uses_memory_queue_end_to_end(make_engine):
    """An engine reports at-most-once for a MemoryQueue and drains it in a burst run."""
    class MemQEngineTask(Task):
        def process(self, x):
            return x

    queue = MemoryQueue()
    engine = make_engine(queue=queue)
    for i in range(5):
        engine.submit(MemQEngineTask, i)
    assert engine.stats()["queued"] == 5
    engine.run(burst=True)
    assert len(queue) == 0
    assert engine.stats()["succeeded"] == 5
    assert "guarantee=at-most-once" in main_log(engine)


# -- inspection does not hold up dequeues --------------------------------------------------


class _TimedLock:
    """Stands in for a MemoryQueue's lock, recording how long each hold lasted."""

    def __init__(self, lock: threading.Lock) -> None:
        self._lock, self.held = lock, []
        self._since = 0.0

    def __enter__(self) -> _TimedLock:
        self._lock.acquire()
        self._since = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.held.append(time.perf_counter() - self._since)
        self._lock.release()


def _long_queue(count: int) -> MemoryQueue:
    """A ranked queue of *count* ready messages of mixed priorities and *count* delayed."""
    queue = MemoryQueue()
    for i in range(count):
        queue.schedule([f"id-{i}", "T"], priority=i % 3)
        queue.schedule([f"later-{i}", "T"], delay=600, priority=i % 2)
    return queue


def test_inspecting_a_long_queue_holds_its_lock_only_to_copy():
    """peek, peek_scheduled and find of 100,000 messages order them after releasing the
    lock dequeue needs: each holds it for a small part of the call, and in order."""
    queue = _long_queue(100_000)
    timed = queue._lock = _TimedLock(queue._lock)  # type: ignore[assignment]
    calls = {"peek": lambda: queue.peek(limit=5, offset=10),
             "peek_scheduled": lambda: queue.peek_scheduled(limit=5, offset=10),
             "find": lambda: queue.find("later-99999")}
    for name, call in calls.items():
        timed.held.clear()
        started = time.perf_counter()
        listed = call()
        took = time.perf_counter() - started
        assert timed.held and sum(timed.held) < took / 4, (name, timed.held, took)
        if name == "peek":  # priority 2 first, in the order they became ready
            assert [e["message"][0] for e in listed] == [f"id-{i}" for i in range(32, 47, 3)]
        elif name == "peek_scheduled":
            assert [e["message"][0] for e in listed] == [f"later-{i}" for i in range(10, 15)]
        else:
            assert listed["status"] == "scheduled" and listed["priority"] == 1

