"""SQLiteQueue: the queue contract, then what only a shared SQLite file gives."""

from __future__ import annotations

import collections
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from tempest import ConfigurationError, Task
from tempest.queues import sqlite as sqlite_module
from tempest.queues.protocol import POISON_REASON
from tempest.queues.sqlite import SQLiteQueue
from tempest.testing import QueueContract

from ..conftest import main_log, wait_for
from .engines import EngineProcessChecks, EngineProcesses

REPO = Path(__file__).resolve().parents[2]
CONSUMER_SCRIPT = REPO / "tests" / "scripts" / "sqlite_consumer.py"
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(
    [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))


def sql(path: Path | str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    """Run *query* on a connection of its own (autocommit) and return its rows."""
    with closing(sqlite3.connect(path, timeout=10, isolation_level=None)) as conn:
        return conn.execute(query, params).fetchall()


def store(path: Path | str, queue: SQLiteQueue, *bodies: Any) -> None:
    """Insert *bodies* as they are (no encoding), in one transaction."""
    len(queue)  # the queue creates its tables on first use
    with closing(sqlite3.connect(path, timeout=10)) as conn, conn:
        conn.executemany(
            f"INSERT INTO {queue.table} (queue, body, available_at, enqueued_at) "
            f"VALUES (?, ?, 0, 0)", [(queue.name, body) for body in bodies])


class TestSQLiteQueueContract(QueueContract):
    """SQLiteQueue: each handle is a new consumer (and connection) on this test's file."""

    def make_queue(self, **options: Any) -> SQLiteQueue:
        return SQLiteQueue(self.tmp_path / "q.db", **options)

    def put_raw(self, queue: SQLiteQueue, raw: bytes) -> None:
        store(queue.path, queue, raw)  # a BLOB, not UTF-8: it comes back as bytes


# -- SQLite only ---------------------------------------------------------------------------


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "q.db"


@pytest.fixture
def queues(path: Path) -> Iterator[Callable[..., SQLiteQueue]]:
    """Make SQLiteQueues on the test's file; all are closed afterwards."""
    made: list[SQLiteQueue] = []

    def factory(**options: Any) -> SQLiteQueue:
        queue = SQLiteQueue(path, **options)
        made.append(queue)
        return queue

    yield factory
    for queue in made:
        queue.close()


def test_the_file_is_in_wal_mode(path, queues):
    """The queue puts its file in WAL mode (readers never wait for the writer)."""
    queue = queues()
    queue.enqueue(["id-1", "Task"])
    assert sql(path, "PRAGMA journal_mode") == [("wal",)]
    assert queue.path == str(path)


def test_messages_survive_reopening_the_file(path, queues):
    """Waiting, leased and rejected messages are all still there for a new queue object."""
    first = queues(lease=0.5)
    for i in range(4):
        first.enqueue([f"id-{i}", "Task", i])
    first.ack(first.dequeue())
    first.reject(first.dequeue(), "UnknownTask")
    assert list(first.dequeue()) == ["id-2", "Task", 2]  # leased, never acked
    first.close()

    second = queues(lease=0.5)
    assert list(second.dequeue()) == ["id-3", "Task", 3]
    assert second.rejected() == [(["id-1", "Task", 1], "UnknownTask")]
    again = wait_for(second.dequeue, 10)  # once first's lease runs out
    assert list(again) == ["id-2", "Task", 2]


def test_len_counts_neither_leased_nor_rejected_messages(queues):
    """len() is what waits: a leased message counts again only once its lease ran out."""
    queue = queues(lease=0.3)
    for i in range(3):
        queue.enqueue([f"id-{i}", "Task"])
    held = queue.dequeue()
    queue.reject(queue.dequeue(), "UnknownTask")
    assert len(queue) == 1
    wait_for(lambda: len(queue) == 2, 10)
    queue.ack(held)


def test_consumer_processes_never_share_a_message(path, queues, tmp_path):
    """Six consumers in three processes racing for 600 messages each get their own."""
    results = tmp_path / "results.txt"
    procs = [subprocess.Popen(
        [sys.executable, str(CONSUMER_SCRIPT), "consume", str(path), str(results), "2"],
        stdout=subprocess.PIPE, cwd=tmp_path, env=ENV) for _ in range(3)]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        ids = [f"m{i:04d}" for i in range(600)]
        # All at once, in one transaction: every consumer sees the same head of the queue.
        store(path, queues(), *(f'["{task_id}","Task"]' for task_id in ids),
              *['["stop","Task"]'] * 6)
        for proc in procs:
            assert proc.wait(60) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            assert proc.stdout is not None
            proc.stdout.close()
    done = [line.split() for line in results.read_text().splitlines()]
    counts = collections.Counter(task_id for task_id, _ in done)
    assert sorted(counts) == ids and set(counts.values()) == {1}
    print("per process:", collections.Counter(pid for _, pid in done))
    assert sql(path, "SELECT count(*) FROM tempest_messages") == [(0,)]


def test_another_process_wakes_a_waiting_dequeue_within_a_second(path, queues, tmp_path):
    """An enqueue in another process reaches a waiting dequeue(timeout=10) by polling."""
    consumer = queues()
    len(consumer)  # the tables exist before anyone waits
    waiting = threading.Event()
    got: list[tuple[Any, float]] = []

    def wait() -> None:
        waiting.set()
        got.append((consumer.dequeue(timeout=10), time.monotonic()))

    thread = threading.Thread(target=wait)
    thread.start()
    try:
        assert waiting.wait(5)
        out = subprocess.run(
            [sys.executable, str(CONSUMER_SCRIPT), "enqueue", str(path), "id-x"],
            capture_output=True, check=True, timeout=30, cwd=tmp_path, env=ENV).stdout
    finally:
        thread.join(15)
    sent = float(out)
    message, received = got[0]
    assert list(message) == ["id-x", "Task"]
    print(f"cross-process wake-up: {1000 * (received - sent):.0f} ms")
    assert received - sent < 1.0


def test_an_enqueue_in_this_process_wakes_a_waiting_dequeue_at_once(queues, monkeypatch):
    """Queue objects on one file in one process ring a bell: no waiting for the next poll."""
    monkeypatch.setattr(sqlite_module, "_POLL_MIN", 30.0)  # polling alone would take 30 s
    monkeypatch.setattr(sqlite_module, "_POLL_MAX", 30.0)
    waiting = threading.Event()
    original = sqlite_module._Doorbell.wait

    def wait(self: Any, seen: int, timeout: float) -> None:
        waiting.set()
        original(self, seen, timeout)

    monkeypatch.setattr(sqlite_module._Doorbell, "wait", wait)
    consumer, producer = queues(), queues()
    len(consumer)
    got: list[Any] = []
    thread = threading.Thread(target=lambda: got.append(consumer.dequeue(timeout=20)))
    thread.start()
    try:
        # Once the consumer is in its wait (or about to be: rings are counted).
        assert waiting.wait(5)
        started = time.monotonic()
        producer.enqueue(["id-b", "Task"])
    finally:
        thread.join(25)
    assert list(got[0]) == ["id-b", "Task"]
    assert time.monotonic() - started < 5.0


def test_text_that_is_not_utf8_comes_back_raw_and_blocks_nothing(path, queues):
    """A TEXT body that is not UTF-8 is handed out as bytes; the messages behind it flow."""
    queue = queues()
    len(queue)
    sql(path, "INSERT INTO tempest_messages (queue, body, available_at, enqueued_at) "
              "VALUES ('tempest', CAST(x'ff5b31' AS TEXT), 0, 0)")
    store(path, queue, "not json", '{"a": 1}')
    queue.enqueue(["id-ok", "Task"])
    raw = [queue.dequeue() for _ in range(3)]
    assert raw == [b"\xff[1", "not json", '{"a": 1}']
    for item in raw:
        queue.reject(item, "Undecodable")
    assert list(queue.dequeue()) == ["id-ok", "Task"]
    assert queue.rejected() == [(b"\xff[1", "Undecodable"), ("not json", "Undecodable"),
                                ('{"a": 1}', "Undecodable")]


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


def test_a_run_of_poison_is_set_aside_in_one_dequeue(path, queues, monkeypatch):
    """However many poison messages lead the queue, dequeue() returns the good one behind."""
    monkeypatch.setattr(sqlite_module, "_POISON_BATCH", 2)  # several transactions' worth
    queue = queues(max_deliveries=3)
    for i in range(5):
        queue.enqueue([f"id-p{i}", "Task"])
    sql(path, "UPDATE tempest_messages SET deliveries = 3")
    queue.enqueue(["id-good", "Task"])
    assert list(queue.dequeue()) == ["id-good", "Task"]
    assert queue.rejected() == [([f"id-p{i}", "Task"], POISON_REASON) for i in range(5)]


def test_dequeue_many_leases_a_batch_in_one_transaction(path, queues, monkeypatch):
    """dequeue_many takes what is there, up to count, oldest first, in one commit; each
    message is leased and counted as delivered like one from dequeue."""
    queue = queues()
    for i in range(5):
        queue.enqueue([f"id-{i}", "Task", i])
    commits = queue._commits
    batch = queue.dequeue_many(3, timeout=0)
    assert [list(m) for m in batch] == [[f"id-{i}", "Task", i] for i in range(3)]
    assert queue._commits == commits + 1
    assert sql(path, "SELECT leased_by, deliveries FROM tempest_messages ORDER BY id") == [
        (queue.consumer, 1)] * 3 + [(None, 0)] * 2
    assert len(queue) == 2
    assert [m[2] for m in queue.dequeue_many(10, timeout=0)] == [3, 4]  # fewer: all there is
    assert queue.dequeue_many(10, timeout=0) == []
    assert queue.dequeue_many(0, timeout=5) == []  # at once


def test_each_message_of_a_batch_is_acked_rejected_or_requeued_on_its_own(path, queues):
    queue = queues()
    for i in range(4):
        queue.enqueue([f"id-{i}", "Task", i])
    first, second, third, fourth = queue.dequeue_many(4)
    queue.ack(first)
    queue.reject(second, "BadMessage")
    queue.requeue(third)
    with pytest.raises(ValueError):
        queue.ack(first)
    assert queue.rejected() == [(["id-1", "Task", 1], "BadMessage")]
    assert sql(path, "SELECT body, leased_by, deliveries FROM tempest_messages ORDER BY id") == [
        ('["id-2","Task",2]', None, 0), ('["id-3","Task",3]', queue.consumer, 1)]
    assert list(queue.dequeue()) == ["id-2", "Task", 2]
    queue.ack(fourth)


def test_heartbeat_renews_every_message_of_a_batch(path, queues):
    queue = queues(lease=60)
    for i in range(3):
        queue.enqueue([f"id-{i}", "Task", i])
    batch = queue.dequeue_many(3)
    sql(path, "UPDATE tempest_messages SET lease_until = 0")  # as if about to run out
    before = time.time()
    queue.heartbeat()
    leases = [until for (until,) in sql(path, "SELECT lease_until FROM tempest_messages")]
    assert len(leases) == 3 and all(until >= before + 59 for until in leases)
    for message in batch:
        queue.ack(message)


def test_poison_in_a_batch_is_set_aside_and_the_rest_returned(path, queues, monkeypatch):
    """Poison met while filling a batch is set aside (a transaction's worth, alone, is
    committed and the claim goes on); the batch is filled with the good messages."""
    monkeypatch.setattr(sqlite_module, "_POISON_BATCH", 3)
    queue = queues(max_deliveries=3)
    for name in ["p0", "p1", "p2", "g0", "p3", "g1", "g2", "g3"]:
        queue.enqueue([f"id-{name}", "Task"])
    sql(path, "UPDATE tempest_messages SET deliveries = 3 WHERE body LIKE '%-p%'")
    batch = queue.dequeue_many(3)
    assert [m[0] for m in batch] == ["id-g0", "id-g1", "id-g2"]
    assert [m[0] for m, _ in queue.rejected()] == [f"id-p{i}" for i in range(4)]
    assert sql(path, "SELECT body FROM tempest_messages WHERE leased_by IS NULL") == [
        ('["id-g3","Task"]',)]


def test_dequeue_many_waits_for_the_first_message_only(queues):
    """It returns as soon as one message comes, with whatever else is there by then."""
    queue, producer = queues(), queues()
    result: list[Any] = []
    consumer = threading.Thread(target=lambda: result.append(queue.dequeue_many(8, timeout=10)))
    started = time.monotonic()
    consumer.start()
    time.sleep(0.05)
    producer.enqueue(["id-1", "Task"])
    consumer.join(10)
    assert [[list(m) for m in batch] for batch in result] == [[["id-1", "Task"]]]
    assert time.monotonic() - started < 5


def test_a_failed_batch_claim_leases_nothing(path, queues, monkeypatch):
    """A claim whose transaction fails rolls back every lease of the batch."""
    queue = queues()
    for i in range(3):
        queue.enqueue([f"id-{i}", "Task"])
    first = queue.dequeue()
    queue._pending.append(sqlite_module._Ack(queue._settle(first, "ack")))  # an ack to take

    def fail(conn: sqlite3.Connection, batch: list[Any]) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(queue, "_delete_acked", fail)
    with pytest.raises(sqlite3.OperationalError):
        queue.dequeue_many(2)
    assert len(queue._leases) == 0
    assert sql(path, "SELECT count(*) FROM tempest_messages WHERE leased_by IS NOT NULL") == [(1,)]
    monkeypatch.undo()
    assert [m[0] for m in queue.dequeue_many(2)] == ["id-1", "id-2"]


def test_acks_wait_for_a_claim_only_after_a_claim_for_several(queues):
    """Group commit: an ack waits a moment for the next claim to share its commit only
    when workers queue for claims (a batch was asked for), never after single claims."""
    queue = queues()
    for i in range(4):
        queue.enqueue([f"id-{i}", "Task"])
    assert queue.dequeue() is not None
    assert queue._claims_expected() == 0
    assert len(queue.dequeue_many(2)) == 2
    assert queue._claims_expected() > 0
    queue._batch_claimed_at -= 1  # a second later
    assert queue._claims_expected() == 0


def test_named_queues_and_tables_stay_apart(queues):
    """Different names, or tables, in one file never see each other's messages."""
    mail, video, other = queues(name="mail"), queues(name="video"), queues(table="jobs")
    mail.enqueue(["id-m", "Send"])
    assert video.dequeue() is None and len(video) == 0
    assert other.dequeue() is None and len(other) == 0
    assert list(mail.dequeue()) == ["id-m", "Send"]


def test_settling_a_message_twice_is_an_error(queues):
    """ack/reject/requeue accept only what this queue object dequeued and did not settle."""
    queue, other = queues(), queues()
    queue.enqueue(["id-a", "Task"])
    message = queue.dequeue()
    with pytest.raises(ValueError, match="not a message this queue object dequeued"):
        other.ack(message)
    queue.ack(message)
    with pytest.raises(ValueError, match="already acked"):
        queue.ack(message)


def test_heartbeats_from_another_thread_keep_leases_while_workers_ack(queues):
    """heartbeat() runs safely beside dequeue/ack in other threads, and keeps long tasks."""
    queue = queues(lease=0.5)
    thief = queues(lease=0.5)
    for i in range(200):
        queue.enqueue([f"id-{i}", "Task", i])
    done = threading.Event()
    errors: list[BaseException] = []
    seen: list[int] = []
    lock = threading.Lock()

    def guarded(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as exc:
                errors.append(exc)
        return run

    def beat() -> None:
        while not done.wait(0.05):
            queue.heartbeat()

    def hold_long() -> None:
        message = queue.dequeue()
        done.wait(1.2)  # more than twice the lease
        with lock:
            seen.append(message[2])
        queue.ack(message)

    def work() -> None:
        while (message := queue.dequeue()) is not None:
            with lock:
                seen.append(message[2])
            queue.ack(message)

    threads = [threading.Thread(target=guarded(fn)) for fn in (beat, hold_long)]
    threads[0].start()
    threads[1].start()
    wait_for(lambda: len(queue._leases) == 1, 5)
    workers = [threading.Thread(target=guarded(work)) for _ in range(4)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(30)
    # Every other message is done: the long one stays leased, out of the thief's reach.
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        assert thief.dequeue() is None
        threading.Event().wait(0.05)
    done.set()
    for t in threads:
        t.join(10)
    assert errors == []
    assert sorted(seen) == list(range(200))
    assert len(queue) == 0 and thief.dequeue() is None


def test_a_late_consumer_never_takes_a_message_back(path, queues):
    """Once a lease ran out and another consumer took the message, the first one's
    heartbeat and requeue leave it alone."""
    slow, fast = queues(lease=0.3), queues(lease=30)
    slow.enqueue(["id-1", "Task"])
    late = slow.dequeue()
    taken = wait_for(fast.dequeue, 10)
    slow.heartbeat()
    slow.requeue(late)
    assert sql(path, "SELECT leased_by, deliveries FROM tempest_messages") == [
        (fast.consumer, 2)]
    assert slow.dequeue() is None
    fast.ack(taken)
    assert len(fast) == 0


def test_a_locked_file_is_waited_for_then_reported(path, queues):
    """busy_timeout: a statement waits for another connection's write lock, then fails
    with 'database is locked', and the queue leaves no transaction open behind it."""
    patient, hasty = queues(), queues(busy_timeout=0.2)
    patient.enqueue(["id-1", "Task"])
    locked, release = threading.Event(), threading.Event()

    def hold_the_write_lock() -> None:
        with closing(sqlite3.connect(path, isolation_level=None)) as conn:
            conn.execute("BEGIN IMMEDIATE")
            locked.set()
            release.wait(10)
            conn.execute("COMMIT")

    holder = threading.Thread(target=hold_the_write_lock)
    holder.start()
    try:
        assert locked.wait(5)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            hasty.enqueue(["id-lost", "Task"])
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            hasty.dequeue()  # the claim's BEGIN IMMEDIATE
        threading.Timer(0.3, release.set).start()
        started = time.monotonic()
        patient.enqueue(["id-2", "Task"])  # waits for the lock, then succeeds
        assert time.monotonic() - started >= 0.2
    finally:
        release.set()
        holder.join(10)
    # hasty's failed claim left nothing locked: another writer gets in at once.
    with closing(sqlite3.connect(path, timeout=0, isolation_level=None)) as conn:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
    assert [list(hasty.dequeue()), list(hasty.dequeue())] == [["id-1", "Task"], ["id-2", "Task"]]


def test_first_uses_racing_on_a_new_file_all_succeed(queues):
    """Eight queue objects creating the file, WAL mode and tables at once all work."""
    handles = [queues() for _ in range(8)]
    barrier = threading.Barrier(len(handles))
    errors: list[BaseException] = []

    def first_use(queue: SQLiteQueue) -> None:
        try:
            barrier.wait(5)
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


# -- group commit of acks ------------------------------------------------------------------


def run_threads(targets: list[Callable[[], Any]], timeout: float = 30) -> list[Any]:
    """Run each target in a thread of its own; return what each returned or raised."""
    results: list[Any] = [None] * len(targets)

    def runner(i: int) -> None:
        try:
            results[i] = targets[i]()
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=runner, args=(i,)) for i in range(len(targets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads)
    return results


def test_an_ack_returns_only_once_its_delete_is_committed(path, queues):
    """Right after ack() returns, another connection no longer sees the row -- with eight
    threads acking at once, while a ninth claims (acks share its transactions)."""
    queue = queues()
    for i in range(400):
        queue.enqueue([f"id-{i}", "Task", i])
    taken: list[Any] = []
    lock = threading.Condition()

    def claim() -> int:
        while (message := queue.dequeue()) is not None:
            with lock:
                taken.append(message)
                lock.notify()
        with lock:
            taken.extend([None] * 8)
            lock.notify_all()
        return 0

    def ack() -> int:
        acked = 0
        with closing(sqlite3.connect(path, timeout=10)) as conn:
            while True:
                with lock:
                    lock.wait_for(lambda: taken, 10)
                    message = taken.pop(0)
                if message is None:
                    return acked
                queue.ack(message)
                rows = conn.execute("SELECT count(*) FROM tempest_messages WHERE body = ?",
                                    [f'["id-{message[2]}","Task",{message[2]}]']).fetchone()
                assert rows == (0,), f"acked, yet still in the file: {message}"
                acked += 1

    results = run_threads([claim, *[ack] * 8])
    assert sum(results) == 400, results
    assert sql(path, "SELECT count(*) FROM tempest_messages") == [(0,)]
    assert queue._pending == [] and not queue._flusher and not queue._absorbers


def test_many_threads_acking_at_once_share_commits(path, queues, monkeypatch):
    """Acks waiting while a transaction is in progress are all committed by the next one."""
    queue = queues()
    for i in range(16):
        queue.enqueue([f"id-{i}", "Task"])
    messages = [queue.dequeue() for _ in range(16)]
    batches: list[int] = []
    delete = queue._delete_acked
    monkeypatch.setattr(queue, "_delete_acked",
                        lambda conn, batch: (batches.append(len(batch)), delete(conn, batch)))
    with queue._lock:  # a transaction in progress: the first ack to come waits for it
        threads = [threading.Thread(target=queue.ack, args=(m,)) for m in messages]
        for t in threads:
            t.start()
        wait_for(lambda: len(queue._pending) == 16, 10)
    for t in threads:
        t.join(10)
    assert batches == [16]
    assert sql(path, "SELECT count(*) FROM tempest_messages") == [(0,)]


def test_a_claim_commits_the_acks_pending_in_its_transaction(path, queues, monkeypatch):
    """An ack arriving while a claim waits for the connection is deleted by the claim's
    commit: no transaction of its own."""
    queue = queues()
    for i in range(3):
        queue.enqueue([f"id-{i}", "Task"])
    first = queue.dequeue()
    flushes: list[int] = []
    flush = queue._flush
    monkeypatch.setattr(queue, "_flush", lambda ticket: (flushes.append(1), flush(ticket)))
    claimed: list[Any] = []
    with queue._lock:
        claimer = threading.Thread(target=lambda: claimed.append(queue.dequeue()))
        claimer.start()
        wait_for(lambda: queue._absorbers == 1, 10)
        acker = threading.Thread(target=queue.ack, args=(first,))
        acker.start()
        wait_for(lambda: len(queue._pending) == 1, 10)
    claimer.join(10)
    acker.join(10)
    assert flushes == []
    assert [list(m) for m in claimed] == [["id-1", "Task"]]
    assert sql(path, "SELECT body FROM tempest_messages ORDER BY id") == [
        ('["id-1","Task"]',), ('["id-2","Task"]',)]


def test_a_failed_batch_fails_every_ack_in_it(path, queues, monkeypatch):
    """If the transaction deleting a batch fails, each ack of the batch raises, nothing is
    deleted, and the messages come back once their leases run out."""
    queue = queues(lease=0.5)
    for i in range(6):
        queue.enqueue([f"id-{i}", "Task"])
    messages = [queue.dequeue() for _ in range(6)]

    def fail(conn: sqlite3.Connection, batch: list[Any]) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(queue, "_delete_acked", fail)
    with queue._lock:
        threads = [threading.Thread(target=lambda m=m: errors.append(_ack_error(queue, m)))
                   for m in messages]
        errors: list[BaseException | None] = []
        for t in threads:
            t.start()
        wait_for(lambda: len(queue._pending) == 6, 10)
    for t in threads:
        t.join(10)
    assert len(errors) == 6
    assert all(isinstance(e, sqlite3.OperationalError) and "disk I/O error" in str(e)
               for e in errors), errors
    assert sql(path, "SELECT count(*) FROM tempest_messages") == [(6,)]
    monkeypatch.undo()
    again = [wait_for(queue.dequeue, 10) for _ in range(6)]  # leases ran out
    assert sorted(m[0] for m in again) == [f"id-{i}" for i in range(6)]
    for message in again:
        queue.ack(message)
    assert len(queue) == 0 and sql(path, "SELECT count(*) FROM tempest_messages") == [(0,)]


def test_a_failed_claim_fails_the_acks_it_took(path, queues, monkeypatch):
    """Acks taken into a claim's transaction raise when that transaction fails."""
    queue = queues()
    for i in range(3):
        queue.enqueue([f"id-{i}", "Task"])
    first = queue.dequeue()

    def fail(conn: sqlite3.Connection, batch: list[Any]) -> None:
        raise sqlite3.OperationalError("database disk image is malformed")

    monkeypatch.setattr(queue, "_delete_acked", fail)
    results: list[Any] = []
    with queue._lock:
        claimer = threading.Thread(target=lambda: results.append(_dequeue_error(queue)))
        claimer.start()
        wait_for(lambda: queue._absorbers == 1, 10)
        acker = threading.Thread(target=lambda: results.append(_ack_error(queue, first)))
        acker.start()
        wait_for(lambda: len(queue._pending) == 1, 10)
    claimer.join(10)
    acker.join(10)
    assert [type(r) for r in results] == [sqlite3.OperationalError] * 2
    # Nothing was committed: the claimed message is not leased, the acked one is still there.
    assert sql(path, "SELECT count(*) FROM tempest_messages WHERE leased_by IS NOT NULL") == [(1,)]
    monkeypatch.undo()
    assert list(queue.dequeue()) == ["id-1", "Task"]


def test_close_while_acks_wait_drops_none(path, queues):
    """close() while acks wait for the connection: they are committed on a new one."""
    queue = queues()
    for i in range(4):
        queue.enqueue([f"id-{i}", "Task"])
    messages = [queue.dequeue() for _ in range(4)]
    with queue._lock:
        threads = [threading.Thread(target=queue.ack, args=(m,)) for m in messages]
        for t in threads:
            t.start()
        wait_for(lambda: len(queue._pending) == 4, 10)
        closer = threading.Thread(target=queue.close)
        closer.start()
    closer.join(10)
    for t in threads:
        t.join(10)
    assert sql(path, "SELECT count(*) FROM tempest_messages") == [(0,)]


def _ack_error(queue: SQLiteQueue, message: Any) -> BaseException | None:
    try:
        queue.ack(message)
    except BaseException as exc:
        return exc
    return None


def _dequeue_error(queue: SQLiteQueue) -> Any:
    try:
        return queue.dequeue()
    except BaseException as exc:
        return exc


def test_close_keeps_the_queue_usable(queues):
    """After close(), the next call opens a new connection."""
    queue = queues()
    queue.enqueue(["id-1", "Task"])
    queue.close()
    queue.close()
    assert len(queue) == 1
    message = queue.dequeue()
    queue.close()
    queue.ack(message)  # the lease belongs to the object, not to its connection
    assert len(queue) == 0


def test_schema_is_the_documented_one():
    """The tables the queue creates are the ones its docstring shows."""
    names = {key: f'"{value}"' for key, value in sqlite_module._names("tempest_messages").items()}
    assert textwrap.indent(sqlite_module._SCHEMA.format(**names), "    ") in sqlite_module.__doc__


@pytest.mark.parametrize("bad", ["Jobs", "jobs-1", "x; DROP TABLE y", "", "a" * 49, 7,
                                 "sqlite_jobs"])
def test_table_must_be_a_plain_identifier(path, bad):
    """A table name that is not a plain lowercase identifier is refused at construction."""
    with pytest.raises(ConfigurationError, match="plain lowercase identifier"):
        SQLiteQueue(path, bad)


@pytest.mark.parametrize("bad", ["", ":memory:", "file:q.db?mode=memory", 7, None])
def test_path_must_name_a_file(bad):
    """An in-memory database (one per connection) or a non-path is refused."""
    with pytest.raises(ConfigurationError, match="path must"):
        SQLiteQueue(bad)


@pytest.mark.parametrize("options", [{"lease": 0}, {"lease": "30"}, {"max_deliveries": 0},
                                     {"max_deliveries": True}, {"busy_timeout": -1},
                                     {"lease": 3, "heartbeat_interval": 3}, {"name": ""}])
def test_bad_options_are_refused(path, options):
    """Out-of-range leases, delivery limits, timeouts and names raise ConfigurationError."""
    with pytest.raises(ConfigurationError):
        SQLiteQueue(path, **options)


def test_defaults_and_repr(path):
    """The heartbeat is a third of the lease unless given; repr names file and consumer."""
    queue = SQLiteQueue(path, lease=9)
    assert (queue.heartbeat_interval, queue.max_deliveries, queue.busy_timeout) == (3.0, 5, 10.0)
    assert SQLiteQueue(path, heartbeat_interval=1).heartbeat_interval == 1.0
    assert str(path) in repr(queue) and queue.consumer in repr(queue)
    assert not path.exists()  # nothing is opened before the first use


class SqSum(Task):
    def process(self, a: int, b: int) -> int:
        return a + b


def test_engine_with_four_threads_drains_500_messages(path, queues, make_engine):
    """An engine in burst mode processes and acks 500 messages, at-least-once."""
    queue = queues()
    engine = make_engine(threads=4, queue=queue)
    for i in range(500):
        engine.submit(SqSum, i, 1)
    engine.run(burst=True)
    stats = engine.stats()
    assert (stats["processed"], stats["succeeded"], stats["queued"]) == (500, 500, 0)
    assert sql(path, "SELECT count(*) FROM tempest_messages") == [(0,)]
    assert "guarantee=at-least-once" in main_log(engine).splitlines()[0]


def test_engine_rejects_what_it_cannot_run_into_the_file(path, queues, make_engine):
    """Bad input the engine rejects is kept in <table>_rejected with the reason."""
    queue = queues()
    store(path, queue, b"\xff\xfe")
    queue.enqueue(["id-u", "NoSuchTask"])
    engine = make_engine(threads=2, queue=queue)
    engine.run(burst=True)
    assert engine.stats()["rejected"] == 2
    assert sorted(queue.rejected(), key=lambda kept: kept[1]) == [
        (b"\xff\xfe", "Undecodable"),
        (["id-u", "NoSuchTask"], "UnknownTask")]


# -- engines in processes of their own -----------------------------------------------------


@pytest.fixture
def engines(tmp_path: Path, path: Path) -> Iterator[EngineProcesses]:
    """Engine processes on the test's file; any still running is killed afterwards."""
    processes = EngineProcesses(
        tmp_path, "sqlite", [str(path)],
        left=lambda: int(sql(path, "SELECT count(*) FROM tempest_messages")[0][0]))
    try:
        yield processes
    finally:
        processes.kill_all()


class TestEngineProcesses(EngineProcessChecks):
    """kill -9 and three engines, on this queue."""

    periodic_engines = 2  # the engines of one machine share the file's write lock


# -- scheduling ------------------------------------------------------------------------


OLD_SCHEMA = """\
CREATE TABLE tempest_messages (id INTEGER PRIMARY KEY AUTOINCREMENT, queue TEXT NOT NULL,
    body TEXT NOT NULL, priority INTEGER NOT NULL DEFAULT 0, available_at REAL NOT NULL,
    enqueued_at REAL NOT NULL, deliveries INTEGER NOT NULL DEFAULT 0, leased_by TEXT,
    lease_until REAL);
CREATE INDEX tempest_messages_dequeue ON tempest_messages (queue, priority DESC, id);
CREATE TABLE tempest_messages_rejected (id INTEGER PRIMARY KEY, queue TEXT NOT NULL,
    body TEXT NOT NULL, reason TEXT NOT NULL, rejected_at REAL NOT NULL);"""


def test_a_file_made_before_scheduling_gains_its_tables(tmp_path):
    """The tables of an earlier version: the new ones come, the old index goes, rows stay."""
    path = tmp_path / "old.db"
    with closing(sqlite3.connect(path)) as conn:
        conn.executescript(OLD_SCHEMA)
        conn.execute("INSERT INTO tempest_messages (queue, body, available_at, enqueued_at) "
                     "VALUES ('tempest', '[\"id-old\",\"T\"]', 0, 0)")
        conn.commit()
    queue = SQLiteQueue(path)
    try:
        queue.schedule(["id-later", "T"], delay=60)
        assert len(queue) == 1 and queue.scheduled_count() == 1
        names = {name for (name,) in sql(path, "SELECT name FROM sqlite_master")}
        assert {"tempest_messages_scheduled", "tempest_messages_fired",
                "tempest_messages_ready"} <= names
        assert "tempest_messages_dequeue" not in names
        assert list(queue.dequeue()) == ["id-old", "T"]
    finally:
        queue.close()


def test_claims_read_the_ready_index(path, queues):
    """The claim walks the index by priority and readiness: no sort, no table scan."""
    queue = queues()
    len(queue)
    candidate = queue._sql["candidate"]
    plan = sql(path, "EXPLAIN QUERY PLAN " + candidate.replace(":queue", "'q'")
               .replace(":now", "0").replace(":limit", "1"))
    text = " ".join(str(row[-1]) for row in plan)
    assert "tempest_messages_ready" in text and "TEMP B-TREE" not in text, text


def test_peek_reads_the_indexes_in_order(path, queues):
    """peek's and peek_scheduled's reads walk the indexes in the take order: no sort."""
    queue = queues()
    len(queue)
    for key in ("ready_rows", "due_rows", "later_rows"):
        text = queue._sql[key]
        for name in ("now", "limit", "offset", "max_deliveries"):
            text = text.replace(f":{name}", "1")
        plan = sql(path, "EXPLAIN QUERY PLAN " + text.replace(":queue", "'q'"))
        steps = " ".join(str(row[-1]) for row in plan)
        assert "USING INDEX" in steps and "TEMP B-TREE" not in steps, (key, steps)


def test_peek_lists_due_rows_where_the_next_claim_puts_them(path, queues):
    """Delayed rows whose time came, not moved in yet, are listed among the ready ones
    where the next claim takes them (their due time is when they became ready); every
    page agrees with the takes."""
    queue = queues()
    queue.enqueue(["id-plain", "T"])
    queue.schedule(["id-high", "T"], priority=2)
    past = time.time() - 10
    for task_id, priority, at in (("id-due-high", 2, past), ("id-due-plain", 0, past - 1),
                                  ("id-due-low", -1, past)):
        sql(path, "INSERT INTO tempest_messages_scheduled (queue, body, priority, "
                  "available_at) VALUES ('tempest', ?, ?, ?)",
            f'["{task_id}","T"]', priority, at)
    # By priority, then by the time each became ready: a due row's time is its due time.
    order = ["id-due-high", "id-high", "id-due-plain", "id-plain", "id-due-low"]
    assert [e["message"][0] for e in queue.peek()] == order
    for offset in range(6):
        page = [e["message"][0] for e in queue.peek(limit=2, offset=offset)]
        assert page == order[offset:offset + 2]
    assert queue.peek_scheduled() == []
    taken = []
    while (message := queue.dequeue()) is not None:
        taken.append(message[0])
        queue.ack(message)
    assert taken == order


def test_a_file_made_before_engine_records_gains_their_tables(tmp_path):
    """A file without the engines and outcomes tables gets them on first use; rows stay."""
    path = tmp_path / "old.db"
    queue = SQLiteQueue(path)
    queue.enqueue(["id-old", "T"])
    queue.close()
    sql(path, 'DROP TABLE "tempest_messages_engines"')
    sql(path, 'DROP TABLE "tempest_messages_outcomes"')
    reopened = SQLiteQueue(path)
    try:
        reopened.announce("e-1", {"engine_id": "e-1"}, 60)
        reopened.add_outcomes(120, {"succeeded": 1})
        assert reopened.engines() == [{"engine_id": "e-1"}]
        assert reopened.peek() == [{"message": ["id-old", "T"], "priority": 0, "attempts": 0}]
        names = {name for (name,) in sql(path, "SELECT name FROM sqlite_master")}
        assert {"tempest_messages_engines", "tempest_messages_outcomes"} <= names
    finally:
        reopened.close()


def test_old_outcomes_and_expired_engines_are_deleted(path, queues):
    """add_outcomes deletes buckets over two hours old and announce expired records, in
    the transaction that does the rest."""
    queue = queues()
    now = int(time.time() // 60) * 60
    queue.add_outcomes(now - 3 * 3600, {"failed": 1})
    queue.announce("e-old", {"engine_id": "e-old"}, 60)
    sql(path, "UPDATE tempest_messages_engines SET expires_at = 1")
    queue.add_outcomes(now, {"failed": 2})
    assert sql(path, "SELECT minute, count FROM tempest_messages_outcomes") == [(now, 2)]
    queue.announce("e-new", {"engine_id": "e-new"}, 60)
    assert sql(path, "SELECT engine_id FROM tempest_messages_engines") == [("e-new",)]


def test_fired_slots_are_forgotten_after_keep(path, queues):
    """fire() deletes the slots of its schedule recorded more than keep seconds ago."""
    queue = queues()
    assert queue.fire("s", 1.0, ["s@1", "T"], keep=3600)
    sql(path, "UPDATE tempest_messages_fired SET recorded_at = recorded_at - 7200")
    assert queue.fire("s", 2.0, ["s@2", "T"], keep=3600)
    assert sql(path, "SELECT slot FROM tempest_messages_fired") == [(2.0,)]
    assert queue.last_fired("s") == 2.0


def test_a_waiting_dequeue_wakes_at_the_delayed_time(queues):
    """A waiting dequeue sleeps until the next delayed message's time, not its poll pause."""
    queue = queues()
    queue.schedule(["id-soon", "T"], delay=0.05)
    began = time.monotonic()
    message = queue.dequeue(timeout=5)
    assert message is not None and list(message) == ["id-soon", "T"]
    assert time.monotonic() - began < 1.0


# -- retries and the failed store ------------------------------------------------------


SCHEMA_BEFORE_RETRIES = """\
CREATE TABLE tempest_messages (id INTEGER PRIMARY KEY AUTOINCREMENT, queue TEXT NOT NULL,
    body TEXT NOT NULL, priority INTEGER NOT NULL DEFAULT 0, available_at REAL NOT NULL,
    enqueued_at REAL NOT NULL, deliveries INTEGER NOT NULL DEFAULT 0, leased_by TEXT,
    lease_until REAL);
CREATE INDEX tempest_messages_ready ON tempest_messages (queue, priority DESC, available_at, id);
CREATE TABLE tempest_messages_rejected (id INTEGER PRIMARY KEY, queue TEXT NOT NULL,
    body TEXT NOT NULL, reason TEXT NOT NULL, rejected_at REAL NOT NULL);
CREATE TABLE tempest_messages_scheduled (id INTEGER PRIMARY KEY, queue TEXT NOT NULL,
    body TEXT NOT NULL, priority INTEGER NOT NULL, available_at REAL NOT NULL);
CREATE INDEX tempest_messages_scheduled_due ON tempest_messages_scheduled (queue, available_at);
CREATE TABLE tempest_messages_fired (queue TEXT NOT NULL, schedule TEXT NOT NULL,
    slot REAL NOT NULL, recorded_at REAL NOT NULL, PRIMARY KEY (queue, schedule, slot));"""


def columns(path: Path | str, table: str) -> list[str]:
    """The column names of *table*, in order."""
    return [row[1] for row in sql(path, f'PRAGMA table_info("{table}")')]


def record(task_id: str, when: float, *args: Any, attempts: int = 1) -> dict[str, Any]:
    """A failed-store record as the engine makes it."""
    return {"task_id": task_id, "task": "Task", "args": list(args), "attempts": attempts,
            "error_type": "ValueError", "error": "bad value",
            "traceback": "Traceback (most recent call last):\nValueError: bad value\n",
            "last_failed_at": when}


def fail_one(queue: SQLiteQueue, task_id: str, when: float, *, keep: int = 100,
             ttl: float = 3600.0, priority: int = 0) -> int:
    """Store, take and fail a message of *task_id*; return what fail() returned."""
    queue.schedule([task_id, "Task", 1], priority=priority)
    message = queue.dequeue()
    assert message is not None and message[0] == task_id
    return queue.fail(message, record(task_id, when, 1), keep=keep, ttl=ttl)


def add_trigger(path: Path | str, table: str, event: str) -> None:
    """Make every *event* (INSERT, DELETE) on *table* fail, as a full disk would."""
    sql(path, f'CREATE TRIGGER boom BEFORE {event} ON "{table}" '
              f"BEGIN SELECT RAISE(ABORT, 'disk I/O error'); END")


def test_a_file_made_before_retries_gains_its_columns_and_table(tmp_path):
    """The message tables of the version before retries gain attempts and first_failed_at
    (rows kept, counted 0), and the failed store comes; a second opening changes nothing."""
    path = tmp_path / "old.db"
    with closing(sqlite3.connect(path)) as conn:
        conn.executescript(SCHEMA_BEFORE_RETRIES)
        conn.execute("INSERT INTO tempest_messages (queue, body, available_at, enqueued_at) "
                     "VALUES ('tempest', '[\"id-old\",\"T\"]', 0, 0)")
        conn.execute("INSERT INTO tempest_messages_scheduled (queue, body, priority, "
                     "available_at) VALUES ('tempest', '[\"id-due\",\"T\"]', 2, 1)")
        conn.commit()
    queue = SQLiteQueue(path)
    try:
        first = queue.dequeue()  # the due one is promoted: its priority is higher
        assert list(first) == ["id-due", "T"] and queue.attempts(first) == 0
        for table in ("tempest_messages", "tempest_messages_scheduled"):
            assert columns(path, table)[-3:] == ["attempts", "first_failed_at", "result_ttl"]
        assert columns(path, "tempest_messages_failed") == [
            "queue", "task_id", "body", "task", "attempts", "error_type", "error",
            "traceback", "first_failed_at", "last_failed_at", "priority", "expires_at"]
        names = {name for (name,) in sql(path, "SELECT name FROM sqlite_master")}
        assert "tempest_messages_failed_latest" in names
        queue.retry(first, delay=0, failed_at=100.0)
        again = queue.dequeue()  # its priority kept: first again
        assert list(again) == ["id-due", "T"] and queue.attempts(again) == 1
        queue.ack(again)
        old = queue.dequeue()
        assert list(old) == ["id-old", "T"] and queue.attempts(old) == 0
        assert queue.fail(old, record("id-old", time.time()), keep=10, ttl=60) == 0
    finally:
        queue.close()
    schema = sql(path, "SELECT sql FROM sqlite_master ORDER BY name")
    reopened = SQLiteQueue(path)
    try:
        assert reopened.find_failed("id-old") is not None
    finally:
        reopened.close()
    assert sql(path, "SELECT sql FROM sqlite_master ORDER BY name") == schema


def test_a_file_made_before_scheduling_gains_the_retry_columns_too(tmp_path):
    """The oldest tables gain scheduling and retries in one go."""
    path = tmp_path / "older.db"
    with closing(sqlite3.connect(path)) as conn:
        conn.executescript(OLD_SCHEMA)
    queue = SQLiteQueue(path)
    try:
        queue.enqueue(["id-1", "T"])
        message = queue.dequeue()
        queue.retry(message, delay=60, failed_at=5.0)
        assert sql(path, "SELECT attempts, first_failed_at FROM tempest_messages_scheduled"
                   ) == [(1, 5.0)]
    finally:
        queue.close()


def test_attempts_costs_no_query(queues):
    """attempts(m) is read from the lease: no statement reaches the file."""
    queue = queues()
    queue.enqueue(["id-1", "T"])
    message = queue.dequeue()
    statements: list[str] = []
    assert queue._conn is not None
    queue._conn.set_trace_callback(statements.append)
    try:
        assert queue.attempts(message) == 0
    finally:
        queue._conn.set_trace_callback(None)
    assert statements == []
    queue.ack(message)


def test_attempts_and_the_first_failure_survive_promotion_requeue_and_redelivery(
        path, queues):
    """The count and first failure time travel with the row: through <table>_scheduled,
    a requeue and a lease that ran out; only retry() counts, and keeps the first time."""
    queue, other = queues(lease=0.3), queues(lease=30)
    queue.schedule(["id-a", "T", 1], priority=4)
    queue.retry(queue.dequeue(), delay=0.2, failed_at=1000.0)
    assert sql(path, "SELECT priority, attempts, first_failed_at "
                     "FROM tempest_messages_scheduled") == [(4, 1, 1000.0)]
    assert len(queue) == 0 and queue.scheduled_count() == 1
    promoted = queue.dequeue(timeout=10)  # wakes at the delayed time
    assert promoted is not None and list(promoted) == ["id-a", "T", 1]
    assert queue.attempts(promoted) == 1
    queue.requeue(promoted)
    given_back = queue.dequeue()
    assert queue.attempts(given_back) == 1  # ...and this consumer dies
    redelivered = wait_for(other.dequeue, 10)
    assert list(redelivered) == ["id-a", "T", 1] and other.attempts(redelivered) == 1
    other.retry(redelivered, delay=0, failed_at=2000.0)
    assert sql(path, "SELECT priority, attempts, first_failed_at, leased_by "
                     "FROM tempest_messages") == [(4, 2, 1000.0, None)]
    last = other.dequeue()
    assert other.attempts(last) == 2
    when = time.time()
    other.fail(last, record("id-a", when, 1, attempts=3), keep=10, ttl=60)
    entry = other.find_failed("id-a")
    assert entry is not None
    assert (entry["first_failed_at"], entry["last_failed_at"], entry["priority"]) == (
        1000.0, when, 4)
    assert sql(path, "SELECT count(*) FROM tempest_messages") == [(0,)]


def test_retry_with_no_delay_takes_its_turn_by_priority_and_readiness(queues):
    """A message retried at once is ready now: after those of its priority already ready."""
    queue = queues()
    queue.schedule(["id-r", "T"], priority=1)
    message = queue.dequeue()
    queue.schedule(["id-before", "T"], priority=1)
    queue.schedule(["id-low", "T"], priority=0)
    queue.retry(message, delay=0, failed_at=time.time())
    queue.schedule(["id-after", "T"], priority=1)
    order = []
    while (m := queue.dequeue()) is not None:
        order.append(m[0])
        queue.ack(m)
    assert order == ["id-before", "id-r", "id-after", "id-low"]


def test_a_retry_wakes_a_waiting_dequeue_in_this_process(queues, monkeypatch):
    """retry() rings the bell, as schedule() does: no waiting for the next poll."""
    monkeypatch.setattr(sqlite_module, "_POLL_MIN", 30.0)
    monkeypatch.setattr(sqlite_module, "_POLL_MAX", 30.0)
    producer, consumer = queues(), queues()
    producer.enqueue(["id-w", "T"])
    message = producer.dequeue()
    assert consumer.dequeue() is None  # empty: its next look would be 30 s away
    got: list[Any] = []
    thread = threading.Thread(target=lambda: got.append(consumer.dequeue(timeout=20)))
    thread.start()
    try:
        wait_for(lambda: consumer._pause == 30.0 or got, 5)
        started = time.monotonic()
        producer.retry(message, delay=0, failed_at=time.time())
    finally:
        thread.join(25)
    assert list(got[0]) == ["id-w", "T"]
    assert time.monotonic() - started < 5.0
    consumer.ack(got[0])


def test_a_retry_whose_transaction_fails_leaves_the_leased_message(path, queues):
    """If the delete of the leased row fails, the insert of the retried one is rolled back:
    the message comes back after its lease with the count it had, once."""
    queue, other = queues(lease=0.3), queues()
    queue.enqueue(["id-x", "T"])
    message = queue.dequeue()
    add_trigger(path, "tempest_messages", "DELETE")
    with pytest.raises(sqlite3.Error, match="disk I/O error"):
        queue.retry(message, delay=60, failed_at=time.time())
    assert queue._conn is not None and not queue._conn.in_transaction  # rolled back
    sql(path, "DROP TRIGGER boom")
    assert sql(path, "SELECT count(*) FROM tempest_messages_scheduled") == [(0,)]
    assert sql(path, "SELECT leased_by, attempts FROM tempest_messages") == [
        (queue.consumer, 0)]
    again = wait_for(other.dequeue, 10)
    assert list(again) == ["id-x", "T"] and other.attempts(again) == 0
    other.ack(again)
    assert other.dequeue() is None and other.scheduled_count() == 0


@pytest.mark.parametrize(("table", "event", "keep"), [
    ("tempest_messages", "DELETE", 10),  # settling the leased row fails
    ("tempest_messages_failed", "INSERT", 10),  # storing the entry fails
    ("tempest_messages_failed", "DELETE", 0),  # trimming the store fails
])
def test_a_fail_whose_transaction_fails_leaves_the_leased_message(path, queues, table, event,
                                                                  keep):
    """Whichever statement of fail() fails, nothing of it stays: the message is still
    leased (it comes back after its lease) and the failed store holds no entry of it."""
    queue, other = queues(lease=0.3), queues()
    assert fail_one(queue, "id-earlier", time.time() - 5) == 0  # an entry to trim
    queue.enqueue(["id-f", "T"])
    message = queue.dequeue()
    add_trigger(path, table, event)
    with pytest.raises(sqlite3.Error, match="disk I/O error"):
        queue.fail(message, record("id-f", time.time()), keep=keep, ttl=60)
    sql(path, "DROP TRIGGER boom")
    assert [e["task_id"] for e in queue.failed()] == ["id-earlier"]
    again = wait_for(other.dequeue, 10)
    assert list(again) == ["id-f", "T"] and other.attempts(again) == 0
    other.ack(again)


def test_retry_and_fail_of_a_message_not_held_change_nothing(path, queues):
    """Like ack: ValueError for a message this object did not dequeue, or settled."""
    queue, other = queues(), queues()
    queue.enqueue(["id-n", "T"])
    message = queue.dequeue()
    for call in (lambda: other.attempts(message),
                 lambda: other.retry(message, delay=0, failed_at=1.0),
                 lambda: other.fail(message, record("id-n", 1.0), keep=1, ttl=60)):
        with pytest.raises(ValueError, match="not a message this queue object dequeued"):
            call()
    queue.retry(message, delay=0, failed_at=1.0)
    for call in (lambda: queue.attempts(message), lambda: queue.ack(message),
                 lambda: queue.retry(message, delay=0, failed_at=1.0),
                 lambda: queue.fail(message, record("id-n", 1.0), keep=1, ttl=60)):
        with pytest.raises(ValueError, match="already acked"):
            call()
    assert sql(path, "SELECT attempts FROM tempest_messages") == [(1,)]
    assert queue.failed_count() == 0


def test_a_late_retry_or_fail_leaves_the_message_to_its_new_consumer(path, queues):
    """Once the lease ran out and another consumer took the message, the first one's
    retry and fail store nothing: the new holder runs it with the count it had."""
    slow, fast = queues(lease=0.3), queues(lease=30)
    slow.enqueue(["id-1", "T"])
    slow.enqueue(["id-2", "T"])
    late_retry, late_fail = slow.dequeue(), slow.dequeue()
    taken = [wait_for(fast.dequeue, 10), wait_for(fast.dequeue, 10)]
    slow.retry(late_retry, delay=0, failed_at=1.0)
    assert slow.fail(late_fail, record("id-2", time.time()), keep=10, ttl=60) == 0
    assert slow.failed_count() == 0 and slow.scheduled_count() == 0
    assert sql(path, "SELECT leased_by, attempts FROM tempest_messages") == [
        (fast.consumer, 0)] * 2
    for message in taken:
        fast.ack(message)


def test_the_keep_bound_drops_the_oldest_failures_not_the_oldest_writes(queues):
    """Beyond keep, the entries with the earliest last_failed_at go, whenever stored."""
    queue = queues()
    now = time.time()
    assert fail_one(queue, "id-newest", now, keep=2) == 0
    assert fail_one(queue, "id-oldest", now - 100, keep=2) == 0
    assert fail_one(queue, "id-middle", now - 50, keep=2) == 1
    assert [e["task_id"] for e in queue.failed()] == ["id-newest", "id-middle"]


def test_the_keep_bound_holds_with_consumers_failing_at_once(path, queues):
    """Four queue objects failing 10 messages each in threads, keep=5: 5 stay, 35 dropped."""
    handles = [queues() for _ in range(4)]
    for i in range(40):
        handles[0].enqueue([f"id-{i}", "T"])
    start = threading.Barrier(4, timeout=10)
    dropped: list[int] = []

    def fail_ten(queue: SQLiteQueue) -> None:
        messages = [queue.dequeue() for _ in range(10)]
        start.wait()
        for message in messages:
            dropped.append(queue.fail(message, record(message[0], time.time()), keep=5,
                                      ttl=60))

    threads = [threading.Thread(target=fail_ten, args=(h,)) for h in handles]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads) and len(dropped) == 40
    assert sum(dropped) == 35
    assert handles[1].failed_count() == 5
    assert sql(path, "SELECT count(*) FROM tempest_messages_failed") == [(5,)]
    assert sql(path, "SELECT count(*) FROM tempest_messages") == [(0,)]


def test_expired_entries_vanish_at_once_and_go_at_the_next_fail(path, queues):
    """An entry past its expires_at is neither listed, counted, found, retried nor deleted
    (False) even while it is in the file; the next fail() drops it and counts it."""
    queue = queues()
    now = time.time()
    fail_one(queue, "id-old", now - 10, ttl=60)
    fail_one(queue, "id-new", now, ttl=60)
    sql(path, "UPDATE tempest_messages_failed SET expires_at = ? WHERE task_id = 'id-old'",
        now - 1)
    assert queue.failed_count() == 1 and [e["task_id"] for e in queue.failed()] == ["id-new"]
    assert queue.find_failed("id-old") is None and queue.retry_failed("id-old") is False
    assert sql(path, "SELECT count(*) FROM tempest_messages_failed") == [(2,)]
    assert fail_one(queue, "id-third", now, ttl=60) == 1
    assert sorted(task_id for (task_id,) in sql(path, "SELECT task_id FROM "
                                                      "tempest_messages_failed")) == [
        "id-new", "id-third"]
    assert queue.retry_failed_all() == 2 and len(queue) == 2


def test_a_ttl_already_past_drops_the_new_entry(queues):
    """With a ttl shorter than the failure's age, the entry is dropped as it is stored."""
    queue = queues()
    assert fail_one(queue, "id-gone", time.time() - 10, ttl=5) == 1
    assert queue.failed_count() == 0


def test_retry_failed_stores_the_message_ready_with_its_priority(path, queues):
    """retry_failed(): the message [task_id, task, *args] is ready now, at its priority,
    attempts 0 and no first failure; the entry is gone, in the same transaction."""
    queue = queues()
    fail_one(queue, "id-p", time.time() - 5, priority=9)
    queue.enqueue(["id-plain", "T"])
    assert queue.retry_failed("id-p") is True
    assert sql(path, "SELECT body, priority, attempts, first_failed_at, leased_by "
                     "FROM tempest_messages ORDER BY priority DESC") == [
        ('["id-p","Task",1]', 9, 0, None, None), ('["id-plain","T"]', 0, 0, None, None)]
    assert sql(path, "SELECT count(*) FROM tempest_messages_failed") == [(0,)]
    message = queue.dequeue()
    assert list(message) == ["id-p", "Task", 1] and queue.attempts(message) == 0
    queue.ack(message)
    assert queue.retry_failed("id-p") is False


def test_retry_failed_all_stores_the_oldest_failure_first(queues):
    """Every entry back, ready in the order they failed (at equal priority)."""
    queue = queues()
    now = time.time()
    for task_id, age in [("id-b", 20), ("id-c", 10), ("id-a", 30)]:
        fail_one(queue, task_id, now - age)
    assert queue.retry_failed_all() == 3
    order = []
    while (m := queue.dequeue()) is not None:
        order.append(m[0])
        queue.ack(m)
    assert order == ["id-a", "id-b", "id-c"]


def test_a_retry_failed_whose_transaction_fails_keeps_the_entry(path, queues):
    """If deleting the entry fails, the stored message is rolled back: entry, no message."""
    queue = queues()
    fail_one(queue, "id-k", time.time())
    add_trigger(path, "tempest_messages_failed", "DELETE")
    with pytest.raises(sqlite3.Error, match="disk I/O error"):
        queue.retry_failed("id-k")
    with pytest.raises(sqlite3.Error, match="disk I/O error"):
        queue.retry_failed_all()
    sql(path, "DROP TRIGGER boom")
    assert len(queue) == 0 and queue.find_failed("id-k") is not None


def test_delete_and_purge_remove_expired_entries_uncounted(path, queues):
    """Expired entries leave the file with delete_failed/purge_failed, never counted."""
    queue = queues()
    now = time.time()
    for task_id in ("id-1", "id-2", "id-3"):
        fail_one(queue, task_id, now)
    sql(path, "UPDATE tempest_messages_failed SET expires_at = 0 WHERE task_id <> 'id-3'")
    assert queue.delete_failed("id-1") is False
    assert sql(path, "SELECT task_id FROM tempest_messages_failed ORDER BY task_id") == [
        ("id-2",), ("id-3",)]
    assert queue.purge_failed() == 1
    assert sql(path, "SELECT count(*) FROM tempest_messages_failed") == [(0,)]


def test_named_queues_keep_failed_stores_apart(path, queues):
    """One table, two queue names: each sees, retries and purges only its own entries."""
    mail, video = queues(name="mail"), queues(name="video")
    fail_one(mail, "id-same", time.time())
    fail_one(video, "id-same", time.time() - 1)
    fail_one(video, "id-v", time.time())
    assert (mail.failed_count(), video.failed_count()) == (1, 2)
    assert mail.purge_failed() == 1 and video.failed_count() == 2
    assert video.retry_failed_all() == 2 and len(mail) == 0 and len(video) == 2


def test_failed_pages_read_the_latest_index(path, queues):
    """Listing the store walks (queue, last_failed_at) backwards: no sort, no table scan."""
    queue = queues()
    len(queue)
    with closing(sqlite3.connect(path)) as conn:
        plan = conn.execute("EXPLAIN QUERY PLAN " + queue._sql["failed"], {
            "queue": "q", "now": 0, "limit": 10, "offset": 0}).fetchall()
    text = " ".join(str(row[-1]) for row in plan)
    assert "tempest_messages_failed_latest" in text, text


# -- results ---------------------------------------------------------------------------


SCHEMA_BEFORE_RESULTS = """\
CREATE TABLE tempest_messages (id INTEGER PRIMARY KEY AUTOINCREMENT, queue TEXT NOT NULL,
    body TEXT NOT NULL, priority INTEGER NOT NULL DEFAULT 0, available_at REAL NOT NULL,
    enqueued_at REAL NOT NULL, deliveries INTEGER NOT NULL DEFAULT 0, leased_by TEXT,
    lease_until REAL, attempts INTEGER NOT NULL DEFAULT 0, first_failed_at REAL);
CREATE INDEX tempest_messages_ready ON tempest_messages (queue, priority DESC, available_at, id);
CREATE TABLE tempest_messages_rejected (id INTEGER PRIMARY KEY, queue TEXT NOT NULL,
    body TEXT NOT NULL, reason TEXT NOT NULL, rejected_at REAL NOT NULL);
CREATE TABLE tempest_messages_scheduled (id INTEGER PRIMARY KEY, queue TEXT NOT NULL,
    body TEXT NOT NULL, priority INTEGER NOT NULL, available_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, first_failed_at REAL);
CREATE INDEX tempest_messages_scheduled_due ON tempest_messages_scheduled (queue, available_at);
CREATE TABLE tempest_messages_fired (queue TEXT NOT NULL, schedule TEXT NOT NULL,
    slot REAL NOT NULL, recorded_at REAL NOT NULL, PRIMARY KEY (queue, schedule, slot));
CREATE TABLE tempest_messages_failed (queue TEXT NOT NULL, task_id TEXT NOT NULL,
    body TEXT NOT NULL, task TEXT NOT NULL, attempts INTEGER NOT NULL,
    error_type TEXT NOT NULL, error TEXT NOT NULL, traceback TEXT NOT NULL,
    first_failed_at REAL NOT NULL, last_failed_at REAL NOT NULL, priority INTEGER NOT NULL,
    expires_at REAL NOT NULL, PRIMARY KEY (queue, task_id));
CREATE INDEX tempest_messages_failed_latest ON tempest_messages_failed (queue, last_failed_at);"""


def done(task_id: str, value: Any) -> dict[str, Any]:
    """A success record as the engine makes it (the queue adds expires_at)."""
    return {"task_id": task_id, "task": "Task", "state": "succeeded", "value": value,
            "error_type": None, "error": None, "traceback": None, "attempts": 1,
            "finished_at": 1733500000.5}


def result_rows(path: Path | str, name: str | None = None) -> int:
    """How many records (live or expired) the results table holds, for one queue or all."""
    if name is None:
        return int(sql(path, "SELECT count(*) FROM tempest_messages_results")[0][0])
    return int(sql(path, "SELECT count(*) FROM tempest_messages_results WHERE queue = ?",
                   name)[0][0])


class Waiter:
    """result(task_id, timeout) in a thread: what it returned, and when (monotonic)."""

    def __init__(self, queue: SQLiteQueue, task_id: str, timeout: float) -> None:
        self.queue, self.task_id = queue, task_id
        self.record: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.returned_at: float | None = None
        self.thread = threading.Thread(target=self._run, args=(timeout,), daemon=True)
        self.thread.start()

    def _run(self, timeout: float) -> None:
        try:
            self.record = self.queue.result(self.task_id, timeout)
        except BaseException as exc:  # reported by join()
            self.error = exc
        self.returned_at = time.monotonic()

    def blocked(self, count: int = 1) -> None:
        """Wait (bounded) until *count* waiters listen for this id on the process's bell."""
        bell = self.queue._result_bell
        wait_for(lambda: len(bell.waiters.get(self.task_id, ())) >= count, 10)

    def join(self) -> dict[str, Any] | None:
        self.thread.join(30)
        assert not self.thread.is_alive(), "result() did not return"
        if self.error is not None:
            raise self.error
        return self.record


def test_result_ttl_is_read_from_the_lease_without_a_query(path, queues):
    """schedule(result_ttl=) -> dequeue -> result_ttl(m), no statement; None for enqueue,
    for fire and for a schedule without it; a delayed message's promotion keeps it."""
    queue = queues()
    queue.schedule(["id-r", "T"], result_ttl=90.5)
    queue.enqueue(["id-e", "T"])
    queue.schedule(["id-s", "T"])
    assert queue.fire("every", 1.0, ["id-f", "T"], keep=60)
    queue.schedule(["id-d", "T"], delay=0.05, result_ttl=7)
    held = [queue.dequeue() for _ in range(4)]
    assert sorted(m[0] for m in held) == ["id-e", "id-f", "id-r", "id-s"]
    statements: list[str] = []
    assert queue._conn is not None
    queue._conn.set_trace_callback(statements.append)
    try:
        ttls = {m[0]: queue.result_ttl(m) for m in held}
    finally:
        queue._conn.set_trace_callback(None)
    assert statements == []
    assert ttls == {"id-f": None, "id-r": 90.5, "id-e": None, "id-s": None}
    delayed = queue.dequeue(timeout=5)
    assert delayed is not None and delayed[0] == "id-d"
    assert queue.result_ttl(delayed) == 7.0 and isinstance(queue.result_ttl(delayed), float)
    for message in [*held, delayed]:
        queue.ack(message)
    with pytest.raises(ValueError, match=r"SQLiteQueue\.result_ttl"):
        queue.result_ttl(delayed)  # settled: no longer held


def test_requeue_redelivery_and_retry_keep_the_result_ttl(path, queues):
    """requeue, a lease that ran out (another object takes the row), retry now and retry
    later (via the scheduled table): the ttl stays; retry counts one attempt more."""
    first = queues(lease=0.3)
    first.schedule(["id-r", "T"], result_ttl=30.0)
    message = first.dequeue()
    first.requeue(message)
    message = first.dequeue()
    assert first.result_ttl(message) == 30.0
    second = queues(lease=30)
    recovered = wait_for(second.dequeue, 10)  # once first's lease ran out
    assert list(recovered) == ["id-r", "T"] and second.result_ttl(recovered) == 30.0
    second.retry(recovered, delay=0, failed_at=100.0)
    again = second.dequeue()
    assert (second.result_ttl(again), second.attempts(again)) == (30.0, 1)
    second.retry(again, delay=0.05, failed_at=200.0)
    assert sql(path, "SELECT result_ttl, attempts FROM tempest_messages_scheduled") == [
        (30.0, 2)]
    later = second.dequeue(timeout=5)
    assert later is not None
    assert (second.result_ttl(later), second.attempts(later)) == (30.0, 2)
    second.ack(later)
    # first still holds its (expired) lease locally; its ack touches nothing
    first.ack(message)
    assert sql(path, "SELECT count(*) FROM tempest_messages")[0][0] == 0


def test_retry_failed_stores_the_message_without_its_result_ttl(queues):
    """The failed store keeps no ttl: retry_failed and retry_failed_all ask for no result."""
    queue = queues()
    for task_id in ("id-1", "id-2"):
        queue.schedule([task_id, "Task", 1], result_ttl=60)
        message = queue.dequeue()
        assert queue.result_ttl(message) == 60.0
        queue.fail(message, record(task_id, time.time(), 1), keep=10, ttl=60)
    assert queue.retry_failed("id-1") is True
    assert queue.retry_failed_all() == 1
    back = [queue.dequeue(), queue.dequeue()]
    assert sorted(m[0] for m in back) == ["id-1", "id-2"]
    assert [queue.result_ttl(m) for m in back] == [None, None]
    for message in back:
        queue.ack(message)


def test_a_stored_result_is_read_back_with_expires_at_and_replaced(path, queues):
    """store_result then result(timeout=0), from another object: the record with
    expires_at (this clock + ttl); a second store replaces it (one row)."""
    queue, other = queues(), queues()
    before = time.time()
    queue.store_result("id-1", done("id-1", {"a": [1, 2.5, None]}), ttl=60)
    got = other.result("id-1", 0)
    assert got is not None
    assert {k: v for k, v in got.items() if k != "expires_at"} == done(
        "id-1", {"a": [1, 2.5, None]})
    assert before + 60 <= got["expires_at"] <= time.time() + 60
    queue.store_result("id-1", done("id-1", "again"), ttl=60)
    assert other.result("id-1", 0)["value"] == "again"
    assert result_rows(path) == 1


def test_the_result_of_an_unknown_id_is_none_after_its_timeout(queues):
    """timeout=0: None at once; timeout=0.2: None after about 0.2 s."""
    queue = queues()
    began = time.monotonic()
    assert queue.result("id-none", 0) is None
    assert time.monotonic() - began < 0.5
    began = time.monotonic()
    assert queue.result("id-none", 0.2) is None
    assert 0.19 <= time.monotonic() - began < 2.0
    with pytest.raises(ValueError):
        queue.result("id-none", -1)


def test_a_waiting_result_wakes_at_once_when_another_object_stores_it(queues):
    """A result(timeout=10) blocked in a thread wakes promptly when another queue object
    of this process stores its record: the median of five wakes is far below a poll."""
    waiting, storing = queues(), queues()
    lags = []
    for i in range(5):
        waiter = Waiter(waiting, f"id-{i}", 10)
        waiter.blocked()
        stored = time.monotonic()
        storing.store_result(f"id-{i}", done(f"id-{i}", i), ttl=60)
        got = waiter.join()
        assert got is not None and got["value"] == i
        assert waiter.returned_at is not None
        lags.append(waiter.returned_at - stored)
    assert max(lags) < 2.0
    assert sorted(lags)[2] < 0.1, lags  # no once-a-second poll; not even the 50 ms one


def test_every_waiter_on_an_id_wakes_and_only_theirs(queues):
    """Three waiters on one id all wake at its store; one on another id waits on, and
    wakes at its own store."""
    queue, producer = queues(), queues()
    mine = [Waiter(queue, "id-a", 20) for _ in range(3)]
    other = Waiter(queue, "id-b", 20)
    mine[0].blocked(3)
    other.blocked()
    producer.store_result("id-a", done("id-a", "A"), ttl=60)
    assert [w.join()["value"] for w in mine] == ["A", "A", "A"]  # type: ignore[index]
    assert other.thread.is_alive() and other.returned_at is None
    producer.store_result("id-b", done("id-b", "B"), ttl=60)
    assert other.join()["value"] == "B"  # type: ignore[index]
    assert queue._result_bell.waiters == {}  # every waiter stopped listening


def test_an_expired_result_is_not_returned_and_a_later_store_deletes_it(path, queues):
    """A record past its expires_at is not returned (nor waited into), and the next
    store_result deletes it."""
    queue = queues()
    queue.store_result("id-short", done("id-short", 1), ttl=0.3)
    assert queue.result("id-short", 0) is not None
    wait_for(lambda: queue.result("id-short", 0) is None, 10)  # bounded, until it expired
    assert queue.result("id-short", 0.05) is None
    assert result_rows(path) == 1  # still there, never returned
    queue.store_result("id-long", done("id-long", 2), ttl=60)
    assert sql(path, "SELECT task_id FROM tempest_messages_results") == [("id-long",)]


def test_a_store_deletes_at_most_100_expired_results_of_its_queue(path, queues):
    """The sweep is bounded (oldest first) and reads the expiry index: a backlog of
    expired records drains over several stores; other queues' records are left alone."""
    queue = queues()
    len(queue)
    rows = [("tempest", f"id-{i}", "{}", 1000.0 + i) for i in range(150)]
    rows += [("other", f"id-{i}", "{}", 1.0) for i in range(5)]
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.executemany("INSERT INTO tempest_messages_results VALUES (?, ?, ?, ?)", rows)
    queue.store_result("id-new", done("id-new", 0), ttl=60)
    assert result_rows(path, "tempest") == 51 and result_rows(path, "other") == 5
    left = sql(path, "SELECT min(expires_at) FROM tempest_messages_results "
                     "WHERE queue = 'tempest' AND task_id <> 'id-new'")
    assert left == [(1100.0,)]  # the oldest went first
    queue.store_result("id-new2", done("id-new2", 0), ttl=60)
    assert result_rows(path, "tempest") == 2
    with closing(sqlite3.connect(path)) as conn:
        plan = conn.execute("EXPLAIN QUERY PLAN " + queue._sql["sweep_results"],
                            {"queue": "q", "now": 0}).fetchall()
    text = " ".join(str(row[-1]) for row in plan)
    assert "tempest_messages_results_expiry" in text, text


def test_named_queues_keep_their_results_apart(path, queues):
    """One table, two names: the same task id holds two records; a store under one name
    wakes no waiter of the other."""
    mail, video = queues(name="mail"), queues(name="video")
    mail.store_result("id-same", done("id-same", "mail"), ttl=60)
    assert video.result("id-same", 0) is None
    waiter = Waiter(video, "id-same", 20)
    waiter.blocked()
    mail.store_result("id-same", done("id-same", "mail, again"), ttl=60)
    assert waiter.thread.is_alive() and waiter.returned_at is None
    video.store_result("id-same", done("id-same", "video"), ttl=60)
    assert waiter.join()["value"] == "video"  # type: ignore[index]
    assert mail.result("id-same", 0)["value"] == "mail, again"  # type: ignore[index]
    assert (result_rows(path, "mail"), result_rows(path, "video")) == (1, 1)


def test_result_looks_use_a_connection_of_their_own(queues):
    """A waiting result() reads on the object's reader connection, never on the one (and
    under the lock) that claims and acks use."""
    queue = queues()
    queue.enqueue(["id-1", "T"])
    message = queue.dequeue()
    statements: list[str] = []
    assert queue._conn is not None
    queue._conn.set_trace_callback(statements.append)
    try:
        waiter = Waiter(queue, "id-x", 20)
        waiter.blocked()
        with queue._lock:  # a claim in progress does not hold up the waiter's looks
            queue.store_result  # noqa: B018 - nothing: just holding the lock a moment
        queue.ack(message)  # acks go on while it waits
    finally:
        queue._conn.set_trace_callback(None)
    assert not any("_results" in s for s in statements), statements
    queue.store_result("id-x", done("id-x", 1), ttl=60)
    assert waiter.join() is not None
    assert queue._reader is not None and queue._reader is not queue._conn


def test_bad_ttls_and_records_store_nothing(path, queues):
    """A ttl that is not seconds > 0, or a record that is not JSON: ValueError or
    TypeError, and nothing is stored."""
    queue = queues()
    len(queue)  # the tables exist: result_rows below reads them
    for bad in (0, -1, float("nan"), float("inf"), True, "60"):
        with pytest.raises(ValueError, match="seconds > 0"):
            queue.store_result("id-1", done("id-1", 1), ttl=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="result_ttl"):
            queue.schedule(["id-1", "T"], result_ttl=bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        queue.store_result("id-1", done("id-1", object()), ttl=60)
    assert result_rows(path) == 0 and len(queue) == 0


def test_a_file_made_before_results_gains_the_column_and_table(tmp_path):
    """The tables of the version before results gain result_ttl (old rows ask for none)
    and <table>_results with its index; a second opening changes nothing."""
    path = tmp_path / "old.db"
    with closing(sqlite3.connect(path)) as conn:
        conn.executescript(SCHEMA_BEFORE_RESULTS)
        conn.execute("INSERT INTO tempest_messages (queue, body, available_at, enqueued_at) "
                     "VALUES ('tempest', '[\"id-old\",\"T\"]', 0, 0)")
        conn.execute("INSERT INTO tempest_messages_scheduled (queue, body, priority, "
                     "available_at) VALUES ('tempest', '[\"id-due\",\"T\"]', 2, 1)")
        conn.commit()
    queue = SQLiteQueue(path)
    try:
        due = queue.dequeue()  # promoted from the old scheduled table
        assert list(due) == ["id-due", "T"] and queue.result_ttl(due) is None
        old = queue.dequeue()
        assert list(old) == ["id-old", "T"] and queue.result_ttl(old) is None
        for table in ("tempest_messages", "tempest_messages_scheduled"):
            assert columns(path, table)[-1] == "result_ttl"
        assert columns(path, "tempest_messages_results") == [
            "queue", "task_id", "record", "expires_at"]
        names = {name for (name,) in sql(path, "SELECT name FROM sqlite_master")}
        assert "tempest_messages_results_expiry" in names
        queue.schedule(["id-new", "T"], result_ttl=5)
        new = queue.dequeue()
        assert queue.result_ttl(new) == 5.0
        queue.store_result("id-new", done("id-new", 3), ttl=5)
        for message in (due, old, new):
            queue.ack(message)
    finally:
        queue.close()
    schema = sql(path, "SELECT sql FROM sqlite_master ORDER BY name")
    reopened = SQLiteQueue(path)
    try:
        assert reopened.result("id-new", 0)["value"] == 3  # type: ignore[index]
    finally:
        reopened.close()
    assert sql(path, "SELECT sql FROM sqlite_master ORDER BY name") == schema


def test_a_result_stored_by_another_process_wakes_a_waiter_here(path, queues):
    """A subprocess stores the record: the waiter here, blocked in result(timeout=20),
    sees it within the documented poll (_RESULT_POLL_MAX, 50 ms; asserted generously)."""
    queue = queues()
    waiter = Waiter(queue, "id-far", 20)
    waiter.blocked()
    code = textwrap.dedent(f"""
        import time
        from tempest.queues.sqlite import SQLiteQueue
        queue = SQLiteQueue({str(path)!r})
        len(queue)  # the connection is opened first: it is not what is measured
        queue.store_result("id-far", {done("id-far", 42)!r}, ttl=60)
        print(time.time(), flush=True)
        queue.close()
    """)
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True,
                         text=True, timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    stored_at = float(out.stdout.split()[-1])
    got = waiter.join()
    woke_at = time.time() - (time.monotonic() - waiter.returned_at)  # type: ignore[operator]
    assert got is not None and got["value"] == 42
    assert sqlite_module._RESULT_POLL_MAX == 0.05
    assert woke_at - stored_at < 0.5, woke_at - stored_at


def test_engines_and_outcomes_only_read(path, queues):
    """engines() and outcomes() take no write lock: another connection holding the file's
    write lock does not hold them up, and the expired record is left for announce."""
    queue = queues(busy_timeout=2)
    minute = int(time.time() // 60) * 60
    queue.add_outcomes(minute, {"succeeded": 2})
    queue.announce("e-old", {"engine_id": "e-old"}, 60)
    queue.announce("e-live", {"engine_id": "e-live"}, 60)
    sql(path, "UPDATE tempest_messages_engines SET expires_at = 1 WHERE engine_id = 'e-old'")
    queue.enqueue(["id-bad", "T"])
    queue.reject(queue.dequeue(), "Nope")
    with closing(sqlite3.connect(path, timeout=10, isolation_level=None)) as writer:
        writer.execute("BEGIN IMMEDIATE")  # the write lock, held until the ROLLBACK
        try:
            started = time.monotonic()
            assert queue.engines() == [{"engine_id": "e-live"}]
            assert queue.outcomes(minute) == {minute: {"succeeded": 2}}
            assert queue.rejected(1) == [(["id-bad", "T"], "Nope")]
            assert time.monotonic() - started < 1.5  # no wait for the busy timeout
        finally:
            writer.execute("ROLLBACK")
    assert sql(path, "SELECT engine_id FROM tempest_messages_engines ORDER BY engine_id") \
        == [("e-live",), ("e-old",)]  # the read deleted nothing
    queue.announce("e-new", {"engine_id": "e-new"}, 60)
    assert sql(path, "SELECT engine_id FROM tempest_messages_engines ORDER BY engine_id") \
        == [("e-live",), ("e-new",)]
