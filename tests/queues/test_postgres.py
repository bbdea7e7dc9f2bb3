"""PostgresQueue: the queue contract, then what only a shared PostgreSQL table gives."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tempest import ConfigurationError, Task
from tempest.queues import PostgresQueue, protocol
from tempest.queues import postgres as postgres_module
from tempest.testing import QueueContract

from ..conftest import main_log, wait_for
from .engines import EngineProcessChecks, EngineProcesses

try:
    import psycopg
except ImportError:  # the postgres_dsn fixture skips (on CI: fails) the tests needing it
    psycopg = None

REPO = Path(__file__).resolve().parents[2]


def drop_tables(dsn: str, table: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {table}, {table}_rejected, {table}_scheduled, "
                     f"{table}_fired, {table}_failed, {table}_results, {table}_engines, "
                     f"{table}_outcomes")


def rows(dsn: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(query, params).fetchall()


def count_statements(queue: PostgresQueue) -> list[int]:
    """Count the statements *queue* sends from now on (in a list, updated in place)."""
    count = [0]
    borrow = queue._connection

    @contextmanager
    def counting() -> Iterator[Any]:
        with borrow() as conn:
            count[0] += 1  # every borrow is for one statement (waits listen on their own)
            yield conn

    queue._connection = counting  # type: ignore[method-assign]
    return count


def with_app_name(dsn: str, name: str) -> str:
    """*dsn* with an application_name, to find (and kill) the queue's backends."""
    return psycopg.conninfo.make_conninfo(dsn, application_name=name)


def terminate(dsn: str, app_name: str) -> int:
    """pg_terminate_backend every backend of *app_name*; wait until they are gone."""
    killed = rows(dsn, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                       "WHERE application_name = %s", app_name)
    wait_for(lambda: not rows(dsn, "SELECT 1 FROM pg_stat_activity "
                                   "WHERE application_name = %s", app_name), 5)
    return len(killed)


class TestPostgresQueueContract(QueueContract):
    """PostgresQueue: each handle is a new consumer on this test's own table."""

    @pytest.fixture(autouse=True)
    def _postgres(self, postgres_dsn: str, _contract_storage: None) -> Iterator[None]:
        self.dsn = postgres_dsn
        self.table = self.storage_name.replace("-", "_")
        yield
        for queue in self._made:
            queue.close()
        drop_tables(self.dsn, self.table)

    def make_queue(self, **options: Any) -> PostgresQueue:
        return PostgresQueue(self.dsn, table=self.table, **options)

    def put_raw(self, queue: PostgresQueue, raw: bytes) -> None:
        len(queue)  # the queue creates its tables on first use
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(f"INSERT INTO {self.table} (queue, body) VALUES (%s, %s)",
                         (queue.name, raw.decode("utf-8", "replace")))


# -- PostgreSQL only ---------------------------------------------------------------------


@pytest.fixture
def table(postgres_dsn: str) -> Iterator[str]:
    """A fresh table name, dropped after the test."""
    name = f"pgtest_{uuid.uuid4().hex[:12]}"
    yield name
    drop_tables(postgres_dsn, name)


@pytest.fixture
def queues(postgres_dsn: str, table: str) -> Iterator[Callable[..., PostgresQueue]]:
    """Make PostgresQueues on the test's table; all are closed afterwards."""
    made: list[PostgresQueue] = []

    def factory(dsn: str | None = None, **options: Any) -> PostgresQueue:
        queue = PostgresQueue(dsn or postgres_dsn, table, **options)
        made.append(queue)
        return queue

    yield factory
    for queue in made:
        queue.close()


def test_waiting_dequeue_wakes_within_a_second_of_an_enqueue(postgres_dsn, queues):
    """LISTEN/NOTIFY: an idle dequeue(timeout=10) returns as soon as another process enqueues."""
    app = f"tempest-test-{uuid.uuid4().hex[:8]}"
    consumer = queues(with_app_name(postgres_dsn, app))
    producer = queues()
    len(consumer)  # the tables exist before anyone waits
    got: list[tuple[Any, float]] = []
    thread = threading.Thread(
        target=lambda: got.append((consumer.dequeue(timeout=10), time.monotonic())))
    thread.start()
    try:
        # Enqueue only once the consumer sits in LISTEN, so the wake-up is the NOTIFY's.
        wait_for(lambda: rows(postgres_dsn, "SELECT 1 FROM pg_stat_activity WHERE "
                                            "application_name = %s AND state = 'idle' "
                                            "AND query LIKE 'LISTEN%%'", app), 5)
        sent = time.monotonic()
        producer.enqueue(["id-n", "Task", 1])
    finally:
        thread.join(15)
    message, received = got[0]
    assert list(message) == ["id-n", "Task", 1]
    assert received - sent < 1.0


def listening(dsn: str, app: str) -> list[tuple[Any, ...]]:
    """The backends of *app* whose last statement was a LISTEN (so: listening now)."""
    return rows(dsn, "SELECT pid FROM pg_stat_activity WHERE application_name = %s "
                     "AND query LIKE 'LISTEN%%'", app)


def test_idle_waits_keep_one_listener_and_claim_once_a_second(postgres_dsn, queues):
    """Empty waits in a row reuse one LISTENing connection and claim about once a second."""
    app = f"tempest-test-{uuid.uuid4().hex[:8]}"
    queue = queues(with_app_name(postgres_dsn, app))
    len(queue)
    statements = count_statements(queue)
    began = time.monotonic()
    for _ in range(8):
        assert queue.dequeue_many(4, timeout=0.25) == []
    elapsed = time.monotonic() - began
    kept = queue._kept
    assert kept is not None and not kept.conn.closed
    assert len(listening(postgres_dsn, app)) == 1
    # A claim before the first LISTEN, one after it, then one per _RECLAIM seconds.
    assert statements[0] <= 2 + elapsed / postgres_module._RECLAIM + 1
    # Still woken at once by an enqueue from elsewhere.
    producer = queues()
    got: list[tuple[Any, float]] = []
    thread = threading.Thread(
        target=lambda: got.append((queue.dequeue(timeout=10), time.monotonic())))
    thread.start()
    sent = time.monotonic()
    producer.enqueue(["id-k", "Task"])
    thread.join(15)
    message, received = got[0]
    assert list(message) == ["id-k", "Task"] and received - sent < 1.0
    # Busy again: the listener is kept for the next wait for _HANDOFF seconds, then
    # stops listening and returns to the pool.
    wait_for(lambda: queue._kept is None, 5)
    wait_for(lambda: not listening(postgres_dsn, app), 5)


def test_a_wait_that_claimed_hands_its_listener_to_the_next(postgres_dsn, queues,
                                                           monkeypatch):
    """A wait that got messages keeps its LISTENing connection for the next wait: no
    UNLISTEN, no LISTEN between them. One whose claim filled its count makes the next
    claim at once (more may wait, announced before its claim); unused for _HANDOFF
    seconds, it stops listening and goes back to the pool."""
    monkeypatch.setattr(postgres_module, "_RECLAIM", 60.0)  # no claim but the rule's
    monkeypatch.setattr(postgres_module, "_HANDOFF", 30.0)
    app = f"tempest-test-{uuid.uuid4().hex[:8]}"
    queue, producer = queues(with_app_name(postgres_dsn, app)), queues()
    assert queue.dequeue_many(2, timeout=0.1) == []  # listening now, kept
    listener = queue._kept
    assert listener is not None and listener.hold == postgres_module._KEEP
    for i in range(3):
        producer.enqueue([f"id-h{i}", "T"])
    assert len(queue.dequeue_many(2, timeout=5)) == 2  # the notifications: a claim
    kept = queue._kept
    assert kept is not None and kept.conn is listener.conn
    assert kept.hold == postgres_module._HANDOFF and kept.claimed_at is None
    began = time.monotonic()
    assert len(queue.dequeue_many(2, timeout=5)) == 1  # the third, claimed at once
    assert time.monotonic() - began < 2.0
    kept = queue._kept
    assert kept is not None and kept.conn is listener.conn and kept.claimed_at is not None
    (pid,), = listening(postgres_dsn, app)  # one LISTEN in all, on the same backend
    producer.enqueue(["id-h3", "T"])
    assert list(queue.dequeue(timeout=5)) == ["id-h3", "T"]
    assert queue._kept is not None and queue._kept.conn is listener.conn
    assert listening(postgres_dsn, app) == [(pid,)]

    monkeypatch.setattr(postgres_module, "_HANDOFF", 0.1)
    producer.enqueue(["id-h4", "T"])
    assert list(queue.dequeue(timeout=5)) == ["id-h4", "T"]
    wait_for(lambda: queue._kept is None, 5)  # the reaper's UNLISTEN, off the wait
    wait_for(lambda: not listening(postgres_dsn, app), 5)
    assert not listener.conn.closed
    assert any(conn is listener.conn for conn, _ in queue._idle)
    wait_for(lambda: queue._reaper is None, 5)


def test_a_kept_listener_finds_an_expired_lease_without_a_notification(postgres_dsn, queues):
    """A dead consumer's message (its lease ran out: no NOTIFY) reaches a waiting dequeue."""
    dead = queues(lease=1.0)
    waiter = queues()
    dead.enqueue(["id-d", "Task"])
    assert dead.dequeue() is not None  # leased, then never acked nor renewed
    assert waiter.dequeue_many(1, timeout=0.2) == []  # leaves its listener kept
    began = time.monotonic()
    message = waiter.dequeue(timeout=10)
    assert message is not None and list(message) == ["id-d", "Task"]
    assert time.monotonic() - began < 1.0 + 2 * postgres_module._RECLAIM + 1.0


def test_a_kept_listener_is_closed_by_close_or_when_left_unused(postgres_dsn, queues,
                                                                 monkeypatch):
    """close() ends a kept LISTEN; so does the queue's own thread after _KEEP idle seconds."""
    app = f"tempest-test-{uuid.uuid4().hex[:8]}"
    queue = queues(with_app_name(postgres_dsn, app))
    assert queue.dequeue(timeout=0.1) is None
    assert len(listening(postgres_dsn, app)) == 1
    queue.close()
    assert queue._kept is None and queue._reaper is None
    wait_for(lambda: not listening(postgres_dsn, app), 5)

    monkeypatch.setattr(postgres_module, "_KEEP", 0.2)
    assert queue.dequeue(timeout=0.1) is None
    kept = queue._kept
    assert kept is not None
    wait_for(lambda: kept.conn.closed, 5)  # no statement needed: the reaper closed it
    assert queue._kept is None
    wait_for(lambda: queue._reaper is None, 5)
    wait_for(lambda: not listening(postgres_dsn, app), 5)
    queue.enqueue(["id-s", "Task"])
    assert list(queue.dequeue(timeout=1)) == ["id-s", "Task"]


def test_close_during_a_wait_leaves_nothing_listening(postgres_dsn, queues):
    """A wait that ends after close() does not keep its listener."""
    app = f"tempest-test-{uuid.uuid4().hex[:8]}"
    queue = queues(with_app_name(postgres_dsn, app))
    len(queue)
    waiter = threading.Thread(target=lambda: queue.dequeue(timeout=1.0))
    waiter.start()
    wait_for(lambda: listening(postgres_dsn, app), 5)
    queue.close()
    waiter.join(10)
    assert queue._kept is None
    wait_for(lambda: not listening(postgres_dsn, app), 5)


def test_reconnects_after_the_backend_is_terminated(postgres_dsn, queues):
    """A terminated connection fails one enqueue (OperationalError: an INSERT is not
    repeated); the next reconnects. An ack's DELETE is repeated once on a new
    connection instead: the finished message does not come back."""
    app = f"tempest-test-{uuid.uuid4().hex[:8]}"
    queue = queues(with_app_name(postgres_dsn, app))
    queue.enqueue(["id-1", "Task"])
    assert terminate(postgres_dsn, app) >= 1
    with pytest.raises(psycopg.OperationalError):
        queue.enqueue(["id-lost", "Task"])
    queue.enqueue(["id-2", "Task"])
    first, second = queue.dequeue(), queue.dequeue()
    assert [first[0], second[0]] == ["id-1", "id-2"]
    assert terminate(postgres_dsn, app) >= 1  # a lease held across an outage is kept
    queue.ack(first)  # sent again on a new connection
    queue.ack(second)
    assert rows(postgres_dsn, f"SELECT body FROM {queue.table}") == []


class PgSum(Task):
    def process(self, a: int, b: int) -> int:
        return a + b


def test_engine_with_four_threads_drains_500_messages(postgres_dsn, queues, make_engine):
    """An engine in burst mode processes and acks 500 messages, at-least-once."""
    queue = queues()
    engine = make_engine(threads=4, queue=queue)
    for i in range(500):
        engine.submit(PgSum, i, 1)
    engine.run(burst=True)
    stats = engine.stats()
    assert (stats["processed"], stats["succeeded"], stats["queued"]) == (500, 500, 0)
    assert rows(postgres_dsn, f"SELECT count(*) FROM {queue.table}") == [(0,)]
    assert "guarantee=at-least-once" in main_log(engine).splitlines()[0]


def test_engine_rides_out_a_lost_connection(postgres_dsn, queues, make_engine):
    """The engine logs a failed dequeue, the queue reconnects, and the work goes on."""
    app = f"tempest-test-{uuid.uuid4().hex[:8]}"
    queue = queues(with_app_name(postgres_dsn, app))
    producer = queues()
    engine = make_engine(threads=2, queue=queue)
    engine.submit(PgSum, 1, 2)
    engine.start()
    try:
        wait_for(lambda: engine.stats()["processed"] == 1, 10)
        terminate(postgres_dsn, app)
        for i in range(5):
            producer.enqueue([f"after-{i}", "PgSum", i, i])
        wait_for(lambda: engine.stats()["processed"] == 6, 15)
    finally:
        assert engine.stop(timeout=10)
    assert rows(postgres_dsn, f"SELECT count(*) FROM {queue.table}") == [(0,)]
    log = main_log(engine)
    assert "dequeue failed" in log and "dequeue recovered" in log


def test_requeue_does_not_count_a_delivery(queues):
    """A message given back unrun is never taken for poison."""
    queue = queues(max_deliveries=1)
    queue.enqueue(["id-r", "Task"])
    for _ in range(3):
        message = queue.dequeue()
        assert message is not None
        queue.requeue(message)
    assert queue.dequeue() is not None
    assert queue.rejected() == []


def test_dequeue_many_claims_the_oldest_in_one_statement(postgres_dsn, queues):
    """dequeue_many(n) leases the n oldest messages, each counted as delivered once."""
    queue = queues()
    for i in range(5):
        queue.enqueue([f"id-{i}", "Task", i])
    statements = count_statements(queue)
    batch = queue.dequeue_many(3, timeout=5)
    assert [m[2] for m in batch] == [0, 1, 2] and statements == [1]
    state = rows(postgres_dsn, f"SELECT body::json->>2, leased_by, deliveries, "
                               f"lease_until > now() FROM {queue.table} ORDER BY id")
    assert state == [(str(i), queue.consumer, 1, True) for i in range(3)] + [
        (str(i), None, 0, None) for i in (3, 4)]
    assert [m[2] for m in queue.dequeue_many(10)] == [3, 4]
    assert queue.dequeue_many(10) == [] and queue.dequeue() is None


def test_dequeue_many_with_nothing_to_take(queues):
    """A count of 0 takes nothing and does not wait; a count must be an int."""
    queue = queues()
    queue.enqueue(["id-1", "Task"])
    started = time.monotonic()
    assert queue.dequeue_many(0, timeout=10) == []
    assert time.monotonic() - started < 1.0
    with pytest.raises(TypeError):
        queue.dequeue_many(2.5)  # type: ignore[arg-type]
    assert len(queue) == 1


def test_dequeue_many_sets_poison_aside_and_fills_the_batch(postgres_dsn, queues):
    """Poison among the oldest rows is moved aside; the batch is filled from the next ones."""
    queue = queues(max_deliveries=2)
    for i in range(6):
        queue.enqueue([f"id-{i}", "Task", i])
    # Messages 0 and 2 were delivered twice already, to engines that died.
    rows(postgres_dsn, f"UPDATE {queue.table} SET deliveries = 2 "
                       f"WHERE body::json->>2 IN ('0', '2') RETURNING id")
    batch = queue.dequeue_many(3)
    assert [m[2] for m in batch] == [1, 3, 4]
    assert sorted(m[2] for m, reason in queue.rejected() if reason == "TooManyDeliveries") \
        == [0, 2]
    assert [m[2] for m in queue.dequeue_many(3)] == [5]


def test_each_message_of_a_batch_is_leased_renewed_and_settled_alone(postgres_dsn, queues):
    """A batch's messages are heartbeat-renewed together, then acked, rejected and requeued."""
    queue, other = queues(lease=0.5), queues(lease=0.5)
    for i in range(3):
        queue.enqueue([f"id-{i}", "Task", i])
    first, second, third = queue.dequeue_many(3)
    deadline = time.monotonic() + 1.5  # three leases
    while time.monotonic() < deadline:
        queue.heartbeat()
        assert other.dequeue() is None
        time.sleep(0.1)
    queue.ack(first)
    queue.reject(second, "UnknownTask")
    queue.requeue(third)
    assert [(list(m), r) for m, r in queue.rejected()] == [(["id-1", "Task", 1], "UnknownTask")]
    assert rows(postgres_dsn, f"SELECT body, leased_by, deliveries FROM {queue.table}") == [
        ('["id-2","Task",2]', None, 0)]
    for message in (first, second, third):
        with pytest.raises(ValueError, match="already acked"):
            queue.ack(message)
    again = other.dequeue()
    assert list(again) == ["id-2", "Task", 2]


def test_concurrent_acks_each_return_once_deleted(postgres_dsn, queues):
    """Acks from 8 threads share statements, and each returns only once its row is gone."""
    queue = queues()
    for i in range(200):
        queue.enqueue([f"id-{i}", "Task", i])
    statements = count_statements(queue)
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def consume() -> None:
        try:
            barrier.wait(10)
            while batch := queue.dequeue_many(3):
                for message in batch:
                    queue.ack(message)
                    if rows(postgres_dsn, f"SELECT 1 FROM {queue.table} WHERE body = %s",
                            protocol.encode(message)):
                        raise AssertionError(f"{message} acked, yet still stored")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=consume) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert rows(postgres_dsn, f"SELECT count(*) FROM {queue.table}") == [(0,)]
    assert statements[0] < 200 + 200  # the claims (fewer than 200) and the grouped acks


def test_acks_arriving_during_a_delete_share_the_next_one(postgres_dsn, queues):
    """While a DELETE is in flight, later acks wait and go together in the next statement;
    if that one fails twice (it is repeated once on a new connection), each of them
    raises and their rows stay for redelivery."""
    app = f"tempest-test-{uuid.uuid4().hex[:8]}"
    queue = queues(with_app_name(postgres_dsn, app))
    for i in range(4):
        queue.enqueue([f"id-{i}", "Task", i])
    batch = queue.dequeue_many(4)
    results: dict[int, str] = {}
    errors: dict[int, BaseException] = {}

    def ack(message: Any) -> None:
        try:
            queue.ack(message)
            results[message[2]] = "acked"
        except psycopg.OperationalError as exc:  # AdminShutdown: the backend was terminated
            results[message[2]] = "failed"
            errors[message[2]] = exc

    def blocked_deletes() -> list[tuple[Any, ...]]:
        return rows(postgres_dsn, "SELECT pid FROM pg_stat_activity WHERE application_name = "
                                  "%s AND wait_event_type = 'Lock'", app)

    def body(i: int) -> str:
        return protocol.encode([f"id-{i}", "Task", i])

    with psycopg.connect(postgres_dsn) as blocker:  # a transaction holding rows 0 and 1
        blocker.execute(f"SELECT 1 FROM {queue.table} WHERE body IN (%s, %s) FOR UPDATE",
                        (body(0), body(1)))
        statements = count_statements(queue)
        threads = [threading.Thread(target=ack, args=(batch[0],))]
        threads[0].start()
        wait_for(blocked_deletes, 5)  # the DELETE of row 0 waits for the lock
        threads += [threading.Thread(target=ack, args=(m,)) for m in batch[1:]]
        for t in threads[1:]:
            t.start()
        wait_for(lambda: len(queue._pending) == 3, 5)
        assert statements == [1] and results == {}
        blocker.commit()  # row 0 goes; the next DELETE takes rows 1, 2 and 3 at once
        threads[0].join(5)
        wait_for(lambda: results == {0: "acked", 1: "acked", 2: "acked", 3: "acked"}, 5)
        assert statements == [2]
    assert rows(postgres_dsn, f"SELECT count(*) FROM {queue.table}") == [(0,)]

    for i in range(4, 7):
        queue.enqueue([f"id-{i}", "Task", i])
    batch = queue.dequeue_many(3)
    with psycopg.connect(postgres_dsn) as first, psycopg.connect(postgres_dsn) as second:
        first.execute(f"SELECT 1 FROM {queue.table} WHERE body = %s FOR UPDATE", (body(4),))
        second.execute(f"SELECT 1 FROM {queue.table} WHERE body = %s FOR UPDATE", (body(5),))
        threads = [threading.Thread(target=ack, args=(batch[0],))]
        threads[0].start()
        wait_for(blocked_deletes, 5)
        threads += [threading.Thread(target=ack, args=(m,)) for m in batch[1:]]
        for t in threads[1:]:
            t.start()
        wait_for(lambda: len(queue._pending) == 2, 5)
        first.commit()  # row 4 goes; the DELETE of rows 5 and 6 then waits for row 5
        threads[0].join(5)
        assert results == {**results, 4: "acked"} and len(results) == 5
        (pid,), = wait_for(blocked_deletes, 5)
        rows(postgres_dsn, "SELECT pg_terminate_backend(%s)", pid)
        # The DELETE is repeated once, on a new connection: it waits for row 5 too.
        (again,), = wait_for(lambda: [r for r in blocked_deletes() if r[0] != pid], 5)
        rows(postgres_dsn, "SELECT pg_terminate_backend(%s)", again)
        for t in threads:
            t.join(5)
        assert (results[5], results[6]) == ("failed", "failed")
        # Each thread raises an exception of its own, of the same class, chained.
        leader, follower = (errors[5], errors[6]) if errors[6].__cause__ else (errors[6], errors[5])
        assert follower is not leader and follower.__cause__ is leader
        assert type(follower) is type(leader)
        second.rollback()
    # Both rows stay, and come back once their leases run out.
    assert rows(postgres_dsn, f"SELECT body FROM {queue.table} ORDER BY id") == [
        (body(5),), (body(6),)]
    queue.enqueue(["id-7", "Task", 7])
    queue.ack(queue.dequeue())  # the queue reconnected; acks work again
    assert queue._pending == [] and not queue._acking


def test_named_queues_share_a_table_apart(queues):
    """Queues with different names in one table never see each other's messages."""
    mail, video = queues(name="mail"), queues(name="video")
    mail.enqueue(["id-m", "Send"])
    assert video.dequeue() is None and len(video) == 0
    assert list(mail.dequeue()) == ["id-m", "Send"]


def test_settling_a_message_twice_is_an_error(queues):
    """ack/reject/requeue accept only what this queue object dequeued and did not settle."""
    queue = queues()
    queue.enqueue(["id-a", "Task"])
    message = queue.dequeue()
    queue.ack(message)
    with pytest.raises(ValueError, match="already acked"):
        queue.ack(message)


def test_engines_starting_together_create_the_schema_once(postgres_dsn, queues):
    """Concurrent first uses of a new table all succeed (the advisory lock serialises DDL)."""
    handles = [queues() for _ in range(8)]
    barrier = threading.Barrier(len(handles))
    errors: list[BaseException] = []

    def first_use(queue: PostgresQueue) -> None:
        barrier.wait(5)
        try:
            queue.enqueue(["id", "Task"])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=first_use, args=(h,)) for h in handles]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert errors == []
    assert len(handles[0]) == 8


def test_a_queue_that_waited_for_the_schema_lock_runs_no_ddl(postgres_dsn, table, queues,
                                                             monkeypatch):
    """A first use that finds the schema made once it holds the lock runs no DDL.

    The race: a queue looks, finds the schema missing, and waits for the lock
    while another engine makes it and starts claiming. Redoing the DDL would
    take ACCESS EXCLUSIVE on each table in turn and deadlock with a claim
    holding one of them (seen as DeadlockDetected). The look is made to miss
    the schema until the lock is held, which is that race, every time.
    """
    queues().enqueue(["id-0", "Task"])  # the schema, made and committed
    monkeypatch.setattr(postgres_module, "_EXISTING", (
        "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"
        " AND pid = pg_backend_pid()) AND (" + postgres_module._EXISTING + ")"))
    holder = psycopg.connect(postgres_dsn)
    try:
        # What a claim in another engine holds: DDL on the table would wait for it.
        holder.execute(f'LOCK TABLE "{table}_scheduled" IN ROW EXCLUSIVE MODE')
        queue = queues()
        done = threading.Event()
        errors: list[BaseException] = []

        def first_use() -> None:
            try:
                queue.enqueue(["id-1", "Task"])
            except BaseException as exc:
                errors.append(exc)
            done.set()

        thread = threading.Thread(target=first_use)
        thread.start()
        assert done.wait(10), "the first use is stuck behind a table lock"
        thread.join(5)
        assert errors == []
        assert len(queue) == 2
    finally:
        holder.close()  # before a failed assert is reported: lets a stuck first use go on


def test_schema_sql_is_the_documented_one():
    """The SQL printed for a DBA is the SQL in the module's docstring."""
    assert textwrap.indent(postgres_module.schema_sql(), "    ") in postgres_module.__doc__
    assert '"jobs_rejected"' in postgres_module.schema_sql("jobs")


@pytest.mark.parametrize("bad", ["Jobs", "jobs-1", "x; DROP TABLE y", "", "a" * 49, 7])
def test_table_must_be_a_plain_identifier(postgres_dsn, bad):
    """A table name that is not a plain lowercase identifier is refused at construction."""
    with pytest.raises(ConfigurationError, match="plain lowercase identifier"):
        PostgresQueue(postgres_dsn, bad)


@pytest.mark.parametrize("options", [{"lease": 0}, {"lease": "30"}, {"max_deliveries": 0},
                                     {"lease": 3, "heartbeat_interval": 3}])
def test_bad_options_are_refused(postgres_dsn, options):
    """Out-of-range leases, delivery limits and heartbeats raise ConfigurationError."""
    with pytest.raises(ConfigurationError):
        PostgresQueue(postgres_dsn, **options)


def test_repr_never_shows_the_dsn(postgres_dsn):
    """The DSN (which may hold a password) stays out of repr()."""
    queue = PostgresQueue("postgresql://app:s3cret@db.invalid/x", heartbeat_interval=1)
    assert "s3cret" not in repr(queue) and queue.heartbeat_interval == 1.0
    assert PostgresQueue("postgresql://db.invalid/x", lease=9).heartbeat_interval == 3.0


# -- engines in processes of their own -----------------------------------------------------


@pytest.fixture
def engines(tmp_path: Path, postgres_dsn: str, table: str) -> Iterator[EngineProcesses]:
    """Engine processes on the test's table; any still running is killed afterwards."""
    processes = EngineProcesses(
        tmp_path, "postgres", [postgres_dsn, table],
        left=lambda: rows(postgres_dsn, f"SELECT count(*) FROM {table}")[0][0])
    try:
        yield processes
    finally:
        processes.kill_all()


class TestEngineProcesses(EngineProcessChecks):
    """kill -9 and three engines, on this queue."""


# -- scheduling ------------------------------------------------------------------------


OLD_SCHEMA = """\
CREATE TABLE {t} (id bigserial PRIMARY KEY, queue text NOT NULL, body text NOT NULL,
    priority integer NOT NULL DEFAULT 0, available_at timestamptz NOT NULL DEFAULT now(),
    enqueued_at timestamptz NOT NULL DEFAULT now(), deliveries integer NOT NULL DEFAULT 0,
    leased_by text, lease_until timestamptz);
CREATE INDEX {t}_dequeue ON {t} (queue, priority DESC, id);
CREATE INDEX {t}_leased ON {t} (leased_by) WHERE leased_by IS NOT NULL;
CREATE TABLE {t}_rejected (id bigint PRIMARY KEY, queue text NOT NULL, body text NOT NULL,
    reason text NOT NULL, rejected_at timestamptz NOT NULL DEFAULT now());"""


def test_a_table_made_before_scheduling_gains_its_tables(postgres_dsn, table, queues):
    """The tables of an earlier version: the new ones come, the old index goes, rows stay."""
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(OLD_SCHEMA.format(t=table))
        conn.execute(f"INSERT INTO {table} (queue, body) VALUES ('tempest', '[\"id-old\",\"T\"]')")
    queue = queues()
    queue.schedule(["id-later", "T"], delay=60)
    assert len(queue) == 1 and queue.scheduled_count() == 1
    names = {name for (name,) in rows(postgres_dsn, "SELECT relname FROM pg_class "
                                                    "WHERE relname LIKE %s", f"{table}%")}
    assert {f"{table}_scheduled", f"{table}_fired", f"{table}_ready"} <= names
    assert f"{table}_dequeue" not in names
    assert list(queue.dequeue()) == ["id-old", "T"]


def test_schema_sql_creates_what_the_queue_uses(postgres_dsn, table, queues):
    """A DBA's run of schema_sql() leaves the queue nothing to create."""
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(postgres_module.schema_sql(table).encode())
        conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")  # no-op for a superuser
    queue = queues()
    assert queue.fire("s", 1.0, ["s@1", "T"], keep=60) is True
    assert len(queue) == 1


def test_fired_slots_are_forgotten_after_keep(postgres_dsn, table, queues):
    """fire() deletes the slots of its schedule recorded more than keep seconds ago."""
    queue = queues()
    assert queue.fire("s", 1.0, ["s@1", "T"], keep=3600)
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(f"UPDATE {table}_fired SET recorded_at = now() - interval '2 hours'")
    assert queue.fire("s", 2.0, ["s@2", "T"], keep=3600)
    assert rows(postgres_dsn, f"SELECT slot FROM {table}_fired") == [(2.0,)]
    assert queue.last_fired("s") == 2.0


def test_many_scheduled_messages_cost_an_idle_dequeue_nothing(postgres_dsn, table, queues):
    """With 50,000 delayed messages waiting, a waiting dequeue claims once a second."""
    queue = queues()
    queue.schedule(["id-first", "T"], delay=3600)
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(f"INSERT INTO {table}_scheduled (queue, body, priority, available_at) "
                     f"SELECT 'tempest', '[\"id\",\"T\"]', 0, now() + interval '1 hour' "
                     f"FROM generate_series(1, 50000)")
    assert queue.scheduled_count() == 50001
    statements = count_statements(queue)
    began = time.monotonic()
    assert queue.dequeue(timeout=2.5) is None
    assert time.monotonic() - began >= 2.4
    assert statements[0] <= 5  # a claim when it starts, then one per second
    queue.schedule(["id-soon", "T"], delay=0.2)
    began = time.monotonic()
    message = queue.dequeue(timeout=10)
    assert message is not None and list(message) == ["id-soon", "T"]
    assert 0.15 <= time.monotonic() - began < 2.0


# -- retries and the failed store ---------------------------------------------------------


PREVIOUS_SCHEMA = OLD_SCHEMA.replace(
    "CREATE INDEX {t}_dequeue ON {t} (queue, priority DESC, id);",
    "CREATE INDEX {t}_ready ON {t} (queue, priority DESC, available_at, id);") + """
CREATE TABLE {t}_scheduled (id bigserial PRIMARY KEY, queue text NOT NULL, body text NOT NULL,
    priority integer NOT NULL, available_at timestamptz NOT NULL);
CREATE INDEX {t}_scheduled_due ON {t}_scheduled (queue, available_at, id);
CREATE TABLE {t}_fired (queue text NOT NULL, schedule text NOT NULL,
    slot double precision NOT NULL, recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (queue, schedule, slot));"""
"""The tables of the version before retries: scheduling, no attempts, no failed store."""


def failure(task_id: str, when: float, *args: Any, attempts: int = 1) -> dict[str, Any]:
    """A record as the engine passes it to fail()."""
    return {"task_id": task_id, "task": "T", "args": list(args), "attempts": attempts,
            "error_type": "ValueError", "error": "bad", "traceback": "Traceback ...\n",
            "last_failed_at": when}


def take(queue: PostgresQueue, timeout: float = 10.0) -> Any:
    """The next message of *queue*, waiting at most *timeout* seconds for it."""
    message = queue.dequeue(timeout=timeout)
    assert message is not None, f"no message within {timeout}s"
    return message


def columns(dsn: str, table: str) -> set[str]:
    return {name for (name,) in rows(dsn, "SELECT column_name FROM information_schema.columns "
                                          "WHERE table_name = %s", table)}


def test_a_table_made_before_retries_gains_its_columns_and_failed_store(postgres_dsn, table,
                                                                       queues):
    """An older version's tables get attempts, first_failed_at and <table>_failed; rows stay
    and count no failed attempt."""
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(PREVIOUS_SCHEMA.format(t=table))
        conn.execute(f"INSERT INTO {table} (queue, body) VALUES ('tempest', '[\"id-old\",\"T\"]')")
        conn.execute(f"INSERT INTO {table}_scheduled (queue, body, priority, available_at) "
                     f"VALUES ('tempest', '[\"id-later\",\"T\"]', 2, now() + interval '1 hour')")
    queue = queues()
    assert len(queue) == 1 and queue.scheduled_count() == 1
    for name in (table, f"{table}_scheduled"):
        assert {"attempts", "first_failed_at"} <= columns(postgres_dsn, name)
    assert rows(postgres_dsn, f"SELECT attempts, first_failed_at FROM {table}_scheduled") == [
        (0, None)]
    message = queue.dequeue()
    assert list(message) == ["id-old", "T"] and queue.attempts(message) == 0
    queue.retry(message, delay=0, failed_at=time.time())
    again = queue.dequeue()
    assert queue.attempts(again) == 1
    assert queue.fail(again, failure("id-old", time.time()), keep=10, ttl=60) == 0
    assert queue.find_failed("id-old")["attempts"] == 1
    # Current now: the next queue object finds nothing to create.
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        current = conn.execute(postgres_module._EXISTING, postgres_module._names(table))
        assert current.fetchone() == (True,)


def test_a_missing_column_alone_makes_the_schema_out_of_date(postgres_dsn, table, queues):
    """The schema check looks at the columns, not only the tables: a lost one comes back."""
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(postgres_module.schema_sql(table).encode())
        conn.execute(f"ALTER TABLE {table}_scheduled DROP COLUMN first_failed_at")
        stale = conn.execute(postgres_module._EXISTING, postgres_module._names(table))
        assert stale.fetchone() == (False,)
    queue = queues()
    queue.enqueue(["id-1", "T"])
    queue.retry(queue.dequeue(), delay=60, failed_at=1000.0)
    assert rows(postgres_dsn, f"SELECT attempts, extract(epoch FROM first_failed_at)::float8 "
                              f"FROM {table}_scheduled") == [(1, 1000.0)]


def test_attempts_costs_no_query_and_needs_a_held_message(queues):
    """attempts() reads the lease, sends no statement, and refuses what it does not hold."""
    queue, other = queues(), queues()
    queue.enqueue(["id-a", "T"])
    message = queue.dequeue()
    statements = count_statements(queue)
    assert queue.attempts(message) == 0 and statements == [0]
    for call in (lambda: other.attempts(message),
                 lambda: other.retry(message, delay=0, failed_at=time.time()),
                 lambda: other.fail(message, failure("id-a", time.time()), keep=10, ttl=60)):
        with pytest.raises(ValueError, match="not a message this queue object dequeued"):
            call()
    queue.ack(message)  # still held by its own queue object
    with pytest.raises(ValueError):
        queue.attempts(message)


def test_the_count_and_first_failure_survive_promotion_requeue_and_redelivery(postgres_dsn,
                                                                             queues):
    """A retried message keeps its attempts and first failure time through
    <table>_scheduled, requeue, and a lease that ran out; only retry() adds one."""
    queue, other = queues(lease=0.5), queues(lease=0.5)
    queue.schedule(["id-c", "T", 1], priority=4)
    first = time.time() - 100
    queue.retry(queue.dequeue(), delay=0.2, failed_at=first)
    assert rows(postgres_dsn, f"SELECT attempts, priority FROM {queue.table}_scheduled") == [
        (1, 4)]
    message = take(queue)  # promoted once due
    assert queue.attempts(message) == 1
    queue.requeue(message)
    message = queue.dequeue()
    assert queue.attempts(message) == 1
    queue.retry(message, delay=0, failed_at=time.time())  # ready now: straight into the table
    assert rows(postgres_dsn, f"SELECT count(*) FROM {queue.table}_scheduled") == [(0,)]
    message = queue.dequeue()
    assert queue.attempts(message) == 2  # ...and its engine dies
    again = take(other)  # once the lease runs out
    assert list(again) == ["id-c", "T", 1] and other.attempts(again) == 2
    (stored,), = rows(postgres_dsn, f"SELECT extract(epoch FROM first_failed_at)::float8 "
                                    f"FROM {queue.table}")
    assert abs(stored - first) < 0.001
    assert other.fail(again, failure("id-c", time.time(), 1, attempts=3), keep=10, ttl=60) == 0
    entry = queue.find_failed("id-c")
    assert abs(entry["first_failed_at"] - first) < 0.001
    assert entry["priority"] == 4 and entry["attempts"] == 3


def test_retry_and_fail_leave_a_message_taken_by_another_consumer_alone(postgres_dsn, queues):
    """Once a lease ran out and another engine took the message, the late retry() or fail()
    of the first one stores nothing: the message is the other engine's."""
    late, other = queues(lease=0.5), queues(lease=30)
    late.enqueue(["id-l", "T"])
    first = late.dequeue()
    taken = take(other)
    late.retry(first, delay=0, failed_at=time.time())
    assert rows(postgres_dsn, f"SELECT attempts, leased_by FROM {late.table}") == [
        (0, other.consumer)]
    assert rows(postgres_dsn, f"SELECT count(*) FROM {late.table}_scheduled") == [(0,)]
    late.enqueue(["id-l2", "T"])
    second = late.dequeue()
    taken2 = take(other)
    assert late.fail(second, failure("id-l2", time.time()), keep=10, ttl=60) == 0
    assert late.failed_count() == 0
    other.ack(taken)
    other.ack(taken2)
    assert rows(postgres_dsn, f"SELECT count(*) FROM {late.table}") == [(0,)]


def test_a_retry_that_dies_leaves_the_leased_message(postgres_dsn, queues):
    """retry() is one statement: killed before it commits, the message stays leased and
    comes back after its lease with the count it had; committed, only the retry is left."""
    app = f"tempest-test-{uuid.uuid4().hex[:8]}"
    queue = queues(with_app_name(postgres_dsn, app), lease=0.5)
    queue.enqueue(["id-x", "T"])
    message = queue.dequeue()
    with psycopg.connect(postgres_dsn) as blocker:  # holds the leased row
        blocker.execute(f"SELECT 1 FROM {queue.table} FOR UPDATE")
        errors: list[BaseException] = []

        def retry() -> None:
            try:
                queue.retry(message, delay=0, failed_at=time.time())
            except psycopg.OperationalError as exc:
                errors.append(exc)

        thread = threading.Thread(target=retry)
        thread.start()
        (pid,), = wait_for(lambda: rows(postgres_dsn, "SELECT pid FROM pg_stat_activity "
                                                      "WHERE application_name = %s AND "
                                                      "wait_event_type = 'Lock'", app), 5)
        rows(postgres_dsn, "SELECT pg_terminate_backend(%s)", pid)
        thread.join(10)
        blocker.rollback()
    assert len(errors) == 1
    assert rows(postgres_dsn, f"SELECT attempts, leased_by FROM {queue.table}") == [
        (0, queue.consumer)]
    assert rows(postgres_dsn, f"SELECT count(*) FROM {queue.table}_scheduled") == [(0,)]
    again = take(queues())
    assert list(again) == ["id-x", "T"]
    # Not both: once committed, the leased row is gone and the retried one is all there is.
    owner = queues()
    owner.enqueue(["id-y", "T"])
    assert rows(postgres_dsn, f"SELECT count(*) FROM {queue.table}") == [(2,)]
    taken = owner.dequeue()
    owner.retry(taken, delay=30, failed_at=time.time())
    assert rows(postgres_dsn, f"SELECT count(*) FROM {queue.table}") == [(1,)]
    assert rows(postgres_dsn, f"SELECT body, attempts FROM {queue.table}_scheduled") == [
        ('["id-y","T"]', 1)]


def test_a_fail_that_dies_leaves_the_leased_message_and_the_store_as_they_were(
        postgres_dsn, queues):
    """fail() is one transaction: killed while trimming (after storing its entry), it stores
    nothing and the message stays leased."""
    app = f"tempest-test-{uuid.uuid4().hex[:8]}"
    queue = queues(with_app_name(postgres_dsn, app))
    now = time.time()
    queue.enqueue(["id-old", "T"])
    queue.fail(queue.dequeue(), failure("id-old", now - 10), keep=1, ttl=60)
    queue.enqueue(["id-new", "T"])
    message = queue.dequeue()
    errors: list[BaseException] = []

    def fail() -> None:
        try:
            queue.fail(message, failure("id-new", now), keep=1, ttl=60)  # drops id-old
        except psycopg.OperationalError as exc:
            errors.append(exc)

    with psycopg.connect(postgres_dsn) as blocker:  # holds the entry the trim deletes
        blocker.execute(f"SELECT 1 FROM {queue.table}_failed FOR UPDATE")
        thread = threading.Thread(target=fail)
        thread.start()
        (pid, query), = wait_for(lambda: rows(
            postgres_dsn, "SELECT pid, query FROM pg_stat_activity WHERE application_name = "
                          "%s AND wait_event_type = 'Lock'", app), 5)
        assert "gone" in query  # waiting in the trim: the entry is stored, uncommitted
        rows(postgres_dsn, "SELECT pg_terminate_backend(%s)", pid)
        thread.join(10)
        blocker.rollback()
    assert len(errors) == 1
    assert [e["task_id"] for e in queue.failed()] == ["id-old"]
    assert rows(postgres_dsn, f"SELECT leased_by FROM {queue.table}") == [(queue.consumer,)]


def test_two_consumers_failing_at_once_keep_the_bound(queues):
    """Engines failing tasks at the same moment never leave more than keep entries, and the
    entries dropped are counted once."""
    handles = [queues() for _ in range(4)]
    for i in range(40):
        handles[0].enqueue([f"id-{i:02d}", "T", i])
    barrier = threading.Barrier(len(handles))
    dropped: list[int] = []
    errors: list[BaseException] = []

    def consume(queue: PostgresQueue) -> None:
        try:
            barrier.wait(10)
            while message := queue.dequeue():
                dropped.append(queue.fail(message, failure(message[0], time.time(), message[2]),
                                          keep=5, ttl=3600))
                assert queue.failed_count() <= 5
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=consume, args=(h,)) for h in handles]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert handles[1].failed_count() == 5 and sum(dropped) == 35


def test_expired_entries_are_hidden_then_dropped(postgres_dsn, queues):
    """An entry past expires_at is invisible to every call at once; the next fail() deletes it,
    counted among the dropped."""
    queue = queues()
    now = time.time()
    for task_id in ("id-e1", "id-e2", "id-live"):
        queue.enqueue([task_id, "T"])
        queue.fail(queue.dequeue(), failure(task_id, now), keep=100, ttl=3600)
    rows(postgres_dsn, f"UPDATE {queue.table}_failed SET expires_at = now() - interval '1 s' "
                       f"WHERE task_id LIKE 'id-e%%' RETURNING 1")
    assert queue.failed_count() == 1 and [e["task_id"] for e in queue.failed()] == ["id-live"]
    assert queue.find_failed("id-e1") is None
    assert queue.retry_failed("id-e1") is False and len(queue) == 0
    assert queue.delete_failed("id-e1") is False  # gone now, and never counted
    assert queue.retry_failed_all() == 1
    queue.ack(queue.dequeue())
    queue.enqueue(["id-next", "T"])
    assert queue.fail(queue.dequeue(), failure("id-next", now), keep=100, ttl=3600) == 1
    assert rows(postgres_dsn, f"SELECT task_id FROM {queue.table}_failed") == [("id-next",)]
    rows(postgres_dsn, f"UPDATE {queue.table}_failed SET expires_at = now() - interval '1 s' "
                       f"RETURNING 1")
    assert queue.purge_failed() == 0
    assert rows(postgres_dsn, f"SELECT count(*) FROM {queue.table}_failed") == [(0,)]


def test_entries_are_records_of_the_protocol(queues):
    """failed() and find_failed() give dicts with exactly FAILED_FIELDS: floats for times, a
    list for args, the ttl added to the failure time; failed() pages validate."""
    queue = queues()
    when = 1_700_000_000.25
    queue.enqueue(["id-r", "T", 1, [2, 3], {"k": "v"}])
    queue.fail(queue.dequeue(), failure("id-r", when, 1, [2, 3], {"k": "v"}), keep=10,
               ttl=10**10)
    entry = queue.find_failed("id-r")
    assert set(entry) == set(protocol.FAILED_FIELDS)
    assert entry["args"] == [1, [2, 3], {"k": "v"}]
    assert entry["first_failed_at"] == entry["last_failed_at"] == when
    assert entry["expires_at"] == when + 10**10 and entry["priority"] == 0
    assert all(isinstance(entry[k], float)
               for k in ("first_failed_at", "last_failed_at", "expires_at"))
    assert queue.failed(limit=1) == [entry] and queue.failed(limit=0) == []
    with pytest.raises(ValueError):
        queue.failed(limit=-1)


def test_two_queue_objects_share_one_failed_store(postgres_dsn, queues, monkeypatch):
    """What one consumer fails, another lists, retries and deletes; retry_failed wakes a
    waiting dequeue by notification, with the entry's priority and attempts 0; other queue
    names in the table keep stores of their own."""
    monkeypatch.setattr(postgres_module, "_RECLAIM", 60.0)  # only a NOTIFY can wake a wait
    worker, admin, elsewhere = queues(), queues(), queues(name="elsewhere")
    worker.schedule(["id-s", "T", 7], priority=9)
    message = worker.dequeue()
    worker.retry(message, delay=0, failed_at=time.time() - 5)
    again = worker.dequeue()
    assert worker.fail(again, failure("id-s", time.time(), 7, attempts=2), keep=10,
                       ttl=60) == 0
    assert admin.failed_count() == 1 and admin.failed()[0]["task_id"] == "id-s"
    assert elsewhere.failed_count() == 0 and elsewhere.find_failed("id-s") is None
    assert elsewhere.retry_failed("id-s") is False and elsewhere.purge_failed() == 0

    got: list[tuple[Any, float]] = []
    assert worker.dequeue_many(1, timeout=0.1) == []  # its listener is kept, listening
    waiter = threading.Thread(
        target=lambda: got.append((worker.dequeue(timeout=20), time.monotonic())))
    waiter.start()
    wait_for(worker._listening.locked, 5)
    sent = time.monotonic()
    assert admin.retry_failed("id-s") is True
    waiter.join(25)
    back, received = got[0]
    assert list(back) == ["id-s", "T", 7] and received - sent < 5
    assert worker.attempts(back) == 0
    assert rows(postgres_dsn, f"SELECT priority, attempts, first_failed_at FROM {worker.table}"
                ) == [(9, 0, None)]
    assert admin.retry_failed("id-s") is False
    worker.fail(back, failure("id-s", time.time(), 7), keep=10, ttl=60)
    assert admin.delete_failed("id-s") is True and worker.failed_count() == 0


def test_a_retry_wakes_a_waiting_dequeue_at_its_time(queues, monkeypatch):
    """retry() notifies: a dequeue already waiting learns of the retried message's time and
    takes it then, with no claim once a second to find it."""
    monkeypatch.setattr(postgres_module, "_RECLAIM", 60.0)
    worker, waiter = queues(), queues()
    worker.enqueue(["id-w", "T"])
    message = worker.dequeue()
    assert waiter.dequeue_many(1, timeout=0.1) == []
    got: list[tuple[Any, float]] = []
    thread = threading.Thread(
        target=lambda: got.append((waiter.dequeue(timeout=20), time.monotonic())))
    thread.start()
    wait_for(waiter._listening.locked, 5)
    sent = time.monotonic()
    worker.retry(message, delay=0.5, failed_at=time.time())
    thread.join(25)
    back, received = got[0]
    assert list(back) == ["id-w", "T"] and waiter.attempts(back) == 1
    assert 0.4 <= received - sent < 5


def test_retry_failed_all_moves_every_entry_in_one_statement(postgres_dsn, queues):
    """retry_failed_all() brings back every entry, each with its priority, oldest failure
    first among equals, and wakes waiters once."""
    queue = queues()
    now = time.time()
    for i, pri in enumerate((0, 5, 0)):
        queue.schedule([f"id-{i}", "T", i], priority=pri)
    for message in sorted(queue.dequeue_many(3), key=lambda m: m[2]):
        queue.fail(message, failure(message[0], now - 10 + message[2], message[2]), keep=10,
                   ttl=60)
    statements = count_statements(queue)
    assert queue.retry_failed_all() == 3 and statements == [1]
    assert [m[0] for m in queue.dequeue_many(3)] == ["id-1", "id-0", "id-2"]


# -- results ---------------------------------------------------------------------------


RETRIES_SCHEMA = PREVIOUS_SCHEMA + """
ALTER TABLE {t} ADD COLUMN attempts integer NOT NULL DEFAULT 0,
    ADD COLUMN first_failed_at timestamptz;
ALTER TABLE {t}_scheduled ADD COLUMN attempts integer NOT NULL DEFAULT 0,
    ADD COLUMN first_failed_at timestamptz;
CREATE TABLE {t}_failed (queue text NOT NULL, task_id text NOT NULL, body text NOT NULL,
    task text NOT NULL, attempts integer NOT NULL, error_type text NOT NULL,
    error text NOT NULL, traceback text NOT NULL, first_failed_at timestamptz NOT NULL,
    last_failed_at timestamptz NOT NULL, priority integer NOT NULL,
    expires_at timestamptz NOT NULL, PRIMARY KEY (queue, task_id));
CREATE INDEX {t}_failed_latest ON {t}_failed (queue, last_failed_at);"""
"""The tables of the version before results: retries, no result_ttl, no <table>_results."""


def outcome(task_id: str, value: Any) -> dict[str, Any]:
    """A success record as the engine passes it to store_result()."""
    return {"task_id": task_id, "task": "T", "state": "succeeded", "value": value,
            "error_type": None, "error": None, "traceback": None, "attempts": 1,
            "finished_at": 1733500000.5}


def server_now(dsn: str) -> float:
    (now,), = rows(dsn, "SELECT extract(epoch FROM now())::float8")
    return float(now)


def waiting_on(queue: PostgresQueue, task_id: str, count: int = 1) -> bool:
    """Whether *count* result() calls of *queue* are registered for *task_id*."""
    listener = queue._result_listener
    if listener is None or not listener.alive:
        return False
    with listener.lock:
        return len(listener.waiters.get(task_id, ())) >= count


def result_listeners(dsn: str, app: str) -> list[tuple[Any, ...]]:
    """The backends of *app* LISTENing on a result channel (their last query)."""
    return rows(dsn, "SELECT pid FROM pg_stat_activity WHERE application_name = %s "
                     "AND query LIKE 'LISTEN %%/results:%%'", app)


class Waiter:
    """``queue.result(task_id, timeout)`` in a thread: what it returned, and when."""

    def __init__(self, queue: PostgresQueue, task_id: str, timeout: float | None) -> None:
        self.record: dict[str, Any] | None = None
        self.returned_at = math.nan
        self.wall_at = math.nan
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, args=(queue, task_id, timeout))
        self.thread.start()

    def _run(self, queue: PostgresQueue, task_id: str, timeout: float | None) -> None:
        try:
            self.record = queue.result(task_id, timeout)
        except BaseException as exc:
            self.errors.append(exc)
        self.returned_at, self.wall_at = time.monotonic(), time.time()

    def join(self, timeout: float = 20.0) -> dict[str, Any] | None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "result() did not return"
        assert self.errors == []
        return self.record


def test_result_ttl_is_stored_with_the_message_and_read_without_a_query(postgres_dsn,
                                                                        queues):
    """schedule(result_ttl=) stores the ttl in the row, exactly (0.3 stays 0.3); the claim
    brings it back, so result_ttl() sends nothing; enqueue and fire store none; a message
    the queue object does not hold is refused."""
    queue, other = queues(), queues()
    queue.schedule(["id-t1", "T"], result_ttl=0.3)
    queue.enqueue(["id-t2", "T"])
    assert queue.fire("s", 1.0, ["s@1", "T"], keep=60)
    assert sorted(rows(postgres_dsn, f"SELECT body, result_ttl FROM {queue.table}"),
                  key=str) == [('["id-t1","T"]', 0.3), ('["id-t2","T"]', None),
                               ('["s@1","T"]', None)]
    taken = {m[0]: m for m in queue.dequeue_many(3)}
    statements = count_statements(queue)
    assert queue.result_ttl(taken["id-t1"]) == 0.3
    assert queue.result_ttl(taken["id-t2"]) is None and queue.result_ttl(taken["s@1"]) is None
    assert statements == [0]
    with pytest.raises(ValueError, match="not a message this queue object dequeued"):
        other.result_ttl(taken["id-t1"])
    queue.ack(taken["id-t1"])
    with pytest.raises(ValueError):
        queue.result_ttl(taken["id-t1"])
    for bad in (0, -1.0, math.inf, math.nan, "60", True):
        with pytest.raises(ValueError, match="result_ttl"):
            queue.schedule(["id-bad", "T"], result_ttl=bad)
    assert len(queue) == 0  # the refused ones stored nothing (two left are leased)


def test_result_ttl_survives_promotion_requeue_redelivery_and_retry(postgres_dsn, queues):
    """The ttl travels as attempts do: through <table>_scheduled, requeue, retry (now or
    later: attempts one up) and a lease that ran out, taken by another queue object."""
    queue, other = queues(lease=0.5), queues(lease=30)
    queue.schedule(["id-k", "T"], delay=0.2, result_ttl=7.5, priority=3)
    assert rows(postgres_dsn, f"SELECT result_ttl FROM {queue.table}_scheduled") == [(7.5,)]
    message = take(queue)  # promoted once due
    assert queue.result_ttl(message) == 7.5
    queue.requeue(message)
    message = take(queue)
    assert queue.result_ttl(message) == 7.5 and queue.attempts(message) == 0
    queue.retry(message, delay=0, failed_at=time.time())
    message = take(queue)
    assert queue.result_ttl(message) == 7.5 and queue.attempts(message) == 1
    queue.retry(message, delay=0.2, failed_at=time.time())
    assert rows(postgres_dsn, f"SELECT result_ttl, attempts FROM {queue.table}_scheduled"
                ) == [(7.5, 2)]
    message = take(queue)
    assert queue.result_ttl(message) == 7.5 and queue.attempts(message) == 2
    # ...and its engine dies: once the lease runs out, the other queue object takes it.
    again = take(other)
    assert list(again) == ["id-k", "T"]
    assert other.result_ttl(again) == 7.5 and other.attempts(again) == 2
    other.ack(again)


def test_retry_failed_stores_the_message_without_its_result_ttl(postgres_dsn, queues):
    """A failed entry keeps no result ttl: retry_failed and retry_failed_all store the
    message asking for no result."""
    queue = queues()
    for task_id in ("id-f1", "id-f2"):
        queue.schedule([task_id, "T"], result_ttl=60.0)
        queue.fail(take(queue), failure(task_id, time.time()), keep=10, ttl=60)
    assert queue.retry_failed("id-f1") is True
    message = take(queue)
    assert queue.result_ttl(message) is None
    queue.ack(message)
    assert queue.retry_failed_all() == 1
    message = take(queue)
    assert list(message) == ["id-f2", "T"] and queue.result_ttl(message) is None
    assert rows(postgres_dsn, f"SELECT result_ttl FROM {queue.table}") == [(None,)]


def test_a_stored_result_is_read_back_with_expires_at_and_replaced(postgres_dsn, queues):
    """store_result is one statement, result(timeout=0) one SELECT; the record comes back
    as JSON gives it, with expires_at of the database's clock (also in its column); a
    second store replaces it; an expires_at passed in is replaced too."""
    queue, reader = queues(), queues()
    statements = count_statements(queue)
    before = server_now(postgres_dsn)
    queue.store_result("id-r1", outcome("id-r1", (1, {"a": [2]})), ttl=60.0)
    after = server_now(postgres_dsn)
    assert statements == [1]
    record = reader.result("id-r1", 0)
    assert record is not None and set(record) == set(protocol.RESULT_FIELDS) - {"task"} | {
        "task", "expires_at"}
    assert {k: v for k, v in record.items() if k != "expires_at"} == outcome(
        "id-r1", [1, {"a": [2]}])
    assert isinstance(record["expires_at"], float)
    assert before + 60 - 0.001 <= record["expires_at"] <= after + 60 + 0.001
    (column,), = rows(postgres_dsn, f"SELECT extract(epoch FROM expires_at)::float8 "
                                    f"FROM {queue.table}_results")
    assert abs(column - record["expires_at"]) < 1e-5
    queue.store_result("id-r1", {**outcome("id-r1", "again"), "expires_at": 1.0}, ttl=60.0)
    again = reader.result("id-r1", 0)
    assert again is not None and again["value"] == "again" and again["expires_at"] > 1e9
    assert rows(postgres_dsn, f"SELECT count(*) FROM {queue.table}_results") == [(1,)]
    queue.store_result("id-empty", {}, ttl=60.0)
    assert set(reader.result("id-empty", 0) or {}) == {"expires_at"}
    statements = count_statements(reader)
    assert reader.result("id-r1", timeout=10)["value"] == "again"  # found: no listener
    assert statements == [1] and reader._result_listener is None


def test_store_result_refuses_what_it_cannot_store(queues):
    """A record that is not a JSON dict, a bad id or a bad ttl raise, storing nothing."""
    queue = queues()
    for call in (lambda: queue.store_result("id-x", {"value": {1, 2}}, ttl=60),
                 lambda: queue.store_result("id-x", {"value": math.nan}, ttl=60),
                 lambda: queue.store_result("id-x", ["not", "a", "dict"], ttl=60),  # type: ignore[arg-type]
                 lambda: queue.store_result("", {}, ttl=60),
                 lambda: queue.store_result("id-x", {}, ttl=0),
                 lambda: queue.store_result("id-x", {}, ttl=math.inf)):
        with pytest.raises((TypeError, ValueError)):
            call()
    assert queue.result("id-x", 0) is None
    queue.store_result("id-long", {"v": 1}, ttl=1e300)  # kept about 3,000 years
    assert queue.result("id-long", 0)["expires_at"] > time.time() + 1e10


def test_result_of_an_unknown_id_looks_once_or_waits_its_timeout(queues):
    """timeout 0 (or less): one SELECT, None at once; timeout 0.2: None after about 0.2 s."""
    queue = queues()
    statements = count_statements(queue)
    began = time.monotonic()
    assert queue.result("id-none", 0) is None and queue.result("id-none", -1) is None
    assert time.monotonic() - began < 1.0 and statements == [2]
    began = time.monotonic()
    assert queue.result("id-none", 0.2) is None
    assert 0.19 <= time.monotonic() - began < 2.0


def test_a_waiting_result_is_woken_by_the_notification_not_a_poll(queues, monkeypatch):
    """A result(timeout=10) blocked in a thread returns within milliseconds of a store by
    another queue object: the median of five is far below what a once-a-second poll
    gives (half a second), and no look again helps (it is every 60 s here)."""
    monkeypatch.setattr(postgres_module, "_RESULT_RECHECK", 60.0)
    queue, producer = queues(), queues()
    delays = []
    for i in range(5):
        task_id = f"id-w{i}"
        waiter = Waiter(queue, task_id, 10)
        wait_for(lambda task_id=task_id: waiting_on(queue, task_id), 5)
        stored = time.monotonic()
        producer.store_result(task_id, outcome(task_id, i), ttl=60.0)
        record = waiter.join()
        assert record is not None and record["value"] == i
        delays.append(waiter.returned_at - stored)
    assert max(delays) < 2.0
    assert sorted(delays)[2] < 0.25, delays


def test_waiters_share_one_listener_and_wake_only_for_their_id(postgres_dsn, queues,
                                                              monkeypatch):
    """Six threads waiting on one id and three on another use one listening connection;
    a store wakes all six promptly and none of the three, whose own store wakes them."""
    monkeypatch.setattr(postgres_module, "_RESULT_RECHECK", 60.0)
    app = f"tempest-test-{uuid.uuid4().hex[:8]}"
    queue, producer = queues(with_app_name(postgres_dsn, app)), queues()
    first = [Waiter(queue, "id-a", 10) for _ in range(6)]
    second = [Waiter(queue, "id-b", 10) for _ in range(3)]
    wait_for(lambda: waiting_on(queue, "id-a", 6) and waiting_on(queue, "id-b", 3), 5)
    assert len(result_listeners(postgres_dsn, app)) == 1
    stored = time.monotonic()
    producer.store_result("id-a", outcome("id-a", "A"), ttl=60.0)
    for waiter in first:
        assert waiter.join()["value"] == "A"
        assert waiter.returned_at - stored < 2.0
    assert all(w.thread.is_alive() for w in second) and waiting_on(queue, "id-b", 3)
    stored = time.monotonic()
    producer.store_result("id-b", outcome("id-b", "B"), ttl=60.0)
    for waiter in second:
        assert waiter.join()["value"] == "B"
        assert waiter.returned_at - stored < 2.0


def test_a_woken_waiter_takes_the_record_from_the_notification(postgres_dsn, queues,
                                                               monkeypatch):
    """The notification carries the record: the woken waiter sends no SELECT after its
    first look. A record too long for a notification, or an id too long even alone, is
    announced without it, and the waiter reads the row."""
    monkeypatch.setattr(postgres_module, "_RESULT_RECHECK", 60.0)
    queue, producer = queues(), queues()
    assert queue.result("id-warm", 0.05) is None  # the listener, kept for the next waits
    cases = [("id-n1", "short"), ("id-n2", "x" * 9000), ("id-" + "n" * 8100, "long id")]
    looked = threading.Event()
    find = queue._find_result

    def finding(task_id: str) -> Any:
        try:
            return find(task_id)
        finally:
            looked.set()

    monkeypatch.setattr(queue, "_find_result", finding)
    for task_id, value in cases:
        statements = count_statements(queue)
        looked.clear()
        waiter = Waiter(queue, task_id, 10)
        assert looked.wait(5)  # its first look found nothing: the store comes after it
        assert waiting_on(queue, task_id)
        stored = time.monotonic()
        producer.store_result(task_id, outcome(task_id, value), ttl=60.0)
        record = waiter.join()
        assert record is not None and record["value"] == value
        assert waiter.returned_at - stored < 2.0
        assert statements == [1 if value == "short" else 2], task_id
        assert record == producer.result(task_id, 0)


def test_a_result_notification_is_read_as_id_and_record():
    """[id, record], [id], [] (every waiter looks), and a bare id, as earlier code sent."""
    noted = postgres_module._noted
    assert noted('["id-a", {"value": 1}]') == ("id-a", {"value": 1})
    assert noted('["id-a"]') == ("id-a", None)
    assert noted("[]") == (None, None)
    assert noted("id-a") == ("id-a", None)
    assert noted("[not json") == ("[not json", None)
    assert noted('["id-a", 1, 2]') == ('["id-a", 1, 2]', None)


def test_store_result_and_ack_is_one_statement_storing_then_acking(postgres_dsn, queues):
    """The record stored, its waiters woken, and the message's row deleted, in one
    statement; the message is no longer held."""
    queue, producer = queues(), queues()
    producer.schedule(["id-sa", "T"], result_ttl=60)
    message = queue.dequeue(timeout=5)
    assert message is not None
    waiter = Waiter(producer, "id-sa", 10)
    wait_for(lambda: waiting_on(producer, "id-sa"), 5)
    statements = count_statements(queue)
    queue.store_result_and_ack(message, "id-sa", outcome("id-sa", 7), ttl=60)
    assert statements == [1]
    assert waiter.join()["value"] == 7
    assert rows(postgres_dsn, f"SELECT count(*) FROM {queue.table}") == [(0,)]
    with pytest.raises(ValueError, match="not a message this queue object dequeued"):
        queue.ack(message)


def test_store_result_and_ack_refuses_before_storing(postgres_dsn, queues):
    """A message not held, or a record that cannot be stored: nothing stored, nothing
    acked (the held message stays leased and can be acked after)."""
    queue = queues()
    with pytest.raises(ValueError, match="not a message this queue object dequeued"):
        queue.store_result_and_ack(["id-sx", "T"], "id-sx", outcome("id-sx", 1), ttl=5)
    queue.enqueue(["id-sy", "T"])
    message = queue.dequeue(timeout=5)
    with pytest.raises(TypeError):
        queue.store_result_and_ack(message, "id-sy", {"value": object()}, ttl=5)
    with pytest.raises(ValueError, match="ttl"):
        queue.store_result_and_ack(message, "id-sy", outcome("id-sy", 1), ttl=0)
    assert queue.result("id-sx", 0) is None and queue.result("id-sy", 0) is None
    assert rows(postgres_dsn, f"SELECT count(*) FROM {queue.table}") == [(1,)]
    queue.ack(message)
    assert rows(postgres_dsn, f"SELECT count(*) FROM {queue.table}") == [(0,)]


def test_store_result_and_ack_cut_off_stores_and_acks_nothing(postgres_dsn, queues):
    """Its backend terminated: OperationalError, neither the result nor the ack committed,
    the message still leased here (its heartbeat renews it); the next try does both."""
    app = f"tempest-test-{uuid.uuid4().hex[:8]}"
    queue = queues(with_app_name(postgres_dsn, app))
    queue.enqueue(["id-sc", "T"])
    message = queue.dequeue(timeout=5)
    assert message is not None
    terminate(postgres_dsn, app)
    with pytest.raises(psycopg.OperationalError):
        queue.store_result_and_ack(message, "id-sc", outcome("id-sc", 3), ttl=5)
    assert queue.result("id-sc", 0) is None
    assert rows(postgres_dsn, f"SELECT count(*) FROM {queue.table}") == [(1,)]
    queue.heartbeat()
    queue.store_result_and_ack(message, "id-sc", outcome("id-sc", 3), ttl=5)
    assert queue.result("id-sc", 0)["value"] == 3
    assert rows(postgres_dsn, f"SELECT count(*) FROM {queue.table}") == [(0,)]


def test_a_lost_listener_or_close_loses_no_wake_up(postgres_dsn, queues, monkeypatch):
    """The listening backend terminated, or close() during the waits: the waiters listen
    on a new connection and the next store still wakes them promptly."""
    monkeypatch.setattr(postgres_module, "_RESULT_RECHECK", 60.0)
    app = f"tempest-test-{uuid.uuid4().hex[:8]}"
    queue, producer = queues(with_app_name(postgres_dsn, app)), queues()
    waiter = Waiter(queue, "id-lost", 20)
    wait_for(lambda: waiting_on(queue, "id-lost"), 5)
    lost = queue._result_listener
    assert lost is not None
    (pid,), = result_listeners(postgres_dsn, app)
    rows(postgres_dsn, "SELECT pg_terminate_backend(%s)", pid)
    wait_for(lambda: not lost.alive and waiting_on(queue, "id-lost"), 5)
    assert queue._result_listener is not lost
    stored = time.monotonic()
    producer.store_result("id-lost", outcome("id-lost", 1), ttl=60.0)
    assert waiter.join()["value"] == 1 and waiter.returned_at - stored < 2.0

    waiter = Waiter(queue, "id-closed", 20)
    wait_for(lambda: waiting_on(queue, "id-closed"), 5)
    closed = queue._result_listener
    queue.close()
    wait_for(lambda: not closed.thread.is_alive() and waiting_on(queue, "id-closed"), 5)
    stored = time.monotonic()
    producer.store_result("id-closed", outcome("id-closed", 2), ttl=60.0)
    assert waiter.join()["value"] == 2 and waiter.returned_at - stored < 2.0


def test_the_listener_closes_once_no_call_waits(postgres_dsn, queues, monkeypatch):
    """The listener outlives a wait by _KEEP seconds (the next call uses it), then closes
    its connection and its thread ends; a later wait opens a new one."""
    monkeypatch.setattr(postgres_module, "_KEEP", 0.3)
    app = f"tempest-test-{uuid.uuid4().hex[:8]}"
    queue = queues(with_app_name(postgres_dsn, app))
    assert queue.result("id-idle", 0.05) is None
    listener = queue._result_listener
    assert listener is not None and len(result_listeners(postgres_dsn, app)) == 1
    wait_for(lambda: not listener.thread.is_alive(), 5)
    assert not listener.alive and listener.conn.closed
    wait_for(lambda: not result_listeners(postgres_dsn, app), 5)
    assert queue.result("id-idle", 0.05) is None
    assert queue._result_listener is not listener


def test_expired_results_are_hidden_then_swept_a_hundred_at_a_time(postgres_dsn, queues):
    """A record past its expires_at is never returned (waiting or not); each store deletes
    up to 100 expired rows of its queue, and none of another queue's."""
    queue, elsewhere = queues(), queues(name="elsewhere")
    queue.store_result("id-e", outcome("id-e", 7), ttl=0.3)
    assert queue.result("id-e", 0)["value"] == 7
    wait_for(lambda: queue.result("id-e", 0) is None, 10)
    assert queue.result("id-e", 0.2) is None
    assert rows(postgres_dsn, f"SELECT count(*) FROM {queue.table}_results") == [(1,)]
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        for name, count in (("tempest", 249), ("elsewhere", 5)):
            conn.execute(f"INSERT INTO {queue.table}_results (queue, task_id, record, "
                         f"expires_at) SELECT %s, 'id-old-' || i, '{{}}', "
                         f"now() - make_interval(secs => i) FROM generate_series(1, %s) i",
                         (name, count))

    def expired(name: str) -> int:
        (count,), = rows(postgres_dsn, f"SELECT count(*) FROM {queue.table}_results "
                                       f"WHERE queue = %s AND expires_at <= now()", name)
        return int(count)

    assert expired("tempest") == 250
    for left in (150, 50, 0):
        queue.store_result("id-live", outcome("id-live", 8), ttl=60.0)
        assert expired("tempest") == left
    assert expired("elsewhere") == 5 and queue.result("id-live", 0)["value"] == 8
    elsewhere.store_result("id-live", outcome("id-live", 9), ttl=60.0)
    assert expired("elsewhere") == 0


def test_named_queues_keep_their_results_apart(queues):
    """Two queue names in one table: the same id has a record in each, and a store in one
    wakes no waiter of the other."""
    first, second = queues(name="first"), queues(name="second")
    first.store_result("id-n", outcome("id-n", 1), ttl=60.0)
    assert second.result("id-n", 0) is None
    waiter = Waiter(second, "id-n", 0.5)
    wait_for(lambda: waiting_on(second, "id-n"), 5)
    first.store_result("id-n", outcome("id-n", 2), ttl=60.0)
    assert waiter.join() is None
    second.store_result("id-n", outcome("id-n", 3), ttl=60.0)
    assert first.result("id-n", 0)["value"] == 2 and second.result("id-n", 0)["value"] == 3
    assert first._result_channel != second._result_channel != first._channel


def test_a_table_made_before_results_gains_its_column_and_table(postgres_dsn, table, queues):
    """The tables of the version before results gain result_ttl (NULL for the rows there:
    they ask for no result) and <table>_results with its index; then the schema is
    current."""
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(RETRIES_SCHEMA.format(t=table))
        conn.execute(f"INSERT INTO {table} (queue, body, attempts) "
                     f"VALUES ('tempest', '[\"id-old\",\"T\"]', 1)")
        conn.execute(f"INSERT INTO {table}_scheduled (queue, body, priority, available_at) "
                     f"VALUES ('tempest', '[\"id-later\",\"T\"]', 0, now() + interval '1 hour')")
        stale = conn.execute(postgres_module._EXISTING, postgres_module._names(table))
        assert stale.fetchone() == (False,)
    queue = queues()
    message = queue.dequeue()
    assert list(message) == ["id-old", "T"]
    assert queue.attempts(message) == 1 and queue.result_ttl(message) is None
    for name in (table, f"{table}_scheduled"):
        assert "result_ttl" in columns(postgres_dsn, name)
    assert rows(postgres_dsn, f"SELECT result_ttl FROM {table}_scheduled") == [(None,)]
    queue.schedule(["id-new", "T"], result_ttl=30.0)
    assert queue.result_ttl(queue.dequeue()) == 30.0
    queue.store_result("id-new", outcome("id-new", 5), ttl=30.0)
    assert queue.result("id-new", 0)["value"] == 5
    names = {name for (name,) in rows(postgres_dsn, "SELECT relname FROM pg_class "
                                                    "WHERE relname LIKE %s", f"{table}%")}
    assert {f"{table}_results", f"{table}_results_expiry"} <= names
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        current = conn.execute(postgres_module._EXISTING, postgres_module._names(table))
        assert current.fetchone() == (True,)
        conn.execute(f"ALTER TABLE {table}_scheduled DROP COLUMN result_ttl")
        stale = conn.execute(postgres_module._EXISTING, postgres_module._names(table))
        assert stale.fetchone() == (False,)


STORE_ELSEWHERE = """\
import sys, time
from tempest.queues import PostgresQueue
queue = PostgresQueue(sys.argv[1], sys.argv[2])
queue.store_result(sys.argv[3], {"task_id": sys.argv[3], "value": "from afar"}, ttl=60.0)
print(repr(time.time()), flush=True)
queue.close()
"""


def test_a_result_stored_by_another_process_wakes_a_waiter_promptly(postgres_dsn, table,
                                                                     queues, monkeypatch):
    """A store in a subprocess (its own queue object, its own connections) wakes a result()
    waiting here within a fraction of a second of its commit."""
    monkeypatch.setattr(postgres_module, "_RESULT_RECHECK", 60.0)
    queue = queues()
    waiter = Waiter(queue, "id-far", 30)
    wait_for(lambda: waiting_on(queue, "id-far"), 5)
    done = subprocess.run([sys.executable, "-c", STORE_ELSEWHERE, postgres_dsn, table,
                           "id-far"], capture_output=True, text=True, timeout=30, cwd=REPO,
                          check=False)
    assert done.returncode == 0, done.stderr
    stored_at = float(done.stdout.strip())
    record = waiter.join()
    assert record is not None and record["value"] == "from afar"
    assert waiter.wall_at - stored_at < 1.0


def test_ack_and_dequeue_on_a_terminated_connection_acks_on_a_new_one(postgres_dsn, queues):
    """A backend ended under the combined ack and claim: the ack is sent again, alone."""
    app = f"tempest-test-{uuid.uuid4().hex[:8]}"
    queue = queues(with_app_name(postgres_dsn, app), lease=0.5)
    for i in range(2):
        queue.enqueue([f"id-{i}", "Task", i])
    first = queue.dequeue()
    assert first is not None and list(first) == ["id-0", "Task", 0]
    assert terminate(postgres_dsn, app) >= 1  # the pooled connection is dead now
    assert queue.ack_and_dequeue([first], 1) == []  # acked on a new connection, none taken
    other = queues(lease=0.5)
    again = wait_for(lambda: other.dequeue(timeout=0.1), 10)
    assert list(again) == ["id-1", "Task", 1]  # id-0 never comes back
    other.ack(again)
    assert other.dequeue(timeout=1.0) is None


# -- engine records, outcomes and inspection --------------------------------------------


def test_a_table_made_before_engine_records_gains_their_tables(postgres_dsn, table, queues):
    """Tables without <table>_engines and <table>_outcomes get them on first use."""
    first = queues()
    first.enqueue(["id-old", "T"])
    first.close()
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(f"DROP TABLE {table}_engines, {table}_outcomes")
        stale = conn.execute(postgres_module._EXISTING, postgres_module._names(table))
        assert stale.fetchone() == (False,)
    queue = queues()
    queue.announce("e-1", {"engine_id": "e-1", "threads": 4}, 60)
    queue.add_outcomes(120, {"succeeded": 1})
    assert queue.engines() == [{"engine_id": "e-1", "threads": 4}]
    assert queue.peek() == [{"message": ["id-old", "T"], "priority": 0, "attempts": 0}]
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        current = conn.execute(postgres_module._EXISTING, postgres_module._names(table))
        assert current.fetchone() == (True,)


def test_expired_engine_records_and_old_outcomes_are_deleted(postgres_dsn, table, queues):
    """announce deletes expired records and add_outcomes buckets more than two hours
    old, in the statement that does the rest; engines() lists neither."""
    queue = queues()
    queue.announce("e-old", {"engine_id": "e-old"}, 60)
    queue.announce("e-other", {"engine_id": "e-other"}, 60)
    rows(postgres_dsn, f"UPDATE {table}_engines SET expires_at = now() - interval '1 s' "
                       f"RETURNING 1")
    queue.announce("e-new", {"engine_id": "e-new"}, 60)
    assert rows(postgres_dsn, f"SELECT engine_id FROM {table}_engines") == [("e-new",)]
    rows(postgres_dsn, f"UPDATE {table}_engines SET expires_at = now() RETURNING 1")
    assert queue.engines() == []
    assert rows(postgres_dsn, f"SELECT count(*) FROM {table}_engines") == [(1,)]
    queue.announce("e-next", {"engine_id": "e-next"}, 60)
    assert rows(postgres_dsn, f"SELECT engine_id FROM {table}_engines") == [("e-next",)]
    minute = int(time.time() // 60) * 60
    queue.add_outcomes(minute - 3 * 3600, {"failed": 1})
    queue.add_outcomes(minute, {"failed": 2, "succeeded": 1})
    queue.add_outcomes(minute, {"failed": 3})
    assert rows(postgres_dsn, f"SELECT minute, outcome, count FROM {table}_outcomes "
                              f"ORDER BY outcome") == [(minute, "failed", 5),
                                                       (minute, "succeeded", 1)]


def test_engines_and_outcomes_read_through_a_read_only_session(postgres_dsn, table,
                                                                queues):
    """engines() and outcomes() write nothing: they work on a connection whose
    transactions are read-only (a replica, a read-only role), expired records left out."""
    writer = queues()
    minute = int(time.time() // 60) * 60
    writer.announce("e-old", {"engine_id": "e-old"}, 60)
    writer.announce("e-live", {"engine_id": "e-live", "threads": 2}, 60)
    writer.add_outcomes(minute, {"succeeded": 3})
    rows(postgres_dsn, f"UPDATE {table}_engines SET expires_at = now() - interval '1 s' "
                       f"WHERE engine_id = 'e-old' RETURNING 1")
    reader = queues(psycopg.conninfo.make_conninfo(
        postgres_dsn, options="-c default_transaction_read_only=on"))
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        reader.forget_engine("e-old")  # the session is read-only indeed
    assert reader.engines() == [{"engine_id": "e-live", "threads": 2}]
    assert reader.outcomes(minute) == {minute: {"succeeded": 3}}
    assert rows(postgres_dsn, f"SELECT count(*) FROM {table}_engines") == [(2,)]


def test_peek_walks_the_ready_index(postgres_dsn, table, queues):
    """With 20,000 ready rows, peek reads the first ones down the ready index (no sort of
    the table), as the claim does."""
    queue = queues()
    len(queue)
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(f"INSERT INTO {table} (queue, body, priority) SELECT 'tempest', "
                     f"'[\"id-' || i || '\",\"T\"]', i % 3 FROM generate_series(1, 20000) i")
        conn.execute(f"ANALYZE {table}")
        statement = queue._sql["peek"].decode()
        for name, value in (("queue", "'tempest'"), ("max_deliveries", "5"),
                            ("window", "100"), ("limit", "100"), ("offset", "0")):
            statement = statement.replace(f"%({name})s", value)
        conn.execute("SET enable_bitmapscan = off")  # as the queue's connections
        plan = "\n".join(row[0] for row in conn.execute("EXPLAIN " + statement))
    assert f"Index Scan using {table}_ready" in plan, plan
    listed = queue.peek(limit=3)
    assert [e["message"][0] for e in listed] == ["id-2", "id-5", "id-8"]
    assert queue.find("id-19999") == {"status": "waiting", "message": ["id-19999", "T"],
                                      "priority": 1, "attempts": 0}


def test_peek_lists_due_rows_where_the_next_claim_puts_them(postgres_dsn, table, queues):
    """Delayed rows whose time came, not moved in yet, are listed among the ready ones
    where the next claim takes them (their due time is when they became ready); every
    page agrees with the takes."""
    queue = queues()
    queue.enqueue(["id-plain", "T"])
    queue.schedule(["id-high", "T"], priority=2)
    for task_id, priority, back in (("id-due-high", 2, 10), ("id-due-plain", 0, 11),
                                    ("id-due-low", -1, 10)):
        rows(postgres_dsn, f"INSERT INTO {table}_scheduled (queue, body, priority, "
                           f"available_at) VALUES ('tempest', %s, %s, "
                           f"now() - make_interval(secs => %s)) RETURNING 1",
             f'["{task_id}","T"]', priority, back)
    order = ["id-due-high", "id-high", "id-due-plain", "id-plain", "id-due-low"]
    assert [e["message"][0] for e in queue.peek()] == order
    for offset in range(6):
        page = [e["message"][0] for e in queue.peek(limit=2, offset=offset)]
        assert page == order[offset:offset + 2]
    assert queue.peek_scheduled() == []
    assert queue.find("id-due-low")["status"] == "waiting"
    taken = []
    while (message := queue.dequeue()) is not None:
        taken.append(message[0])
        queue.ack(message)
    assert taken == order
