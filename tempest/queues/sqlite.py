"""SQLiteQueue: a durable queue in an SQLite file, shared by the engines of one machine.

Standard library only (:mod:`sqlite3`, SQLite 3.8 or newer). The file is put
in WAL mode, so readers never wait for the writer; every process and thread
that opens the same file (and table and name) sees the same queue.

Schema
------
The queue creates its tables on first use, unless they exist; for the default
table ``tempest_messages`` they are::

    CREATE TABLE IF NOT EXISTS "tempest_messages" (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        queue TEXT NOT NULL,
        body TEXT NOT NULL,
        priority INTEGER NOT NULL DEFAULT 0,
        available_at REAL NOT NULL,
        enqueued_at REAL NOT NULL,
        deliveries INTEGER NOT NULL DEFAULT 0,
        leased_by TEXT,
        lease_until REAL
    );
    CREATE INDEX IF NOT EXISTS "tempest_messages_dequeue"
        ON "tempest_messages" (queue, priority DESC, id);
    CREATE TABLE IF NOT EXISTS "tempest_messages_rejected" (
        id INTEGER PRIMARY KEY,
        queue TEXT NOT NULL,
        body TEXT NOT NULL,
        reason TEXT NOT NULL,
        rejected_at REAL NOT NULL
    );

Times are Unix seconds from the machine's clock. ``body`` is the message as
JSON text; a body that is not (a BLOB, text that is not UTF-8 or not a JSON
list) comes back raw for the engine to reject. ``AUTOINCREMENT`` matters: a
plain rowid is reused once the newest rows are deleted, and a consumer whose
lease ran out could then ack a new message that took its old id.

Where a message can be lost or run twice
----------------------------------------
Every change is one SQLite transaction: it happened whole or not at all,
whatever instant the process dies at.

- ``enqueue`` returns once the row is committed. With ``synchronous=NORMAL``
  in WAL mode a commit survives the process being killed (the WAL is in the
  operating system's hands). A power loss or OS crash may undo the commits
  since the last checkpoint (which syncs the disk) -- enqueued messages lost,
  acked ones run again -- but never corrupts the file. That is the one loss
  this queue allows, to spare an fsync per message.
- A claim (``BEGIN IMMEDIATE``: select the oldest available row, lease it)
  holds the file's write lock from the select to the commit, so two consumers,
  in any threads or processes, never lease the same row. A consumer that dies
  after the commit, before or while running the task, leaves the row leased:
  it becomes available again when the lease runs out, and runs again. That is
  the only way a message runs twice -- apart from a task that outlives its
  lease because heartbeats stopped or the clock stepped forward.
- ``ack`` deletes the row after the outcome. A crash before it (or an ack
  that fails) means one more run, never a lost message.
- ``requeue`` clears the lease (only if this consumer still holds it) and
  takes back the delivery it counted; ``reject`` and poison moves insert into
  ``<table>_rejected`` and delete in one transaction: never both, never neither.
- Otherwise a message is dropped only by ``ack``, never by a failure.

Leases expire by the wall clock: if it steps back, leases last longer (a dead
engine's messages wait that much longer); a step forward can end a live
lease early. Messages enqueued to run at once are not delayed by a step back.
"""

from __future__ import annotations

import math
import os
import re
import secrets
import socket
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from tempest.exceptions import ConfigurationError
from tempest.queues import protocol

__all__ = ["SQLiteQueue"]

_T = TypeVar("_T")

_TABLE = re.compile(r"[a-z_][a-z0-9_]{0,47}\Z")
# The rule PostgresQueue follows, so one name works in both.

_BUSY_TIMEOUT = 10.0
"""Default seconds a statement waits for another connection's write lock."""

_POLL_MIN, _POLL_MAX = 0.005, 0.1
"""Seconds between looks at the file while a dequeue waits for another process's message.

The pause doubles while the queue stays empty, across calls, and starts again
at ``_POLL_MIN`` once a message comes: a message from another process waits
about 5 ms while the queue is busy, at most ``_POLL_MAX`` once it has been idle.
An idle consumer looks ten times a second, each look one read (no write lock,
no fsync, ~20 µs); its cost is the thread's wake-ups, a few tenths of a percent
of a core.
"""

_CHUNK = 500
"""Ids per heartbeat statement: older SQLite allows 999 parameters at most."""

_POISON_BATCH = 50
"""Poison rows set aside per claim transaction, so the write lock is held briefly."""

_SCHEMA = """\
CREATE TABLE IF NOT EXISTS {table} (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    body TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    available_at REAL NOT NULL,
    enqueued_at REAL NOT NULL,
    deliveries INTEGER NOT NULL DEFAULT 0,
    leased_by TEXT,
    lease_until REAL
);
CREATE INDEX IF NOT EXISTS {dequeue_index}
    ON {table} (queue, priority DESC, id);
CREATE TABLE IF NOT EXISTS {rejected} (
    id INTEGER PRIMARY KEY,
    queue TEXT NOT NULL,
    body TEXT NOT NULL,
    reason TEXT NOT NULL,
    rejected_at REAL NOT NULL
);"""

# A row is available when its time has come and it is not leased, or its lease
# ran out. "available_at <= enqueued_at" makes a message enqueued to run at
# once (every message, today) available whatever the clock does later; only a
# delayed message will depend on the clock.
_AVAILABLE = """\
queue = :queue AND (available_at <= :now OR available_at <= enqueued_at)
AND (lease_until IS NULL OR lease_until < :now)"""

_SQL = {
    "peek": "SELECT 1 FROM {table} WHERE " + _AVAILABLE + " LIMIT 1",
    "candidate": "SELECT id, deliveries, CAST(body AS BLOB) FROM {table} WHERE "
                 + _AVAILABLE + " ORDER BY priority DESC, id LIMIT 1",
    "lease": "UPDATE {table} SET leased_by = :consumer, lease_until = :until, "
             "deliveries = deliveries + 1 WHERE id = :id",
    "enqueue": "INSERT INTO {table} (queue, body, available_at, enqueued_at) "
               "VALUES (:queue, :body, :now, :now)",
    "ack": "DELETE FROM {table} WHERE id = :id",
    "keep": "INSERT INTO {rejected} (queue, body, reason, rejected_at) "
            "SELECT queue, body, :reason, :now FROM {table} WHERE id = :id",
    "requeue": "UPDATE {table} SET leased_by = NULL, lease_until = NULL, "
               "deliveries = max(deliveries - 1, 0) WHERE id = :id AND leased_by = :consumer",
    "waiting": "SELECT count(*) FROM {table} WHERE " + _AVAILABLE,
    "rejected": "SELECT CAST(body AS BLOB), reason FROM {rejected} "
                "WHERE queue = :queue ORDER BY id",
}
# Bodies are read CAST AS BLOB: sqlite3 raises on TEXT that is not UTF-8, and
# one such row would otherwise fail every claim for ever. _stored() decodes.


def _names(table: str) -> dict[str, str]:
    return {"table": table, "rejected": f"{table}_rejected", "dequeue_index": f"{table}_dequeue"}


class _Raw(str):
    """A stored body that is not a message (text), handed to the engine as stored.

    A fresh object each time (``str`` caches short strings): the queue finds
    the row again by the identity of what ``dequeue`` returned.
    """

    __slots__ = ()


class _RawBytes(bytes):
    """A stored body that is not even UTF-8, handed to the engine as stored bytes."""

    __slots__ = ()


def _stored(blob: bytes) -> Any:
    """The message in *blob*, or the body raw: str if it is UTF-8, else bytes."""
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError:
        return _RawBytes(blob)
    message = protocol.decode(text)
    return _Raw(text) if message is text else message


class _Doorbell:
    """Wakes the dequeues waiting in this process on one queue (file, table, name).

    Another process's enqueue rings no bell here: waiters also look at the
    file every ``_POLL_MAX`` seconds at most.
    """

    def __init__(self) -> None:
        self.condition = threading.Condition(threading.Lock())
        self.rings = 0

    def ring(self) -> None:
        with self.condition:
            self.rings += 1
            self.condition.notify_all()

    def seen(self) -> int:
        with self.condition:
            return self.rings

    def wait(self, seen: int, timeout: float) -> None:
        """Wait up to *timeout* seconds unless it rang after *seen*."""
        with self.condition:
            if self.rings == seen:
                self.condition.wait(timeout)


_doorbells: weakref.WeakValueDictionary[tuple[str, str, str], _Doorbell] = (
    weakref.WeakValueDictionary())
_doorbells_lock = threading.Lock()
_forked_away: list[sqlite3.Connection] = []
"""Connections a forked child inherited: SQLite forbids using (or closing) them there,
and dropping the last reference would close them."""


def _doorbell(key: tuple[str, str, str]) -> _Doorbell:
    with _doorbells_lock:
        bell = _doorbells.get(key)
        if bell is None:
            bell = _doorbells[key] = _Doorbell()
        return bell


def _after_fork_in_child() -> None:
    # Another thread may have held the lock (or a bell's) at the fork: start afresh.
    global _doorbells, _doorbells_lock
    _doorbells = weakref.WeakValueDictionary()
    _doorbells_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class SQLiteQueue:
    """A durable queue in an SQLite file, shared by the threads and processes of one machine.

    ``path`` names the database file (created if missing; its folder must
    exist); ``table`` names the table (created on first use, see the module
    docstring), and ``name`` the queue within it, so one file can hold several
    queues. Delivery is **at-least-once**: a message stays in the file, leased
    to the consumer that dequeued it, until that consumer acks it.

    Durability
        Every change is committed before the call returns, in WAL mode with
        ``synchronous=NORMAL``: a committed message survives the process
        being killed (``kill -9``, a crash). A power loss or OS crash may undo
        the commits since the last checkpoint -- enqueued messages lost, acked
        ones run again -- but never the file's consistency: avoiding it would
        cost an fsync per message, which this queue does not pay.
    Leases
        A dequeued message is leased for ``lease`` seconds (default 30),
        renewed by ``heartbeat()`` every ``heartbeat_interval`` seconds
        (default a third of the lease). When a process dies, its leases run
        out and another consumer takes its messages: a message runs again
        only then. Leases follow the machine's wall clock.
    Poison
        A message delivered more than ``max_deliveries`` times (default 5)
        without an outcome is moved to ``<table>_rejected`` with the reason
        ``TooManyDeliveries`` instead of being handed out again.
    Waiting
        ``dequeue(timeout=...)`` wakes at once when this process enqueues (any
        SQLiteQueue object on the same file, table and name). Another process's
        message is found by looking at the file: every 5 ms while messages
        come, backing off to every 0.1 s while none do. So it waits at most
        about 0.1 s, and an idle engine costs ten cheap reads a second.
    Many consumers
        A claim runs in ``BEGIN IMMEDIATE``, holding the file's write lock from
        choosing the row to leasing it: no two consumers, in any threads or
        processes, lease the same row. A statement waits up to
        ``busy_timeout`` seconds (default 10) for another connection's write
        lock, then raises ``sqlite3.OperationalError: database is locked``;
        the engine logs a failed dequeue and retries with a backoff.

    Each queue object opens one connection (lazily), shared by its threads under
    a lock: SQLite admits one writer at a time anyway, so threads queueing on
    a Python lock lose nothing and are woken at once, where separate
    connections would contend through SQLite's sleeping busy handler (and one
    connection per thread would leak with threads that end). Waiting dequeues
    do not hold the lock. Fork-safe: a child process opens its own connection
    and becomes a consumer of its own.

    Limits: one machine. SQLite's locking needs a local file system (not NFS
    or SMB), and one write at a time goes through the file, which bounds the
    throughput of all engines together (thousands of messages a second).
    """

    path: str
    """The database file, as an absolute path."""

    table: str
    """The table holding the messages; rejected ones are in ``<table>_rejected``."""

    name: str
    """The queue's name within the table (its ``queue`` column)."""

    lease: float
    """Seconds a dequeued message stays leased without a heartbeat."""

    max_deliveries: int
    """Deliveries without an outcome before a message is set aside as poison."""

    heartbeat_interval: float
    """Seconds between the engine's calls to ``heartbeat()``; a third of the lease."""

    busy_timeout: float
    """Seconds a statement waits for another connection's write lock before it fails."""

    consumer: str
    """Who holds this queue object's leases: ``host:pid:random``, stored in ``leased_by``."""

    def __init__(self, path: str | os.PathLike[str], table: str = "tempest_messages", *,
                 name: str = "tempest", lease: float = protocol.DEFAULT_LEASE,
                 max_deliveries: int = protocol.DEFAULT_MAX_DELIVERIES,
                 heartbeat_interval: float | None = None,
                 busy_timeout: float = _BUSY_TIMEOUT) -> None:
        if sqlite3.sqlite_version_info < (3, 8, 0):
            raise ConfigurationError(
                f"SQLiteQueue needs SQLite 3.8 or newer; Python's sqlite3 module uses "
                f"{sqlite3.sqlite_version}")
        if not isinstance(path, (str, os.PathLike)):
            raise ConfigurationError(
                f"SQLiteQueue: path must be a str or path object, not {type(path).__name__}")
        given = os.fspath(path)
        if not isinstance(given, str) or given in ("", ":memory:") or given.startswith("file:"):
            raise ConfigurationError(
                f"SQLiteQueue: path must name a database file, not {given!r} "
                f"(for a queue that lives in memory, use MemoryQueue)")
        # Absolute once and for all: a later chdir must not move the queue.
        self.path = os.path.abspath(given)
        if not isinstance(table, str) or not _TABLE.match(table) or table.startswith("sqlite_"):
            raise ConfigurationError(
                f"SQLiteQueue: table must be a plain lowercase identifier (a letter or _, "
                f"then letters, digits or _, at most 48 characters, not starting with "
                f"sqlite_), not {table!r}")
        self.table = table
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"SQLiteQueue: name must be a non-empty str, not {name!r}")
        self.name = name
        self.lease = _seconds("lease", lease)
        self.heartbeat_interval = (self.lease / 3 if heartbeat_interval is None
                                   else _seconds("heartbeat_interval", heartbeat_interval))
        if self.heartbeat_interval >= self.lease:
            raise ConfigurationError(
                f"SQLiteQueue: heartbeat_interval ({self.heartbeat_interval}) must be "
                f"shorter than lease ({self.lease}), or leases run out between heartbeats")
        if isinstance(max_deliveries, bool) or not isinstance(max_deliveries, int) \
                or max_deliveries < 1:
            raise ConfigurationError(
                f"SQLiteQueue: max_deliveries must be an int >= 1, not {max_deliveries!r}")
        self.max_deliveries = max_deliveries
        self.busy_timeout = _seconds("busy_timeout", busy_timeout)

        self._names = _names(table)
        quoted = {key: f'"{value}"' for key, value in self._names.items()}
        self._schema = [statement.strip() for statement in
                        _SCHEMA.format(**quoted).split(";") if statement.strip()]
        self._sql = {key: text.format(**quoted) for key, text in _SQL.items()}
        self._peek_first = True  # after an empty claim, look before taking the write lock
        self._pause = _POLL_MIN  # between looks at the file while dequeue waits
        self._new_identity()

    def _new_identity(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()  # guards _conn: one statement or transaction at a time
        self._conn: sqlite3.Connection | None = None
        self._doorbell = _doorbell((os.path.realpath(self.path), self.table, self.name))
        self.consumer = f"{socket.gethostname()}:{self._pid}:{secrets.token_hex(4)}"
        self._leases = protocol.Leases()

    # -- the queue protocol ---------------------------------------------------------

    def enqueue(self, message: Any) -> None:
        """Store *message* (as JSON), committed before this returns; wake local waiters."""
        body = protocol.encode(message)
        with self._connection() as conn:
            conn.execute(self._sql["enqueue"],
                         {"queue": self.name, "body": body, "now": time.time()})
        self._doorbell.ring()

    def dequeue(self, timeout: float | None = None) -> Any:
        """Lease the next message; wait up to *timeout* seconds for one; None if none.

        What the queue cannot decode is returned raw (str, or bytes if it is
        not UTF-8), for the engine to reject.
        """
        self._check_fork()
        seen = self._doorbell.seen()
        message = self._claim()
        if message is not None or timeout is None or timeout <= 0:
            return message
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            # The bell count is read before each claim: a local enqueue after an
            # empty claim, even before this wait begins, cuts the wait short.
            pause = self._pause
            self._doorbell.wait(seen, min(pause, remaining))
            # The pause grows across calls while the queue stays empty: an idle
            # engine, calling with short timeouts, looks ~1/_POLL_MAX times a second.
            self._pause = min(pause * 2, _POLL_MAX)
            seen = self._doorbell.seen()
            message = self._claim()
            if message is not None:
                self._pause = _POLL_MIN
                return message

    def ack(self, message: Any) -> None:
        """The message's outcome is final: delete it."""
        # Forgotten first: if the delete fails, heartbeats stop renewing the
        # lease and the message runs again once it expires (never lost).
        row = self._settle(message, "ack")
        with self._connection() as conn:
            conn.execute(self._sql["ack"], {"id": row})

    def reject(self, message: Any, reason: str) -> None:
        """Move the message (raw bodies too) to ``<table>_rejected`` with *reason*."""
        row = self._settle(message, "reject")
        with self._connection() as conn, self._transaction(conn):
            self._move(conn, row, reason)

    def requeue(self, message: Any) -> None:
        """Give a leased message back now, unrun; this delivery does not count."""
        row = self._settle(message, "requeue")
        with self._connection() as conn:
            conn.execute(self._sql["requeue"], {"id": row, "consumer": self.consumer})
        self._doorbell.ring()

    def heartbeat(self) -> None:
        """Renew the leases of the messages this queue object holds (any thread).

        Leases that dead consumers held need no recovery step: they simply run
        out and the next dequeue takes the message.
        """
        held = self._leases.keys()
        if not held:
            return
        with self._connection() as conn, self._transaction(conn):
            until = time.time() + self.lease
            for start in range(0, len(held), _CHUNK):
                chunk = held[start:start + _CHUNK]
                # leased_by: a lease that ran out and went to another consumer stays theirs.
                conn.execute(
                    f'UPDATE "{self.table}" SET lease_until = ? '
                    f'WHERE leased_by = ? AND id IN ({", ".join("?" * len(chunk))})',
                    [until, self.consumer, *chunk])

    def rejected(self) -> list[tuple[Any, str]]:
        """The rejected messages of this queue, oldest first, as (message or raw, reason)."""
        with self._connection() as conn:
            rows = conn.execute(self._sql["rejected"], {"queue": self.name}).fetchall()
        return [(_stored(body), reason) for body, reason in rows]

    def __len__(self) -> int:
        """Messages waiting: available now and not leased."""
        with self._connection() as conn:
            row = conn.execute(self._sql["waiting"],
                               {"queue": self.name, "now": time.time()}).fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:
        """Close the connection. The queue stays usable: a later call reopens it.

        Leases this object holds stay held until they run out. A waiting
        ``dequeue`` is not interrupted; it returns within its timeout.
        """
        if os.getpid() != self._pid:
            return  # the parent's connection is not ours to close
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def __repr__(self) -> str:
        return (f"<SQLiteQueue path={self.path!r} table={self.table!r} name={self.name!r} "
                f"consumer={self.consumer!r}>")

    # -- internals ------------------------------------------------------------------

    def _claim(self) -> Any:
        """Lease the next message, setting poison aside; None if there is none."""
        params: dict[str, Any] = {"queue": self.name, "consumer": self.consumer}
        found = None
        with self._connection() as conn:
            if self._peek_first:
                # While the queue is empty, a read (no write lock: other
                # processes' claims and enqueues go on) tells there is nothing.
                params["now"] = time.time()
                if conn.execute(self._sql["peek"], params).fetchone() is None:
                    return None
            poisoned = _POISON_BATCH
            while poisoned == _POISON_BATCH:  # a batch of poison only: commit, go on
                poisoned = 0
                with self._transaction(conn):
                    # The write lock is ours from here to the commit: the row chosen
                    # cannot be leased by anyone else before the UPDATE below.
                    params["now"] = now = time.time()
                    while poisoned < _POISON_BATCH:
                        row = conn.execute(self._sql["candidate"], params).fetchone()
                        if row is None:
                            break
                        key, deliveries, body = row
                        if deliveries >= self.max_deliveries:
                            self._move(conn, key, protocol.POISON_REASON)
                            poisoned += 1
                            continue  # set aside; look at the next message
                        conn.execute(self._sql["lease"], {
                            "consumer": self.consumer, "until": now + self.lease, "id": key})
                        found = key, body
                        break
        # A crash from here on leaves the row leased: it comes back after the lease.
        self._peek_first = found is None
        if found is None:
            return None
        key, body = found
        return self._leases.add(_stored(body), key)

    def _move(self, conn: sqlite3.Connection, row: int, reason: str) -> None:
        """Within a transaction: move *row* to the rejected table with *reason*."""
        conn.execute(self._sql["keep"], {"id": row, "reason": reason, "now": time.time()})
        conn.execute(self._sql["ack"], {"id": row})

    def _settle(self, message: Any, action: str) -> Any:
        try:
            return self._leases.pop(message)
        except KeyError:
            raise ValueError(
                f"SQLiteQueue.{action}: {message!r:.80} is not a message this queue "
                f"object dequeued, or it was already acked, rejected or requeued") from None

    @contextmanager
    def _transaction(self, conn: sqlite3.Connection) -> Iterator[None]:
        """A write transaction: the write lock is taken at BEGIN, not at the first write.

        A deferred transaction that reads first cannot wait for the lock when it
        comes to write (WAL gives it SQLITE_BUSY at once, since its snapshot may
        be stale); BEGIN IMMEDIATE waits with busy_timeout like any statement.
        An error rolls back (in ``_connection``).
        """
        conn.execute("BEGIN IMMEDIATE")
        yield
        conn.execute("COMMIT")

    def _check_fork(self) -> None:
        if os.getpid() != self._pid:
            # A forked child must not touch its parent's connection (SQLite
            # forbids it), nor its leases, nor locks another thread may have
            # held at the fork: keep the connection unclosed and become a
            # consumer of its own.
            if self._conn is not None:
                _forked_away.append(self._conn)
            self._new_identity()

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        """This object's connection, for one statement or transaction, under its lock."""
        self._check_fork()
        with self._lock:
            conn = self._conn
            if conn is None:
                conn = self._conn = self._connect()
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:
                    # Left open, the transaction would keep the write lock every
                    # other process is waiting for.
                    try:
                        conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        self._conn = None
                        conn.close()  # closing rolls back and releases the lock
                raise

    def _connect(self) -> sqlite3.Connection:
        # timeout= is SQLite's busy_timeout: a statement finding the file locked
        # by another connection retries for that long before "database is locked".
        # isolation_level=None: no implicit BEGIN; transactions are ours to start.
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None,
                               check_same_thread=False)
        try:
            deadline = time.monotonic() + self.busy_timeout
            mode = _until_unlocked(
                lambda: conn.execute("PRAGMA journal_mode=WAL").fetchone(), deadline)
            if not mode or str(mode[0]).lower() != "wal":
                raise ConfigurationError(
                    f"SQLiteQueue: {self.path!r} cannot be put in WAL mode "
                    f"(journal_mode is {mode[0] if mode else None!r}); it needs a local "
                    f"file system")
            # In WAL mode, NORMAL syncs at checkpoints only: a commit survives the
            # process's death, not necessarily the machine's (see the docstring).
            conn.execute("PRAGMA synchronous=NORMAL")
            _until_unlocked(lambda: self._create_schema(conn), deadline)
        except BaseException:
            conn.close()
            raise
        return conn

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        names = list(self._names.values())
        present = conn.execute(
            f"SELECT count(*) FROM sqlite_master WHERE name IN ({', '.join('?' * len(names))})",
            names).fetchone()
        if present and present[0] == len(names):
            return
        # Under the write lock: of processes starting together, the first
        # creates and the others find everything there.
        try:
            with self._transaction(conn):
                for statement in self._schema:
                    conn.execute(statement)
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise


def _until_unlocked(step: Callable[[], _T], deadline: float) -> _T:
    """Run *step*, again while it fails with SQLITE_BUSY, until *deadline*.

    Switching a new file to WAL mode and the first schema look can meet the
    lock of another process doing the same, sometimes without SQLite's busy
    handler waiting for it.
    """
    pause = threading.Event()
    while True:
        try:
            return step()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
        pause.wait(0.01)


def _seconds(option: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not 0 < value < math.inf:
        raise ConfigurationError(
            f"SQLiteQueue: {option} must be a number of seconds > 0, not {value!r}")
    return float(value)
