"""RedisQueue: the queue contract, then what only a shared Redis gives."""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tempest import ConfigurationError, Task
from tempest.queues import redis as redis_module
from tempest.queues.protocol import POISON_REASON
from tempest.queues.redis import RedisQueue
from tempest.testing import QueueContract

from ..conftest import free_port, main_log, service_unavailable, wait_for
from .engines import (
    EngineProcessChecks,
    EngineProcesses,
    enqueue,
)

try:
    import redis
except ImportError:  # the redis_url fixture skips (on CI: fails) the tests needing it
    redis = None

REPO = Path(__file__).resolve().parents[2]


def client_for(url: str) -> Any:
    return redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=10)


def delete_queue(url: str, name: str) -> None:
    """Delete every key of queue *name* (they all start with its prefix)."""
    client = client_for(url)
    try:
        keys = list(client.scan_iter(match=f"tempest:{{{name}}}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def swept(queue: RedisQueue) -> int:
    """Heartbeat *queue* (recovering dead consumers' messages); return len(queue)."""
    queue.heartbeat()
    return len(queue)


def in_flight(client: Any, name: str) -> int:
    """Messages in every consumer's in-flight list of queue *name*."""
    return sum(client.llen(key) for key in client.scan_iter(
        match=f"tempest:{{{name}}}:inflight:*", count=1000))


class TestRedisQueueContract(QueueContract):
    """RedisQueue: each handle is a new consumer on this test's own queue name."""

    @pytest.fixture(autouse=True)
    def _redis(self, redis_url: str, _contract_storage: None) -> Iterator[None]:
        self.url = redis_url
        yield
        for queue in self._made:
            queue.close()
        delete_queue(self.url, self.storage_name)

    def make_queue(self, **options: Any) -> RedisQueue:
        return RedisQueue(self.url, self.storage_name, **options)

    def put_raw(self, queue: RedisQueue, raw: bytes) -> None:
        client = client_for(self.url)
        client.lpush(f"{queue.prefix}waiting", raw)
        client.close()


# -- Redis only --------------------------------------------------------------------------


@pytest.fixture
def name(redis_url: str) -> Iterator[str]:
    """A fresh queue name; its keys are deleted after the test."""
    queue_name = f"test-{uuid.uuid4().hex[:12]}"
    yield queue_name
    delete_queue(redis_url, queue_name)


@pytest.fixture
def client(redis_url: str) -> Iterator[Any]:
    """A plain redis-py client on the test database."""
    conn = client_for(redis_url)
    yield conn
    conn.close()


@pytest.fixture
def queues(redis_url: str, name: str) -> Iterator[Callable[..., RedisQueue]]:
    """Make RedisQueues (consumers) on the test's queue; all are closed afterwards."""
    made: list[RedisQueue] = []

    def factory(url: str | None = None, **options: Any) -> RedisQueue:
        queue = RedisQueue(url or redis_url, name, **options)
        made.append(queue)
        return queue

    yield factory
    for queue in made:
        queue.close()


def test_keys_are_the_documented_ones(queues, client, name):
    """Waiting, in-flight, consumers and rejected keys sit under tempest:{name}:, as JSON."""
    queue = queues()
    prefix = f"tempest:{{{name}}}:"
    assert queue.prefix == prefix
    queue.enqueue(["id-1", "Task", 1])
    client.lpush(f"{prefix}waiting", '["id-2","Task",2]')  # any client can produce
    assert client.lrange(f"{prefix}waiting", 0, -1) == [b'["id-2","Task",2]',
                                                          b'["id-1","Task",1]']
    first = queue.dequeue()
    assert first == ["id-1", "Task", 1]
    inflight = f"{prefix}inflight:{queue.consumer}"
    assert client.lrange(inflight, 0, -1) == [b'["id-1","Task",1]']
    assert client.zscore(f"{prefix}consumers", queue.consumer) is not None
    queue.ack(first)
    assert client.llen(inflight) == 0
    queue.reject(queue.dequeue(), "UnknownTask")
    assert client.lrange(f"{prefix}rejected", 0, -1) == [b'UnknownTask\n["id-2","Task",2]']
    assert {key.decode() for key in client.scan_iter(match=f"{prefix}*")} == {
        f"{prefix}consumers", f"{prefix}rejected"}


def test_dead_consumer_messages_come_back_first_in_order(queues):
    """What a dead consumer held returns ahead of the waiting messages, oldest first."""
    dead, other = queues(lease=0.3), queues(lease=0.3)
    for i in range(4):
        dead.enqueue([f"id-{i}", "Task", i])
    assert [dead.dequeue()[2] for _ in range(3)] == [0, 1, 2]  # then never acked
    assert other.dequeue()[2] == 3
    wait_for(lambda: swept(other) == 3, 10)
    assert [other.dequeue()[2] for _ in range(3)] == [0, 1, 2]


def test_requeue_goes_to_the_front_and_does_not_count(queues):
    """A requeued message is taken next, however often, and never taken for poison."""
    queue = queues(max_deliveries=1)
    queue.enqueue(["id-a", "Task"])
    queue.enqueue(["id-b", "Task"])
    for _ in range(3):
        message = queue.dequeue()
        assert message[0] == "id-a"
        queue.requeue(message)
    assert queue.dequeue()[0] == "id-a"
    assert queue.rejected() == []


def test_poison_is_listed_and_its_count_forgotten(queues, client, name):
    """A message that keeps dying goes to rejected(); its delivery counter goes too."""
    queue = queues(lease=0.2, max_deliveries=1)
    queue.enqueue(["id-p", "Task"])
    assert queue.dequeue() is not None  # and the consumer "dies"
    sweeper = queues(lease=0.2, max_deliveries=1)
    wait_for(lambda: swept(sweeper) == 0 and sweeper.rejected(), 10)
    assert sweeper.rejected() == [(["id-p", "Task"], POISON_REASON)]
    assert sweeper.dequeue() is None
    assert not client.exists(f"tempest:{{{name}}}:deliveries")


def test_late_ack_after_a_lost_lease(queues, caplog):
    """A consumer whose lease ran out: its ack still removes the waiting copy; it is warned."""
    slow, sweeper = queues(lease=0.3), queues(lease=0.3)
    slow.enqueue(["id-s", "Task"])
    message = slow.dequeue()
    wait_for(lambda: swept(sweeper) == 1, 10)  # given back
    slow.ack(message)  # finished after all: no one else has taken it yet
    assert len(sweeper) == 0 and sweeper.dequeue() is None
    with caplog.at_level(logging.WARNING, logger="tempest.queues.redis"):
        slow.heartbeat()
    assert "had run out" in caplog.text


def test_racing_first_claims_do_not_warn_of_a_lost_lease(queues, monkeypatch, caplog):
    """First heartbeat and first dequeue at once: the later reply may be the registering one."""
    queue = queues()
    claim = queue._claim_script
    first_ran, second_done = threading.Event(), threading.Event()

    def slow_first(**kwargs: Any) -> Any:
        reply = claim(**kwargs)  # registers this consumer in Redis
        if not first_ran.is_set():
            first_ran.set()
            second_done.wait(10)  # its reply comes back after the other claim's
        return reply

    monkeypatch.setattr(queue, "_claim_script", slow_first)
    beat = threading.Thread(target=queue.heartbeat)
    with caplog.at_level(logging.WARNING, logger="tempest.queues.redis"):
        beat.start()
        assert first_ran.wait(10)
        assert queue.dequeue() is None
        second_done.set()
        beat.join(10)
    assert "had run out" not in caplog.text


def test_a_stray_in_flight_entry_is_given_back(queues, client):
    """An entry moved for this consumer whose reply was lost returns at the next heartbeat."""
    queue = queues()
    queue.enqueue(["id-x", "Task"])
    queue.enqueue(["id-x", "Task"])  # the same bytes twice: a held copy and a stray
    held = queue.dequeue()
    inflight = f"{queue.prefix}inflight:{queue.consumer}"
    # What a claim does when its reply never arrives:
    assert client.lmove(f"{queue.prefix}waiting", inflight, "RIGHT", "LEFT") is not None
    assert len(queue) == 0
    queue.heartbeat()
    assert len(queue) == 1 and client.llen(inflight) == 1  # the held copy stays leased
    again = queue.dequeue()
    queue.ack(held)
    queue.ack(again)
    assert client.llen(inflight) == 0 and len(queue) == 0


def test_threads_sharing_one_queue_object(queues, client, name):
    """Eight threads dequeue and ack through one queue object: each message once, all acked."""
    queue = queues()
    for i in range(400):
        queue.enqueue([f"id-{i}", "Task", i])
    seen: list[int] = []
    lock = threading.Lock()

    def work() -> None:
        while (message := queue.dequeue(timeout=0.2)) is not None:
            with lock:
                seen.append(message[2])
            queue.ack(message)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(seen) == list(range(400))
    assert in_flight(client, name) == 0 and len(queue) == 0


def test_threads_sharing_one_queue_object_in_batches(queues, client, name):
    """Eight threads take batches through one queue object: each message once, all acked."""
    queue = queues()
    for i in range(400):
        queue.enqueue([f"id-{i}", "Task", i])
    seen: list[int] = []
    lock = threading.Lock()

    def work() -> None:
        while batch := queue.dequeue_many(3, timeout=0.2):
            assert len(batch) <= 3
            with lock:
                seen.extend(message[2] for message in batch)
            for message in batch:
                queue.ack(message)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(seen) == list(range(400))
    assert in_flight(client, name) == 0 and len(queue) == 0


# -- dequeue_many ------------------------------------------------------------------------


class CommandCounter:
    """Counts the commands (each one round trip: no pipelines) sent by any client."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sent: list[str] = []
        original = redis.Redis.execute_command

        def execute_command(client: Any, *args: Any, **options: Any) -> Any:
            self.sent.append(str(args[0]))
            return original(client, *args, **options)

        monkeypatch.setattr(redis.Redis, "execute_command", execute_command)
        # The queue's own commands on a connection of their own (one round trip each).
        command, commands = redis_module._command, redis_module._commands

        def counted(connection: Any, *args: Any) -> Any:
            self.sent.append(str(args[0]))
            return command(connection, *args)

        def counted_together(connection: Any, *sent: tuple[Any, ...]) -> list[Any]:
            self.sent.append(str(sent[0][0]))  # one round trip: named by its first
            return commands(connection, *sent)

        monkeypatch.setattr(redis_module, "_command", counted)
        monkeypatch.setattr(redis_module, "_commands", counted_together)


def test_a_batch_is_one_round_trip_into_the_in_flight_list(queues, client, monkeypatch):
    """dequeue_many moves up to n messages, oldest first, in one command, all in flight."""
    queue = queues()
    assert queue.dequeue_many(4) == []  # registers; loads the scripts
    for i in range(6):
        queue.enqueue([f"id-{i}", "Task", i])
    counter = CommandCounter(monkeypatch)
    first = queue.dequeue_many(4, timeout=1)  # fresh lease: the take script only
    assert counter.sent == ["EVALSHA"]
    assert [m[2] for m in first] == [0, 1, 2, 3]
    inflight = f"{queue.prefix}inflight:{queue.consumer}"
    assert client.llen(inflight) == 4 and len(queue) == 2
    counter.sent.clear()
    queue._renewed_at = -math.inf  # as if the last renewal were old: the claim script
    second = queue.dequeue_many(4, timeout=1)
    assert counter.sent == ["EVALSHA"]
    assert [m[2] for m in second] == [4, 5]
    assert client.llen(inflight) == 6 and len(queue) == 0
    for message in [*first, *second]:
        queue.ack(message)
    assert client.llen(inflight) == 0


def waited_for_batch(queue: RedisQueue, client: Any, monkeypatch: pytest.MonkeyPatch,
                     *, stale: bool) -> tuple[list[Any], CommandCounter]:
    """dequeue_many(3) of an empty queue, four messages pushed while it waits in BLMOVE.

    *stale*: the lease is no longer fresh when BLMOVE returns (a long wait).
    """
    assert queue.dequeue_many(3) == []
    counter = CommandCounter(monkeypatch)
    claim = queue._claim_script

    def claim_then_produce(**kwargs: Any) -> Any:
        reply = claim(**kwargs)
        if len(counter.sent) == 1:  # the claim that found nothing, before BLMOVE
            for i in range(4):  # an external producer's LPUSH
                client.lpush(f"{queue.prefix}waiting", f'["id-{i}","Task",{i}]')
            if stale:
                monkeypatch.setattr(queue, "_fresh", lambda: False)
        return reply

    monkeypatch.setattr(queue, "_claim_script", claim_then_produce)
    queue._renewed_at = -math.inf
    return queue.dequeue_many(3, timeout=5), counter


def test_a_waited_for_batch_takes_the_rest_with_the_renewal(queues, client, monkeypatch):
    """Empty queue, lease stale once BLMOVE returns: the renewal after it takes the others."""
    queue = queues()
    batch, counter = waited_for_batch(queue, client, monkeypatch, stale=True)
    assert [m[2] for m in batch] == [0, 1, 2]
    assert [c for c in counter.sent if c != "LPUSH"] == ["EVALSHA", "BLMOVE", "EVALSHA"]
    assert len(queue) == 1


def test_a_wait_with_a_fresh_lease_hands_out_what_blmove_moved(queues, client, monkeypatch):
    """Lease still fresh: no round trip between BLMOVE and the task; the next dequeue
    takes the rest of the batch."""
    queue = queues()
    batch, counter = waited_for_batch(queue, client, monkeypatch, stale=False)
    assert [m[2] for m in batch] == [0]
    assert [c for c in counter.sent if c != "LPUSH"] == ["EVALSHA", "BLMOVE"]
    assert [m[2] for m in queue.dequeue_many(3, timeout=5)] == [1, 2, 3]
    assert len(queue) == 0


def test_idle_waits_are_one_blmove_each_while_the_lease_is_fresh(queues, monkeypatch):
    """After a wait that found nothing, the next ones go straight to BLMOVE (one round trip)."""
    queue, producer = queues(), queues()
    assert queue.dequeue_many(3, timeout=0.05) == []  # claims (renews), then waits
    counter = CommandCounter(monkeypatch)
    for _ in range(3):
        assert queue.dequeue_many(3, timeout=0.05) == []
        assert queue.dequeue(timeout=0.05) is None
    assert counter.sent == ["BLMOVE"] * 6
    for i in range(4):
        producer.enqueue([f"id-{i}", "Task", i])
    counter.sent.clear()
    batch = queue.dequeue_many(3, timeout=5)  # what BLMOVE moved, nothing more
    assert [m[2] for m in batch] == [0]
    assert counter.sent == ["BLMOVE"]
    counter.sent.clear()
    assert [m[2] for m in queue.dequeue_many(3, timeout=5)] == [1, 2, 3]  # the take script
    assert counter.sent == ["EVALSHA"]
    queue._renewed_at = -math.inf  # no longer fresh: a wait claims (renews) first
    counter.sent.clear()
    assert queue.dequeue_many(3, timeout=0.05) == []
    assert counter.sent[0] == "EVALSHA" and "BLMOVE" in counter.sent


def test_dequeue_many_counts(queues, client):
    """A count below 1 takes nothing; a count over the limit takes the limit; not an int: error."""
    queue = queues()
    pipe = client.pipeline(transaction=False)
    for i in range(1005):
        pipe.lpush(f"{queue.prefix}waiting", f'["id-{i}","Task",{i}]')
    pipe.execute()
    assert queue.dequeue_many(0) == [] and queue.dequeue_many(-1, timeout=1) == []
    with pytest.raises(TypeError, match="count must be an int"):
        queue.dequeue_many("3")
    batch = queue.dequeue_many(5000)
    assert len(batch) == 1000 and [m[2] for m in batch] == list(range(1000))
    assert len(queue) == 5


def test_a_dead_consumers_batch_comes_back_in_order_and_counted(queues):
    """A batch never settled returns whole after the lease, oldest first; poison counts each."""
    dead, other = queues(lease=0.3, max_deliveries=2), queues(lease=0.3, max_deliveries=2)
    for i in range(4):
        dead.enqueue([f"id-{i}", "Task", i])
    assert [m[2] for m in dead.dequeue_many(3)] == [0, 1, 2]  # then never settled
    assert [m[2] for m in other.dequeue_many(3)] == [3]
    wait_for(lambda: swept(other) == 3, 10)
    again = other.dequeue_many(5)
    assert [m[2] for m in again] == [0, 1, 2]  # a second delivery; then it dies too
    last = queues(lease=0.3, max_deliveries=2)
    wait_for(lambda: swept(last) == 1, 10)  # 3 was delivered once only: it waits again
    assert sorted(last.rejected()) == [([f"id-{i}", "Task", i], POISON_REASON)
                                       for i in range(3)]
    assert [m[2] for m in last.dequeue_many(5)] == [3]


def test_a_batch_lost_in_its_reply_is_given_back(queues, client, monkeypatch, caplog):
    """The take script ran but its reply was lost: the next dequeue_many gives all back first."""
    queue = queues()
    assert queue.dequeue_many(3) == []  # the lease is fresh: the take script runs next
    for i in range(3):
        queue.enqueue([f"id-{i}", "Task", i])
    take = queue._take_script

    def take_then_break(**kwargs: Any) -> Any:
        take(**kwargs)
        raise redis.ConnectionError("the reply was lost")

    monkeypatch.setattr(queue, "_take_script", take_then_break)
    with pytest.raises(redis.ConnectionError):
        queue.dequeue_many(3)
    inflight = f"{queue.prefix}inflight:{queue.consumer}"
    assert client.llen(inflight) == 3 and len(queue) == 0  # moved, unknown to the queue
    monkeypatch.setattr(queue, "_take_script", take)
    with caplog.at_level(logging.WARNING, logger="tempest.queues.redis"):
        batch = queue.dequeue_many(5)
    assert "gave back 3 message(s)" in caplog.text
    assert [m[2] for m in batch] == [0, 1, 2]  # once each, in order
    assert client.llen(inflight) == 3 and len(queue) == 0


def test_a_lost_renewal_after_blmove_gives_the_whole_batch_back(queues, client, monkeypatch):
    """BLMOVE's reply came, the renewal taking the rest lost its: all given back at heartbeat."""
    queue, producer = queues(), queues()
    claim = queue._claim_script
    calls: list[int] = []

    def claim_once_then_break(**kwargs: Any) -> Any:
        calls.append(1)
        reply = claim(**kwargs)
        if len(calls) == 1:  # found nothing: BLMOVE waits next (long: the lease goes stale)
            for i in range(3):
                producer.enqueue([f"id-{i}", "Task", i])
            monkeypatch.setattr(queue, "_fresh", lambda: False)
            return reply
        raise redis.ConnectionError("the reply was lost")

    monkeypatch.setattr(queue, "_claim_script", claim_once_then_break)
    with pytest.raises(redis.ConnectionError):
        queue.dequeue_many(3, timeout=5)
    inflight = f"{queue.prefix}inflight:{queue.consumer}"
    assert client.llen(inflight) == 3 and len(queue) == 0
    monkeypatch.setattr(queue, "_claim_script", claim)
    monkeypatch.undo()
    queue.heartbeat()
    assert client.llen(inflight) == 0 and len(queue) == 3
    assert [m[2] for m in queue.dequeue_many(3)] == [0, 1, 2]


def test_a_batch_never_lands_with_a_lapsed_lease(queues, client, monkeypatch):
    """The take script moves nothing once the lease ran out: the claim renews, then moves."""
    queue = queues()
    assert queue.dequeue_many(2) == []  # registered; the lease is fresh to this object
    queue.enqueue(["id-0", "Task", 0])
    consumers = f"{queue.prefix}consumers"
    client.zadd(consumers, {queue.consumer: 0})  # ran out (a stall), not swept yet
    inflight = f"{queue.prefix}inflight:{queue.consumer}"
    take = queue._take_script

    def take_and_look(**kwargs: Any) -> Any:
        reply = take(**kwargs)
        assert reply == [0] and client.llen(inflight) == 0
        assert client.llen(f"{queue.prefix}waiting") == 1
        return reply

    monkeypatch.setattr(queue, "_take_script", take_and_look)
    counter = CommandCounter(monkeypatch)
    batch = queue.dequeue_many(2)
    assert [m[2] for m in batch] == [0]
    assert [c for c in counter.sent if c == "EVALSHA"] == ["EVALSHA", "EVALSHA"]
    seconds, micros = client.time()
    assert client.zscore(consumers, queue.consumer) > seconds * 1000 + micros // 1000


def test_named_queues_are_apart(redis_url, queues, name):
    """Queues with different names in one database never see each other's messages."""
    other = RedisQueue(redis_url, f"{name}-other")
    try:
        queues().enqueue(["id-m", "Send"])
        assert other.dequeue() is None and len(other) == 0
        assert queues().dequeue() == ["id-m", "Send"]
    finally:
        other.close()
        delete_queue(redis_url, f"{name}-other")


def test_settling_a_message_twice_is_an_error(queues):
    """ack/reject/requeue accept only what this queue object dequeued and did not settle."""
    queue = queues()
    queue.enqueue(["id-a", "Task"])
    message = queue.dequeue()
    queue.ack(message)
    with pytest.raises(ValueError, match="already acked"):
        queue.ack(message)
    with pytest.raises(ValueError, match="not a message this queue"):
        queues().requeue(["id-a", "Task"])


@pytest.mark.parametrize("options", [{"lease": 0}, {"lease": "30"}, {"max_deliveries": 0},
                                     {"max_deliveries": True},
                                     {"lease": 3, "heartbeat_interval": 3},
                                     {"name": ""}, {"name": "a{b}"}, {"name": 7},
                                     {"url": b"redis://x"}, {"url": "nosuch://x"}])
def test_bad_options_are_refused(redis_url, options):
    """Bad names, URLs, leases, delivery limits and heartbeats raise ConfigurationError."""
    options = {"url": "redis://127.0.0.1:6379/15", **options}
    with pytest.raises(ConfigurationError, match="RedisQueue"):
        RedisQueue(**options)


def test_repr_never_shows_the_url(redis_url):
    """The URL (which may hold a password) stays out of repr(); no connection is made."""
    queue = RedisQueue("redis://:s3cret@redis.invalid:6379/0", "jobs", heartbeat_interval=1)
    assert "s3cret" not in repr(queue) and "jobs" in repr(queue)
    assert queue.heartbeat_interval == 1.0
    assert RedisQueue("redis://redis.invalid", lease=9).heartbeat_interval == 3.0


class RedisSum(Task):
    def process(self, a: int, b: int) -> int:
        return a + b


def test_engine_with_eight_threads_takes_batches(queues, client, name, make_engine):
    """Workers waiting for the leader get their messages in batches; each acked once."""
    queue = queues()
    sizes: list[int] = []
    dequeue_many = queue.dequeue_many

    def spy(count: int, timeout: float | None = None) -> list[Any]:
        batch = dequeue_many(count, timeout=timeout)
        sizes.append(len(batch))
        return batch

    queue.dequeue_many = spy  # type: ignore[method-assign]
    engine = make_engine(threads=8, queue=queue)
    for i in range(1000):
        engine.submit(RedisSum, i, 1)
    engine.run(burst=True)
    stats = engine.stats()
    assert (stats["processed"], stats["succeeded"], stats["queued"]) == (1000, 1000, 0)
    assert in_flight(client, name) == 0
    assert max(sizes) > 1


def test_engine_with_four_threads_drains_500_messages(queues, client, name, make_engine):
    """An engine in burst mode processes and acks 500 messages, at-least-once."""
    queue = queues()
    engine = make_engine(threads=4, queue=queue)
    for i in range(500):
        engine.submit(RedisSum, i, 1)
    engine.run(burst=True)
    stats = engine.stats()
    assert (stats["processed"], stats["succeeded"], stats["queued"]) == (500, 500, 0)
    assert in_flight(client, name) == 0
    assert "guarantee=at-least-once" in main_log(engine).splitlines()[0]


# -- a private Redis server, to stop and restart ------------------------------------------




class RedisServer:
    """A redis-server of the test's own: AOF with fsync on every write, in tmp_path."""

    def __init__(self, binary: str, folder: Path) -> None:
        self.binary, self.folder = binary, folder
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
             "--appendonly", "yes", "--appendfsync", "always", "--save", "",
             "--dir", str(self.folder), "--logfile", str(self.folder / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        conn = client_for(self.url)

        def up() -> bool:
            assert self.proc is not None and self.proc.poll() is None, "redis-server exited"
            try:
                return bool(conn.ping())
            except redis.RedisError:
                return False
        try:
            wait_for(up, 10, interval=0.02)
        finally:
            conn.close()

    def kill(self) -> None:
        """SIGKILL: whatever Redis acknowledged is in the fsynced AOF already."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server (skip locally, fail on CI, when the binary is missing)."""
    binary = shutil.which("redis-server")
    if binary is None:
        service_unavailable("redis-server is not on PATH")
    if redis is None:
        service_unavailable("the redis driver is not installed: pip install -e '.[test]'")
    folder = tmp_path / "redis"
    folder.mkdir()
    server = RedisServer(str(binary), folder)
    server.start()
    try:
        yield server
    finally:
        server.kill()


def test_settlements_wait_out_a_redis_restart(redis_server, caplog):
    """Redis down: dequeue and heartbeat raise, ack is kept; restarted: the ack lands."""
    queue = RedisQueue(redis_server.url, "restart", lease=30)
    try:
        queue.enqueue(["id-1", "Task"])
        queue.enqueue(["id-2", "Task"])
        message = queue.dequeue()
        redis_server.kill()
        with caplog.at_level(logging.WARNING, logger="tempest.queues.redis"):
            queue.ack(message)  # must neither raise nor lose the message
        assert "ack of 1 message(s) deferred" in caplog.text
        with pytest.raises(redis.ConnectionError):
            queue.dequeue()
        with pytest.raises(redis.ConnectionError):
            queue.heartbeat()
        redis_server.start()  # the same port and AOF
        queue.heartbeat()
        conn = client_for(redis_server.url)
        try:
            assert conn.llen(f"{queue.prefix}inflight:{queue.consumer}") == 0
        finally:
            conn.close()
        assert queue.dequeue() == ["id-2", "Task"]
    finally:
        queue.close()


# -- engines in processes of their own ------------------------------------------------------


def _left(url: str, name: str) -> int:
    conn = client_for(url)
    try:
        return int(conn.llen(f"tempest:{{{name}}}:waiting")) + in_flight(conn, name)
    except redis.ConnectionError:
        return -1  # the server is down: not drained
    finally:
        conn.close()


def engine_processes(tmp_path: Path, url: str, name: str) -> EngineProcesses:
    return EngineProcesses(tmp_path, "redis", [url, name], left=lambda: _left(url, name))


@pytest.fixture
def engines(tmp_path: Path, redis_url: str, name: str) -> Iterator[EngineProcesses]:
    """Engine processes on the test's queue; any still running is killed afterwards."""
    processes = engine_processes(tmp_path, redis_url, name)
    try:
        yield processes
    finally:
        processes.kill_all()


class TestEngineProcesses(EngineProcessChecks):
    """kill -9 and three engines, on this queue."""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_engine_rides_out_a_redis_restart(redis_server, tmp_path):
    """Redis SIGKILLed and restarted mid-run: the engine stays up, logs, and loses nothing."""
    engines = engine_processes(tmp_path, redis_server.url, "restart")
    producer = RedisQueue(redis_server.url, "restart")
    try:
        ids = enqueue(producer, 300, 0.01)
        proc, out = engines.start(threads=4, lease=10)
        engines.wait_ready(proc, out)
        wait_for(lambda: len(engines.done()) >= 60, 15)
        redis_server.kill()
        log = out.parent / "QueueEngine.log"
        # Down for a while: the engine's dequeues fail and back off, at least twice.
        wait_for(lambda: "attempt=2" in log.read_text(), 10)
        assert proc.poll() is None
        redis_server.start()
        engines.wait_all_processed(ids, 30)
        assert proc.poll() is None, "the engine died with the server"
        engines.stop_all()
    finally:
        engines.kill_all()
        producer.close()
    text = log.read_text()
    assert "dequeue recovered" in text
    done = [task_id for task_id, _ in engines.done()]
    print(f"run twice: {len(done) - len(ids)}; log: "
          f"{text.count('dequeue failed')} failed dequeues, "
          f"{text.count('heartbeat failed')} failed heartbeats")
    assert set(done) == set(ids)  # nothing lost
    assert len(done) - len(ids) <= 4  # at most what the engine held


# -- scheduling: what only Redis has -------------------------------------------------------

TOKEN = b"\xffwake"


def drain(queue: RedisQueue) -> list[Any]:
    """Dequeue and ack until *queue* has nothing ready; the messages' first fields."""
    out = []
    while (message := queue.dequeue()) is not None:
        out.append(message[0])
        queue.ack(message)
    return out


def test_an_external_lpush_beside_priorities(queues, client):
    """A producer's bare LPUSH onto waiting is priority 0, between the positive and negative."""
    queue = queues()
    queue.schedule(["id-low", "Task"], priority=-2)
    client.lpush(f"{queue.prefix}waiting", '["id-external","Task"]')
    queue.schedule(["id-high", "Task"], priority=3)
    queue.enqueue(["id-plain", "Task"])
    assert len(queue) == 4
    assert client.lrange(f"{queue.prefix}waiting:3", 0, -1) == [b'\xffp3\n["id-high","Task"]']
    assert drain(queue) == ["id-high", "id-external", "id-plain", "id-low"]
    assert len(queue) == 0
    assert not client.exists(f"{queue.prefix}priorities", f"{queue.prefix}waiting:3",
                             f"{queue.prefix}waiting:-2")


def test_wake_tokens_are_never_counted_nor_handed_out(queues, client, name):
    """Tokens pushed to wake consumers: not in len(), never dequeued, never recovered."""
    queue = queues()
    assert queue.dequeue() is None  # registered: one live consumer
    waiting = f"tempest:{{{name}}}:waiting"
    queue.schedule(["id-vip", "Task"], priority=9)  # ready, prioritised: wakes
    queue.schedule(["id-later", "Task"], delay=3600)  # the earliest due: wakes
    assert TOKEN in client.lrange(waiting, 0, -1)
    assert len(queue) == 1 and queue.scheduled_count() == 1
    queue.enqueue(["id-plain", "Task"])
    client.rpush(waiting, TOKEN)  # one more, at the taking end
    assert len(queue) == 2
    assert drain(queue) == ["id-vip", "id-plain"]
    assert client.llen(f"tempest:{{{name}}}:inflight:{queue.consumer}") == 0
    # A dead consumer's in-flight token is dropped, not given back nor counted.
    dead = f"tempest:{{{name}}}:inflight:dead:1:x"
    client.lpush(dead, TOKEN)
    client.zadd(f"tempest:{{{name}}}:consumers", {"dead:1:x": 0})
    queue.heartbeat()
    assert not client.exists(dead, f"tempest:{{{name}}}:deliveries")
    assert TOKEN not in client.lrange(waiting, 0, -1) or len(queue) == 0
    assert len(queue) == 0 and queue.dequeue() is None


def test_a_waiting_dequeue_wakes_for_a_priority_message_from_another_producer(queues):
    """Blocked in BLMOVE on waiting, a consumer is woken by a token for waiting:<p>."""
    queue, producer = queues(), queues()
    assert queue.dequeue(timeout=0.05) is None  # idle: the next wait goes straight to BLMOVE
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(queue.dequeue(timeout=10)))
    thread.start()
    wait_for(lambda: len(producer) == 0, 5)
    threading.Event().wait(0.1)  # let it block (the test holds either way)
    producer.schedule(["id-vip", "Task"], priority=4)
    thread.join(15)
    assert result and result[0] == ["id-vip", "Task"]


def test_recovery_keeps_the_priority(queues, client, name):
    """A dead consumer's entries return to their own priority's list, at the taking end."""
    dead, other = queues(lease=0.3), queues(lease=0.3)
    dead.schedule(["id-high", "Task"], priority=5)
    dead.enqueue(["id-plain", "Task"])
    dead.schedule(["id-low", "Task"], priority=-1)
    assert [dead.dequeue()[0] for _ in range(3)] == ["id-high", "id-plain", "id-low"]
    inflight = f"tempest:{{{name}}}:inflight:{dead.consumer}"
    assert client.lrange(inflight, 0, -1) == [b'\xffp-1\n["id-low","Task"]',
                                              b'["id-plain","Task"]',
                                              b'\xffp5\n["id-high","Task"]']
    other.enqueue(["id-new", "Task"])
    wait_for(lambda: swept(other) == 4, 10)
    assert client.hlen(f"tempest:{{{name}}}:deliveries") == 3
    assert drain(other) == ["id-high", "id-plain", "id-new", "id-low"]


def test_fired_slots_are_forgotten_after_keep(queues, client, name):
    """fire prunes slots recorded more than keep seconds ago; last_fired is the latest kept."""
    queue = queues()
    fired, slots = f"tempest:{{{name}}}:fired:beat", f"tempest:{{{name}}}:slots:beat"
    first = 1_700_000_000.123
    assert queue.fire("beat", first, ["beat@1", "Task"], keep=0.2) is True
    assert queue.fire("beat", first, ["beat@1", "Task"], keep=0.2) is False
    assert queue.last_fired("beat") == first
    assert client.zrange(fired, 0, -1) == [repr(first).encode()]
    # Once recorded more than keep ago, the slot is forgotten (by the next firing).
    wait_for(lambda: queue.fire("beat", first, ["beat@1", "Task"], keep=0.2), 10)
    assert client.zcard(fired) == 1 and client.zcard(slots) == 1
    assert queue.fire("beat", first + 1, ["beat@2", "Task"], keep=0.2) is True
    assert queue.last_fired("beat") == first + 1
    # A later firing forgets both once they are old enough; the newest stays.
    def server_ms() -> float:
        seconds, micros = client.time()
        return seconds * 1000 + micros / 1000

    newest = max(score for _, score in client.zrange(fired, 0, -1, withscores=True))
    wait_for(lambda: server_ms() - newest > 300, 10)
    assert queue.fire("beat", first + 2, ["beat@3", "Task"], keep=0.2) is True
    assert client.zcard(fired) == 1
    assert client.zrange(slots, 0, -1) == [repr(first + 2).encode()]
    assert queue.last_fired("beat") == first + 2
    assert sorted(drain(queue)) == ["beat@1", "beat@1", "beat@2", "beat@3"]


def test_an_idle_wait_beside_many_scheduled_messages_is_no_busy_loop(queues, client, name,
                                                                      monkeypatch):
    """20,000 messages due in an hour: a waiting dequeue blocks in BLMOVE, a few commands."""
    queue = queues()
    due = (client.time()[0] + 3600) * 1000
    client.zadd(f"tempest:{{{name}}}:scheduled", {
        f"{i:016d}".encode() + f'["id-{i}","Task"]'.encode(): due + i for i in range(20_000)})
    assert queue.scheduled_count() == 20_000 and len(queue) == 0
    counter = CommandCounter(monkeypatch)
    assert queue.dequeue(timeout=2) is None
    assert len(counter.sent) <= 4, counter.sent
    assert "BLMOVE" in counter.sent


def test_a_waiting_dequeue_takes_a_delayed_message_soon_after_its_time(queues):
    """Lateness stays far below a BLMOVE timeout's precision (the server's hz)."""
    queue, producer = queues(), queues()
    late = []
    for i in range(5):
        producer.schedule([f"id-{i}", "Task"], delay=0.25)
        due = time.monotonic() + 0.25
        message = queue.dequeue(timeout=10)
        late.append(time.monotonic() - due)
        assert message == [f"id-{i}", "Task"]
        queue.ack(message)
    assert sorted(late)[2] < 0.05, late


def test_a_late_ack_of_a_prioritised_message(queues, client, name):
    """Recovered into waiting:<p> and not yet taken: the late ack removes it there."""
    dead, other = queues(lease=0.3), queues(lease=0.3)
    dead.schedule(["id-high", "Task"], priority=5)
    message = dead.dequeue()
    wait_for(lambda: swept(other) == 1, 10)
    dead.ack(message)
    assert len(other) == 0 and other.dequeue() is None
    assert not client.exists(f"tempest:{{{name}}}:waiting:5")


# -- enqueue's bare LPUSH ---------------------------------------------------------------


def test_enqueues_are_bare_lpushes_while_only_waiting_holds_messages(queues, client,
                                                                     monkeypatch):
    """After a store script that saw nothing scheduled or prioritised, the enqueues of
    the next 50 ms (here: 30 s) are one LPUSH each, storing what the script stores."""
    monkeypatch.setattr(redis_module, "_RECHECK", 30.0)
    producer, consumer = queues(), queues()
    counter = CommandCounter(monkeypatch)
    for i in range(4):
        producer.enqueue([f"id-{i}", "Task", i])
    assert counter.sent == ["EVALSHA", "LPUSH", "LPUSH", "LPUSH"]
    assert client.lrange(f"{producer.prefix}waiting", 0, -1) == [
        b'["id-3","Task",3]', b'["id-2","Task",2]', b'["id-1","Task",1]',
        b'["id-0","Task",0]']
    assert drain(consumer) == ["id-0", "id-1", "id-2", "id-3"]


def test_enqueues_run_the_script_again_after_50_ms(queues, monkeypatch):
    """Past the window, the next enqueue looks again by script."""
    producer = queues()
    producer.enqueue(["id-0", "Task"])
    producer._plain_until = time.monotonic() - 0.001  # the window has passed
    counter = CommandCounter(monkeypatch)
    producer.enqueue(["id-1", "Task"])
    producer.enqueue(["id-2", "Task"])
    assert counter.sent[0] == "EVALSHA"
    assert counter.sent[1] in ("LPUSH", "EVALSHA")  # LPUSH unless this machine stalled 50 ms


@pytest.mark.parametrize("store", ["delayed", "prioritised", "retried", "fired"])
def test_own_delayed_or_ranked_stores_end_the_bare_lpushes(queues, monkeypatch, store):
    """Once this object stored a delayed, prioritised, retried or fired message, its
    enqueues run the script, which makes due messages ready first: a message enqueued
    after another's time comes after it. With nothing left scheduled or prioritised,
    LPUSH comes back."""
    monkeypatch.setattr(redis_module, "_RECHECK", 30.0)
    producer = queues()
    producer.enqueue(["id-first", "Task"])  # the script: bare LPUSHes from now on
    due = time.time() + 0.05
    if store == "delayed":
        producer.schedule(["id-stored", "Task"], delay=0.05)
    elif store == "prioritised":
        producer.schedule(["id-stored", "Task"], priority=1)
    elif store == "retried":
        producer.enqueue(["id-stored", "Task"])
        assert drain_one(producer) == "id-first"
        message = producer.dequeue()
        producer.retry(message, delay=0.05, failed_at=time.time())
    else:
        assert producer.fire("every-1", due, ["id-stored", "Task"], keep=60)
    wait_for(lambda: time.time() > due + 0.01, 5)
    counter = CommandCounter(monkeypatch)
    producer.enqueue(["id-after", "Task"])
    assert counter.sent == ["EVALSHA"]
    order = drain(queues())
    assert order.index("id-stored") < order.index("id-after") == len(order) - 1
    counter.sent.clear()
    producer.enqueue(["id-again", "Task"])  # the script, unless the last one saw nothing
    producer.enqueue(["id-again-2", "Task"])
    assert counter.sent[-1] == "LPUSH"


def drain_one(queue: RedisQueue) -> Any:
    """Dequeue and ack one message; its first field."""
    message = queue.dequeue()
    assert message is not None
    queue.ack(message)
    return message[0]


# -- results ---------------------------------------------------------------------------------


def named(url: str, tag: str) -> str:
    """*url* with the client name *tag*: CLIENT LIST shows that queue's connections."""
    return f"{url}{'&' if '?' in url else '?'}client_name={tag}"


def blocked(client: Any, tag: str) -> int:
    """Connections named *tag* blocked in a command (a waiting BLMOVE) right now."""
    return sum(1 for each in client.client_list()
               if each.get("name") == tag and "b" in each.get("flags", ""))


def server_time(client: Any) -> float:
    """The Redis server's clock, POSIX seconds."""
    seconds, micros = client.time()
    return float(seconds + micros / 1_000_000)


def record_of(task_id: str, value: Any = 42) -> dict[str, Any]:
    """A result record as the engine makes it."""
    return {"task_id": task_id, "task": "Task", "state": "succeeded", "value": value,
            "error_type": None, "error": None, "traceback": None, "attempts": 1,
            "finished_at": time.time()}


class Waiter:
    """``queue.result(task_id, timeout)`` in a thread of its own: what and when it returned."""

    def __init__(self, queue: RedisQueue, task_id: str, timeout: float | None = 10) -> None:
        self.value: Any = None
        self.woke_at = math.nan
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(queue, task_id, timeout),
                                       daemon=True)
        self.thread.start()

    def _run(self, queue: RedisQueue, task_id: str, timeout: float | None) -> None:
        try:
            self.value = queue.result(task_id, timeout)
        except BaseException as exc:  # reported by join()
            self.error = exc
        self.woke_at = time.monotonic()

    def join(self, timeout: float = 15) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "result() did not return"
        if self.error is not None:
            raise self.error
        return self.value


def test_result_ttl_travels_with_a_scheduled_message(queues, client):
    """schedule(result_ttl=) stores the \\xffr header outermost; dequeue brings it back;
    enqueue stores none; priority and delay work as ever."""
    queue = queues()
    queue.schedule(["id-r", "Task", 1], result_ttl=2.5)
    queue.enqueue(["id-plain", "Task"])
    queue.schedule(["id-ranked", "Task"], priority=3, result_ttl=0.3)
    queue.schedule(["id-later", "Task"], delay=0.05, result_ttl=86400.0)
    assert client.lrange(f"{queue.prefix}waiting:3", 0, -1) == [
        b'\xffr300\n\xffp3\n["id-ranked","Task"]']
    assert b'\xffr2500\n["id-r","Task",1]' in client.lrange(f"{queue.prefix}waiting", 0, -1)
    ranked, first, plain = queue.dequeue(), queue.dequeue(), queue.dequeue()
    assert (ranked, first, plain) == (["id-ranked", "Task"], ["id-r", "Task", 1],
                                      ["id-plain", "Task"])
    assert queue.result_ttl(ranked) == 0.3 and queue.attempts(ranked) == 0
    assert queue.result_ttl(first) == 2.5
    assert queue.result_ttl(plain) is None
    later = queue.dequeue(timeout=10)
    assert later == ["id-later", "Task"] and queue.result_ttl(later) == 86400.0
    for message in (ranked, first, plain, later):
        queue.ack(message)
    assert in_flight(client, queue.name) == 0 and len(queue) == 0


def test_result_ttl_of_a_message_not_held_is_an_error(queues):
    """As attempts(): ValueError for a message this object does not hold (or settled)."""
    queue = queues()
    queue.schedule(["id-r", "Task"], result_ttl=5)
    message = queue.dequeue()
    assert queue.result_ttl(message) == 5.0
    with pytest.raises(ValueError, match="result_ttl"):
        queue.result_ttl(["id-r", "Task"])  # equal, but not the object handed out
    queue.ack(message)
    with pytest.raises(ValueError, match="result_ttl"):
        queue.result_ttl(message)


@pytest.mark.parametrize("ttl", [0, -1, math.inf, math.nan, "5", True])
def test_a_bad_result_ttl_is_refused(queues, ttl):
    """schedule(result_ttl=) and store_result(ttl=) take seconds > 0; nothing is stored."""
    queue = queues()
    with pytest.raises(ValueError, match="seconds > 0"):
        queue.schedule(["id-r", "Task"], result_ttl=ttl)
    with pytest.raises(ValueError, match="seconds > 0"):
        queue.store_result("id-r", record_of("id-r"), ttl=ttl)
    assert len(queue) == 0 and queue.result("id-r", timeout=0) is None


def test_requeue_keeps_the_result_ttl(queues):
    queue = queues()
    queue.schedule(["id-r", "Task"], priority=-2, result_ttl=7.25)
    for _ in range(3):
        message = queue.dequeue()
        assert message == ["id-r", "Task"] and queue.result_ttl(message) == 7.25
        queue.requeue(message)
    message = queue.dequeue()
    assert queue.result_ttl(message) == 7.25 and queue.attempts(message) == 0
    queue.ack(message)
    assert len(queue) == 0


def test_recovery_keeps_the_result_ttl(queues, client, name):
    """A dead consumer's result message returns to its own priority's list, header kept;
    another queue object takes it with its ttl, its delivery counted."""
    dead, other = queues(lease=0.3), queues(lease=0.3)
    dead.schedule(["id-high", "Task"], priority=5, result_ttl=1.5)
    dead.schedule(["id-plain", "Task"], result_ttl=2)
    assert [dead.dequeue()[0] for _ in range(2)] == ["id-high", "id-plain"]  # then dies
    wait_for(lambda: swept(other) == 2, 10)
    assert client.lrange(f"tempest:{{{name}}}:waiting:5", 0, -1) == [
        b'\xffr1500\n\xffp5\n["id-high","Task"]']
    assert client.hlen(f"tempest:{{{name}}}:deliveries") == 2
    high, plain = other.dequeue(), other.dequeue()
    assert high == ["id-high", "Task"] and other.result_ttl(high) == 1.5
    assert plain == ["id-plain", "Task"] and other.result_ttl(plain) == 2.0
    other.ack(high)
    other.ack(plain)
    assert not client.exists(f"tempest:{{{name}}}:deliveries")
    assert in_flight(client, name) == 0 and len(other) == 0


def test_retry_keeps_the_result_ttl_and_counts_the_attempt(queues, client):
    """The retried message keeps the header outermost, before the new attempts header."""
    queue = queues()
    queue.schedule(["id-r", "Task", 1], priority=4, result_ttl=0.25)
    message = queue.dequeue()
    queue.retry(message, delay=0, failed_at=1_700_000_000.5)
    assert client.lrange(f"{queue.prefix}waiting:4", 0, -1) == [
        b'\xffr250\n\xffa1,1700000000.5\n\xffp4\n["id-r","Task",1]']
    again = queue.dequeue()
    assert again == ["id-r", "Task", 1]
    assert queue.result_ttl(again) == 0.25 and queue.attempts(again) == 1
    queue.retry(again, delay=0.05, failed_at=1_700_000_001.0)
    third = queue.dequeue(timeout=10)
    assert queue.result_ttl(third) == 0.25 and queue.attempts(third) == 2
    queue.ack(third)
    assert in_flight(client, queue.name) == 0 and len(queue) == 0


def fail_record(message: list[Any], attempts: int) -> dict[str, Any]:
    return {"task_id": message[0], "task": message[1], "args": message[2:],
            "attempts": attempts, "error_type": "ValueError", "error": "boom",
            "traceback": "Traceback ...", "last_failed_at": time.time()}


def test_the_failed_store_and_retry_failed_drop_the_result_ttl(queues, client):
    """fail() of a result message: its entry is whole (priority, first failure); the
    message retry_failed (and retry_failed_all) store again asks for no result."""
    queue = queues()
    queue.schedule(["id-a", "Task", 1], priority=2, result_ttl=9)
    queue.schedule(["id-b", "Task", 2], result_ttl=9)
    first = queue.dequeue()
    queue.retry(first, delay=0, failed_at=1_700_000_000.25)
    a, b = queue.dequeue(), queue.dequeue()
    assert (a[0], b[0]) == ("id-a", "id-b") and queue.attempts(a) == 1
    queue.fail(a, fail_record(a, 2), keep=100, ttl=3600)
    queue.fail(b, fail_record(b, 1), keep=100, ttl=3600)
    entry = queue.find_failed("id-a")
    assert entry is not None
    assert (entry["task"], entry["args"], entry["priority"], entry["first_failed_at"]) == (
        "Task", [1], 2, 1_700_000_000.25)
    assert queue.failed_count() == 2 and queue.find_failed("id-b")["priority"] == 0
    assert b"\xffr" not in client.hget(f"{queue.prefix}failed", "id-a")
    assert queue.retry_failed("id-a") is True
    message = queue.dequeue()
    assert message == ["id-a", "Task", 1]
    assert queue.result_ttl(message) is None and queue.attempts(message) == 0
    queue.ack(message)
    assert queue.retry_failed_all() == 1
    message = queue.dequeue()
    assert message == ["id-b", "Task", 2] and queue.result_ttl(message) is None
    queue.ack(message)
    assert len(queue) == 0 and queue.failed_count() == 0


def test_late_settles_and_poison_of_result_messages(queues, client, name):
    """The scripts that read the priority or the JSON skip the header: a late ack finds
    the recovered entry in its priority's list; rejected() and poison hold bare JSON."""
    dead, other = queues(lease=0.3, max_deliveries=2), queues(lease=0.3, max_deliveries=2)
    dead.schedule(["id-late", "Task"], priority=5, result_ttl=4)
    message = dead.dequeue()
    wait_for(lambda: swept(other) == 1, 10)
    dead.ack(message)  # late: no one took it yet
    assert len(other) == 0 and not client.exists(f"tempest:{{{name}}}:waiting:5")
    other.schedule(["id-bad", "Task"], priority=-1, result_ttl=4)
    other.reject(other.dequeue(), "UnknownTask")
    assert other.rejected() == [(["id-bad", "Task"], "UnknownTask")]
    other.schedule(["id-poison", "Task"], result_ttl=4)
    assert queues(lease=0.3).dequeue() == ["id-poison", "Task"]  # and its consumer dies
    wait_for(lambda: swept(other) == 1, 10)  # given back, its header kept
    assert queues(lease=0.3).dequeue() == ["id-poison", "Task"]  # and dies too
    wait_for(lambda: swept(other) == 0 and len(other.rejected()) == 2, 10)
    assert other.rejected()[-1] == (["id-poison", "Task"], POISON_REASON)
    assert client.lrange(f"tempest:{{{name}}}:rejected", 0, -1)[-1] == (
        POISON_REASON.encode() + b'\n["id-poison","Task"]')


def test_schedule_asking_only_for_its_result_takes_the_bare_lpush(queues, client,
                                                                     monkeypatch):
    """Ready now, priority 0: enqueue's bare LPUSH with the header in front; delayed or
    prioritised: the store script."""
    monkeypatch.setattr(redis_module, "_RECHECK", 30.0)
    queue = queues()
    queue.enqueue(["id-0", "Task"])  # the script: bare LPUSHes from now on
    counter = CommandCounter(monkeypatch)
    queue.schedule(["id-r", "Task"], result_ttl=3)
    queue.enqueue(["id-1", "Task"])
    assert counter.sent == ["LPUSH", "LPUSH"]
    assert client.lrange(f"{queue.prefix}waiting", 0, -1) == [
        b'["id-1","Task"]', b'\xffr3000\n["id-r","Task"]', b'["id-0","Task"]']
    assert drain(queue) == ["id-0", "id-r", "id-1"]
    queue.schedule(["id-p", "Task"], priority=1, result_ttl=3)
    assert counter.sent[-1] == "EVALSHA"
    queue.enqueue(["id-2", "Task"])  # the script saw a priority: no bare LPUSH
    queue.schedule(["id-d", "Task"], delay=0, result_ttl=3)
    assert counter.sent[-2:] == ["EVALSHA", "EVALSHA"]
    assert drain(queue) == ["id-p", "id-2", "id-d"]


def test_store_result_then_result(queues, client):
    """The record comes back as stored, expires_at added (server's clock + ttl); a second
    store replaces it; the keys expire with the ttl."""
    queue = queues()
    record = record_of("id-r", {"nested": [1, 2.5, "x"]})
    before = server_time(client)
    queue.store_result("id-r", {**record, "expires_at": 1.0}, ttl=60)
    after = server_time(client)
    got = queue.result("id-r", timeout=0)
    assert got is not None
    assert {key: value for key, value in got.items() if key != "expires_at"} == record
    assert before + 60 <= got["expires_at"] <= after + 60
    key = f"{queue.prefix}result:id-r"
    assert 0 < client.pttl(key) <= 60_000
    assert [json.loads(value) for value in client.lrange(key, 0, -1)] == [got]
    queue.store_result("id-r", {**record, "value": "second", "state": "failed"}, ttl=120)
    again = queues().result("id-r", timeout=0)  # any queue object of this name
    assert again["value"] == "second" and again["state"] == "failed"
    assert again["expires_at"] >= before + 120
    assert [json.loads(value) for value in client.lrange(key, 0, -1)] == [again]  # one
    assert 60_000 < client.pttl(key) <= 120_000


def test_store_result_refuses_what_it_cannot_store(queues):
    queue = queues()
    with pytest.raises(ValueError, match="task_id"):
        queue.store_result("", record_of(""), ttl=5)
    with pytest.raises(TypeError):
        queue.store_result("id-r", ["not", "a", "dict"], ttl=5)
    with pytest.raises(TypeError):
        queue.store_result("id-r", {"value": object()}, ttl=5)
    with pytest.raises(ValueError):
        queue.store_result("id-r", {"value": math.nan}, ttl=5)
    assert queue.result("id-r", timeout=0) is None
    queue.store_result("id-empty", {}, ttl=5)
    assert set(queue.result("id-empty", timeout=0)) == {"expires_at"}


def test_store_result_and_ack_is_one_script_storing_then_acking(queues, client, name,
                                                                 monkeypatch):
    """The record stored and the message out of the in-flight list, in one command; the
    message is no longer held; a recovered one still waiting is removed there."""
    queue = queues()
    queue.schedule(["id-a", "Task"], result_ttl=60)
    message = queue.dequeue(timeout=1)
    counter = CommandCounter(monkeypatch)
    queue.store_result_and_ack(message, "id-a", record_of("id-a", 7), ttl=60)
    monkeypatch.undo()
    assert counter.sent == ["EVALSHA"]
    assert queue.result("id-a", timeout=0)["value"] == 7
    assert in_flight(client, name) == 0 and len(queue) == 0
    with pytest.raises(ValueError, match="not a message this queue object dequeued"):
        queue.ack(message)
    # Recovered after its lease (back in waiting): the ack removes it there.
    queue.schedule(["id-b", "Task"], result_ttl=60)
    held = queue.dequeue(timeout=1)
    client.rpush(f"{queue.prefix}waiting",
                 client.rpop(f"{queue.prefix}inflight:{queue.consumer}"))
    queue.store_result_and_ack(held, "id-b", record_of("id-b"), ttl=60)
    assert len(queue) == 0 and in_flight(client, name) == 0
    assert queue.result("id-b", timeout=0)["value"] == 42


def test_store_result_and_ack_refuses_before_storing(queues, client, name):
    """A message not held, or a record that cannot be stored: nothing stored, nothing
    acked (the held message stays leased and can be acked after)."""
    queue = queues()
    with pytest.raises(ValueError, match="not a message this queue object dequeued"):
        queue.store_result_and_ack(["id-x", "Task"], "id-x", record_of("id-x"), ttl=5)
    assert queue.result("id-x", timeout=0) is None
    queue.enqueue(["id-y", "Task"])
    message = queue.dequeue(timeout=1)
    with pytest.raises(TypeError):
        queue.store_result_and_ack(message, "id-y", {"value": object()}, ttl=5)
    with pytest.raises(ValueError, match="ttl"):
        queue.store_result_and_ack(message, "id-y", record_of("id-y"), ttl=0)
    assert queue.result("id-y", timeout=0) is None and in_flight(client, name) == 1
    queue.ack(message)
    assert in_flight(client, name) == 0


def test_store_result_and_ack_that_fails_leaves_the_message_leased(queues, client, name,
                                                                   monkeypatch):
    """A connection error: raised, never deferred as an ack (it would go without its
    result); the message stays leased and in flight, and can be settled after."""
    queue = queues()
    queue.enqueue(["id-z", "Task"])
    message = queue.dequeue(timeout=1)

    def broken(**kwargs: Any) -> Any:
        raise redis.ConnectionError("Redis went away")

    monkeypatch.setattr(queue, "_store_result_ack_script", broken)
    with pytest.raises(redis.ConnectionError):
        queue.store_result_and_ack(message, "id-z", record_of("id-z"), ttl=5)
    assert not queue._deferred and in_flight(client, name) == 1
    assert queue.result("id-z", timeout=0) is None
    monkeypatch.undo()
    queue.store_result_and_ack(message, "id-z", record_of("id-z"), ttl=5)
    assert in_flight(client, name) == 0 and queue.result("id-z", timeout=0)["value"] == 42


def test_result_of_an_unknown_id(queues):
    """timeout=0: None at once; timeout=0.2: None after about 0.2 s."""
    queue = queues()
    started = time.monotonic()
    assert queue.result("id-none", timeout=0) is None
    assert queue.result("", timeout=0) is None
    assert time.monotonic() - started < 0.1
    started = time.monotonic()
    assert queue.result("id-none", timeout=0.2) is None
    assert 0.19 <= time.monotonic() - started < 1.5


def test_a_waiting_result_wakes_promptly_when_another_queue_stores_it(redis_url, queues,
                                                                      client):
    """Blocked in BLMOVE, woken by another queue object's store: well under a second
    every time (median of five), so never a poll once a second."""
    tag = f"waiter-{uuid.uuid4().hex[:8]}"
    queue, producer = queues(named(redis_url, tag)), queues()
    lags = []
    for i in range(5):
        waiter = Waiter(queue, f"id-{i}")
        wait_for(lambda: blocked(client, tag) == 1, 10)
        stored = time.monotonic()
        producer.store_result(f"id-{i}", record_of(f"id-{i}", i), ttl=60)
        assert waiter.join()["value"] == i
        lags.append(waiter.woke_at - stored)
    assert max(lags) < 2 and sorted(lags)[2] < 0.2, lags


def test_several_waiters_on_one_id_all_wake_and_others_only_for_theirs(redis_url, queues,
                                                                        client):
    tag = f"waiter-{uuid.uuid4().hex[:8]}"
    queue, producer = queues(named(redis_url, tag)), queues()
    on_a = [Waiter(queue, "id-a") for _ in range(4)]
    on_b = [Waiter(queues(named(redis_url, tag)), "id-b") for _ in range(2)]
    wait_for(lambda: blocked(client, tag) == 6, 10)
    stored = time.monotonic()
    producer.store_result("id-a", record_of("id-a", "a"), ttl=60)
    assert [waiter.join()["value"] for waiter in on_a] == ["a"] * 4
    assert max(waiter.woke_at for waiter in on_a) - stored < 2
    wait_for(lambda: blocked(client, tag) == 2, 10)  # those on id-b wait on
    assert all(waiter.thread.is_alive() for waiter in on_b)
    producer.store_result("id-b", record_of("id-b", "b"), ttl=60)
    assert [waiter.join()["value"] for waiter in on_b] == ["b"] * 2


def test_waiting_results_leave_dequeues_and_acks_alone(redis_url, queues, client):
    """Waiters hold pool connections of their own: the same queue object goes on working."""
    tag = f"waiter-{uuid.uuid4().hex[:8]}"
    queue = queues(named(redis_url, tag))
    waiters = [Waiter(queue, f"id-{i}") for i in range(8)]
    wait_for(lambda: blocked(client, tag) == 8, 10)
    started = time.monotonic()
    for i in range(20):
        queue.schedule([f"m-{i}", "Task"], result_ttl=60)
    for _ in range(20):
        message = queue.dequeue(timeout=5)
        queue.store_result(message[0], record_of(message[0]), ttl=60)
        queue.ack(message)
    assert time.monotonic() - started < 5
    for i, waiter in enumerate(waiters):
        queue.store_result(f"id-{i}", record_of(f"id-{i}", i), ttl=60)
        assert waiter.join()["value"] == i
    assert in_flight(client, queue.name) == 0


def test_an_expired_result_is_not_returned(queues, client):
    """Past its expires_at (the server's clock) a record is gone, and its wake list too:
    neither a look nor a bounded wait returns it."""
    queue = queues()
    queue.store_result("id-short", record_of("id-short"), ttl=0.3)
    first = queue.result("id-short", timeout=0)
    assert first is not None and first["expires_at"] > server_time(client)
    while (before := server_time(client)) < first["expires_at"] + 1:
        got = queue.result("id-short", timeout=0)
        if got is None:
            break
        assert got["expires_at"] > before - 0.002  # never past it (to the ms Redis keeps)
        threading.Event().wait(0.01)
    assert server_time(client) >= first["expires_at"] - 0.002
    started = time.monotonic()
    assert queue.result("id-short", timeout=0.2) is None
    assert time.monotonic() - started >= 0.19
    queue.store_result("id-other", record_of("id-other"), ttl=60)
    assert not client.exists(f"{queue.prefix}result:id-short")
    assert {key.decode() for key in client.scan_iter(match=f"{queue.prefix}result*")} == {
        f"{queue.prefix}result:id-other"}


def test_a_result_costs_its_waiter_one_command(queues, monkeypatch):
    """Stored before the wait or during it, the record comes back with the BLMOVE that
    waited for it: no read before the wait, none after it."""
    queue, producer = queues(), queues()
    producer.store_result("id-before", record_of("id-before", 1), ttl=60)
    counter = CommandCounter(monkeypatch)
    assert queue.result("id-before", timeout=5)["value"] == 1
    assert counter.sent == ["BLMOVE"]
    waiter = Waiter(queue, "id-during")
    wait_for(lambda: counter.sent.count("BLMOVE") == 2, 10)
    producer.store_result("id-during", record_of("id-during", 2), ttl=60)
    assert waiter.join()["value"] == 2
    assert [name for name in counter.sent
            if not name.startswith(("EVALSHA", "SCRIPT"))] == ["BLMOVE", "BLMOVE"]


def test_named_queues_keep_their_results_apart(redis_url, queues, name):
    other_name = f"{name}-other"
    other = RedisQueue(redis_url, other_name)
    try:
        queue = queues()
        queue.store_result("id-r", record_of("id-r", "mine"), ttl=60)
        assert other.result("id-r", timeout=0) is None
        other.store_result("id-r", record_of("id-r", "theirs"), ttl=60)
        assert queue.result("id-r", timeout=0)["value"] == "mine"
        theirs = other.result("id-r", timeout=0)
        assert theirs is not None and theirs["value"] == "theirs"
    finally:
        other.close()
        delete_queue(redis_url, other_name)


def test_a_result_stored_by_another_process_wakes_a_waiter_here(redis_url, queues, client,
                                                                 name):
    tag = f"waiter-{uuid.uuid4().hex[:8]}"
    queue = queues(named(redis_url, tag))
    waiter = Waiter(queue, "id-x", timeout=30)
    wait_for(lambda: blocked(client, tag) == 1, 10)
    code = (
        "import sys, time\n"
        "from tempest.queues.redis import RedisQueue\n"
        "queue = RedisQueue(sys.argv[1], sys.argv[2])\n"
        "record = {'task_id': 'id-x', 'state': 'succeeded', 'value': 'from afar'}\n"
        "queue.store_result('id-x', record, ttl=60)\n"
        "print(time.monotonic())\n")
    done = subprocess.run([sys.executable, "-c", code, redis_url, name], cwd=REPO,
                          capture_output=True, text=True, timeout=30, check=True)
    stored = float(done.stdout.split()[-1])  # CLOCK_MONOTONIC: shared by processes here
    assert waiter.join()["value"] == "from afar"
    assert waiter.woke_at - stored < 1.0


# -- engine records, outcomes and inspection --------------------------------------------


def drained(queue: RedisQueue) -> list[str]:
    """The task ids *queue* dequeues (and acks) until it is empty."""
    ids = []
    while (message := queue.dequeue()) is not None:
        ids.append(message[0])
        queue.ack(message)
    return ids


def test_peek_skips_wake_tokens_and_pages_past_them(queues, client, name):
    """Wake tokens anywhere in ``waiting`` are neither listed nor counted by the pages."""
    queue = queues()
    waiting = f"tempest:{{{name}}}:waiting"
    for i in range(6):
        client.lpush(waiting, f'["id-{i}","T"]')
        if i % 2:
            client.lpush(waiting, b"\xffwake")
    client.rpush(waiting, b"\xffwake", b"\xffwake")  # at the taking end too
    order = [f"id-{i}" for i in range(6)]
    assert [e["message"][0] for e in queue.peek()] == order
    for offset in range(8):
        for limit in (1, 2, 5):
            page = [e["message"][0] for e in queue.peek(limit, offset)]
            assert page == order[offset:offset + limit], (limit, offset)
    assert drained(queue) == order


def test_peek_lists_due_messages_where_the_next_script_puts_them(queues, client, name):
    """Delayed messages whose time came, not yet made ready by a script, are listed at
    the back of their priority's list, as the next take will find them."""
    queue = queues()
    prefix = f"tempest:{{{name}}}:"
    queue.enqueue(["id-plain", "T"])
    queue.schedule(["id-high", "T"], priority=2)
    past = (time.time() - 10) * 1000
    client.zadd(f"{prefix}scheduled", {b"%016d" % 1 + b'\xffp2\n["id-due-high","T"]': past,
                                       b"%016d" % 2 + b'["id-due-plain","T"]': past + 1})
    order = ["id-high", "id-due-high", "id-plain", "id-due-plain"]
    assert [e["message"][0] for e in queue.peek()] == order
    assert [e["priority"] for e in queue.peek()] == [2, 2, 0, 0]
    assert [e["message"][0] for e in queue.peek(2, 1)] == order[1:3]
    assert queue.peek_scheduled() == []
    assert queue.find("id-due-high")["status"] == "waiting"
    assert drained(queue) == order


def test_inspection_changes_no_key(queues, client, name):
    """peek, peek_scheduled, find and the rejected listing write nothing."""
    queue = queues()
    queue.enqueue(["id-leased", "T"])
    held = queue.dequeue()
    queue.schedule(["id-later", "T"], delay=60, priority=3)
    queue.schedule(["id-ready", "T"], priority=-2)
    queue.enqueue(["id-plain", "T"])
    queue.reject(queue.dequeue(), "Nope")  # the priority 0 one: id-plain
    keys = sorted(client.scan_iter(match=f"tempest:{{{name}}}:*", count=1000))
    before = {key: client.dump(key) for key in keys}
    assert [e["message"][0] for e in queue.peek()] == ["id-ready"]
    assert [e["message"][0] for e in queue.peek_scheduled()] == ["id-later"]
    assert queue.find("id-leased")["status"] == "leased"
    assert queue.find("id-later")["status"] == "scheduled"
    assert queue.rejected(1) == [(["id-plain", "T"], "Nope")] and queue.rejected_count() == 1
    after = sorted(client.scan_iter(match=f"tempest:{{{name}}}:*", count=1000))
    assert after == keys and {key: client.dump(key) for key in keys} == before
    queue.ack(held)


def test_peek_pages_through_more_than_a_script_takes(queues, client, name):
    """A page of more than 1000 messages comes from several scripts, in order."""
    queue = queues()
    pipe = client.pipeline()
    for i in range(2500):
        pipe.lpush(f"tempest:{{{name}}}:waiting", f'["id-{i}","T"]')
    pipe.execute()
    listed = queue.peek(limit=2100, offset=200)
    assert [e["message"][0] for e in listed] == [f"id-{i}" for i in range(200, 2300)]
    assert queue.find("id-2499")["message"] == ["id-2499", "T"]


def test_engine_records_and_outcomes_are_keys_that_expire(queues, client, name):
    """An engine's record is a key with PX beside an index pruned by announce; an outcome
    bucket is a hash per minute that expires 3900 s after its last count."""
    queue = queues()
    prefix = f"tempest:{{{name}}}:"
    queue.announce("e-1", {"engine_id": "e-1"}, 30)
    assert 29_000 < client.pttl(f"{prefix}engine:e-1") <= 30_000
    assert client.zrange(f"{prefix}engines", 0, -1) == [b"e-1"]
    assert 29_000 < client.pttl(f"{prefix}engines") <= 30_000  # gone with its last member
    queue.announce("e-2", {"engine_id": "e-2"}, 0.2)
    wait_for(lambda: [e["engine_id"] for e in queue.engines()] == ["e-1"], 10)
    assert client.zrange(f"{prefix}engines", 0, -1) == [b"e-2", b"e-1"]  # reads only read
    queue.announce("e-1", {"engine_id": "e-1"}, 30)
    assert client.zrange(f"{prefix}engines", 0, -1) == [b"e-1"]  # pruned by announce
    queue.forget_engine("e-1")
    assert client.exists(f"{prefix}engine:e-1", f"{prefix}engines") == 0
    minute = int(time.time() // 60) * 60
    queue.add_outcomes(minute, {"succeeded": 2, "timed_out": 1})
    assert client.hgetall(f"{prefix}outcomes:{minute}") == {b"succeeded": b"2",
                                                            b"timed_out": b"1"}
    assert 3800 < client.ttl(f"{prefix}outcomes:{minute}") <= 3900
    client.delete(f"{prefix}outcomes:{minute}")  # expired: gone from the listing too
    assert queue.outcomes(0) == {}


def test_engines_and_outcomes_change_no_key(queues, client, name):
    """engines() and outcomes() only read (they may run on a read-only replica): expired
    index members are left out, not pruned; announce and add_outcomes prune them."""
    queue = queues()
    prefix = f"tempest:{{{name}}}:"
    minute = int(time.time() // 60) * 60
    queue.announce("e-live", {"engine_id": "e-live"}, 60)
    queue.add_outcomes(minute, {"succeeded": 1})
    # Members whose time passed, their keys still there: the score decides.
    client.zadd(f"{prefix}engines", {"e-gone": 1})
    client.set(f"{prefix}engine:e-gone", '{"engine_id": "e-gone"}')
    client.zadd(f"{prefix}outcomes", {str(minute - 60): 1})
    client.hset(f"{prefix}outcomes:{minute - 60}", "failed", 4)
    keys = sorted(client.scan_iter(match=f"{prefix}*", count=1000))
    before = {key: client.dump(key) for key in keys}
    assert queue.engines() == [{"engine_id": "e-live"}]
    assert queue.outcomes(0) == {minute: {"succeeded": 1}}
    assert sorted(client.scan_iter(match=f"{prefix}*", count=1000)) == keys
    assert {key: client.dump(key) for key in keys} == before
    assert client.zcard(f"{prefix}engines") == 2 and client.zcard(f"{prefix}outcomes") == 2
    queue.announce("e-live", {"engine_id": "e-live"}, 60)
    assert client.zrange(f"{prefix}engines", 0, -1) == [b"e-live"]
    queue.add_outcomes(minute, {"succeeded": 1})
    assert client.zrange(f"{prefix}outcomes", 0, -1) == [str(minute).encode()]
    assert queue.outcomes(0) == {minute: {"succeeded": 2}}
