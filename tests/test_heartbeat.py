"""The engine's side of leases: heartbeats, and settling messages it cannot run."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from tempest import ConfigurationError, Task
from tempest.queues import MemoryQueue

from .conftest import main_log, wait_for


class HeartbeatQueue(MemoryQueue):
    """A MemoryQueue that acks and counts heartbeats (optionally failing some)."""

    def __init__(self, interval: Any = 0.02, fail: int = 0) -> None:
        super().__init__()
        self.heartbeat_interval = interval
        self.beats = 0
        self.fail = fail
        self.acked: list[Any] = []
        self.beat = threading.Condition()

    def ack(self, message: Any) -> None:
        self.acked.append(message)

    def heartbeat(self) -> None:
        with self.beat:
            self.beats += 1
            self.beat.notify_all()
        if self.fail:
            self.fail -= 1
            raise ConnectionError("server went away")

    def beats_after(self, count: int, timeout: float = 10.0) -> int:
        """Wait for *count* more heartbeats; return the total."""
        with self.beat:
            target = self.beats + count
            assert self.beat.wait_for(lambda: self.beats >= target, timeout)
            return self.beats


class HoldHeartbeat(Task):
    """Runs until the test releases it."""

    release = threading.Event()
    started = threading.Event()

    def process(self) -> None:
        HoldHeartbeat.started.set()
        HoldHeartbeat.release.wait(10)


@pytest.fixture(autouse=True)
def _reset_hold() -> Any:
    HoldHeartbeat.release.clear()
    HoldHeartbeat.started.clear()
    yield
    HoldHeartbeat.release.set()


def test_heartbeat_runs_at_once_and_every_interval(make_engine):
    queue = HeartbeatQueue(interval=0.02)
    engine = make_engine(queue=queue)
    engine.start()
    queue.beats_after(5)  # the first at start-up, then every interval
    assert engine.stop(timeout=10)
    stopped_at = queue.beats
    # No heartbeat once stop() has returned: the thread is gone.
    assert not any(t.name.startswith("tempest-heartbeat") for t in threading.enumerate())
    assert queue.beats == stopped_at


def test_heartbeats_go_on_while_draining(make_engine):
    queue = HeartbeatQueue(interval=0.02)
    engine = make_engine(queue=queue, shutdown_timeout=10)
    engine.submit(HoldHeartbeat)
    engine.start()
    assert HoldHeartbeat.started.wait(10)
    engine.stop(wait=False)
    wait_for(lambda: engine._state.control.runtime.stopping)
    queue.beats_after(3)  # a task still runs: its lease must stay renewed
    HoldHeartbeat.release.set()
    assert engine.stop(timeout=10)
    assert len(queue.acked) == 1


def test_failing_heartbeat_is_logged_and_retried_without_stopping(make_engine):
    queue = HeartbeatQueue(interval=0.02, fail=2)
    engine = make_engine(queue=queue)
    engine.start()
    queue.beats_after(4)
    engine.submit(HoldHeartbeat)
    assert HoldHeartbeat.started.wait(10)  # still dispatching
    HoldHeartbeat.release.set()
    assert engine.stop(timeout=10)
    log = main_log(engine)
    assert log.count("heartbeat failed") == 2
    assert "ConnectionError: server went away" in log
    assert "heartbeat recovered" in log


@pytest.mark.parametrize("interval", [0, -1, "10", None, True, float("inf"), float("nan")])
def test_bad_heartbeat_interval_is_a_configuration_error(make_engine, interval):
    engine = make_engine(queue=HeartbeatQueue(interval=interval))
    with pytest.raises(ConfigurationError, match="heartbeat_interval must be a positive"):
        engine.start()
    assert engine._state.control is None  # nothing left half-started


class AckOnlyQueue:
    """A queue that acks but has no reject."""

    def __init__(self) -> None:
        self.inner = MemoryQueue()
        self.acked: list[Any] = []
        self.done = threading.Event()

    def enqueue(self, message: Any) -> None:
        self.inner.enqueue(message)

    def dequeue(self, timeout: float | None = None) -> Any:
        return self.inner.dequeue(timeout=timeout)

    def ack(self, message: Any) -> None:
        self.acked.append(message)
        self.done.set()


def test_bad_message_is_acked_where_the_queue_cannot_reject(make_engine):
    queue = AckOnlyQueue()
    engine = make_engine(queue=queue)
    queue.enqueue(["0123456789ab", "NoSuchTaskAnywhere"])
    engine.start()
    assert queue.done.wait(10)
    assert engine.stop(timeout=10)
    assert queue.acked == [["0123456789ab", "NoSuchTaskAnywhere"]]
    assert "reason=UnknownTask" in main_log(engine)
