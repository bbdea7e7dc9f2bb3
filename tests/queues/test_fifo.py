"""Fifo, the FIFO under MemoryQueue: order, bounded waits, and getters racing."""

from __future__ import annotations

import collections
import queue
import threading
import time

import pytest

from tempest.queues._fifo import Fifo


def test_items_come_out_in_order_and_are_counted():
    fifo = Fifo()
    for i in range(5):
        fifo.put(i)
    assert fifo.qsize() == 5
    assert [fifo.get_nowait() for _ in range(3)] + [fifo.get(1.0) for _ in range(2)] == [
        0, 1, 2, 3, 4]
    assert fifo.qsize() == 0


@pytest.mark.parametrize("timeout", [0, -1, 0.05])
def test_an_empty_get_raises_empty_within_its_timeout(timeout):
    fifo = Fifo()
    began = time.monotonic()
    with pytest.raises(queue.Empty):
        fifo.get(timeout)
    with pytest.raises(queue.Empty):
        fifo.get_nowait()
    assert time.monotonic() - began < max(timeout, 0) + 2.0
    assert not fifo._waiters  # a getter that left is not woken later


def test_a_waiting_get_wakes_at_the_put():
    fifo = Fifo()
    got: list[object] = []
    waiting = threading.Thread(target=lambda: got.append(fifo.get(30)))
    waiting.start()
    deadline = time.monotonic() + 10
    while not fifo._waiters and time.monotonic() < deadline:
        time.sleep(0.001)  # a poll for the waiter to register, bounded
    assert fifo._waiters
    began = time.monotonic()
    fifo.put("x")
    waiting.join(10)
    assert got == ["x"] and time.monotonic() - began < 5.0


def test_waiters_are_woken_first_come_first_served():
    fifo = Fifo()
    order: list[int] = []
    threads = []
    for i in range(3):
        thread = threading.Thread(target=lambda i=i: order.append((i, fifo.get(30))))
        thread.start()
        threads.append(thread)
        deadline = time.monotonic() + 10
        while len(fifo._waiters) < i + 1 and time.monotonic() < deadline:
            time.sleep(0.001)
    for thread, item in zip(threads, "abc", strict=True):
        fifo.put(item)  # wakes the longest waiter alone: the others sleep on
        thread.join(10)
    assert order == [(0, "a"), (1, "b"), (2, "c")]


def test_racing_getters_with_short_timeouts_never_hang_and_take_each_item_once():
    """Six getters with 2 ms timeouts against bursty producers: a getter woken for an
    item another took first, past its deadline, must still return (CPython 3.11's
    SimpleQueue.get does not: it then waits with no timeout). After the producers
    stop, every getter returns; every item was taken exactly once. (Run against
    SimpleQueue on 3.11, this test hung a getter in about a third of the runs.)"""
    fifo = Fifo()
    stop = threading.Event()
    taken: collections.Counter[tuple[int, int]] = collections.Counter()
    sent: dict[int, int] = {}

    def get_until_stopped() -> None:
        while not stop.is_set():
            try:
                taken[fifo.get(0.002)] += 1
            except queue.Empty:
                pass

    def put_bursts(p: int) -> None:
        n = 0
        while not stop.is_set():
            for _ in range(3):
                fifo.put((p, n))
                n += 1
            time.sleep(0.0005)  # a burst, then a gap: getters race for the next one
        sent[p] = n

    def spin() -> None:  # holds the GIL in bytecode, as a busy process does: woken getters wait
        total = 0
        while not stop.is_set():
            for i in range(1000):
                total += i

    getters = [threading.Thread(target=get_until_stopped, daemon=True) for _ in range(6)]
    putters = [threading.Thread(target=put_bursts, args=(p,), daemon=True) for p in range(2)]
    putters.append(threading.Thread(target=spin, daemon=True))
    for thread in getters + putters:
        thread.start()
    stop.wait(3.0)  # the race runs for 3 s
    stop.set()
    for thread in putters + getters:
        thread.join(10)
    assert not any(thread.is_alive() for thread in getters + putters)
    while fifo.qsize():
        taken[fifo.get_nowait()] += 1
    assert sum(sent.values()) > 0
    assert set(taken) == {(p, n) for p, count in sent.items() for n in range(count)}
    assert set(taken.values()) == {1}
    assert not fifo._waiters
