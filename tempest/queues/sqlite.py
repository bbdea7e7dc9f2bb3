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
        lease_until REAL,
        attempts INTEGER NOT NULL DEFAULT 0,
        first_failed_at REAL,
        result_ttl REAL
    );
    CREATE INDEX IF NOT EXISTS "tempest_messages_ready"
        ON "tempest_messages" (queue, priority DESC, available_at, id);
    CREATE TABLE IF NOT EXISTS "tempest_messages_rejected" (
        id INTEGER PRIMARY KEY,
        queue TEXT NOT NULL,
        body TEXT NOT NULL,
        reason TEXT NOT NULL,
        rejected_at REAL NOT NULL
    );
    CREATE TABLE IF NOT EXISTS "tempest_messages_scheduled" (
        id INTEGER PRIMARY KEY,
        queue TEXT NOT NULL,
        body TEXT NOT NULL,
        priority INTEGER NOT NULL,
        available_at REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        first_failed_at REAL,
        result_ttl REAL
    );
    CREATE INDEX IF NOT EXISTS "tempest_messages_scheduled_due"
        ON "tempest_messages_scheduled" (queue, available_at);
    CREATE TABLE IF NOT EXISTS "tempest_messages_fired" (
        queue TEXT NOT NULL,
        schedule TEXT NOT NULL,
        slot REAL NOT NULL,
        recorded_at REAL NOT NULL,
        PRIMARY KEY (queue, schedule, slot)
    );
    CREATE TABLE IF NOT EXISTS "tempest_messages_failed" (
        queue TEXT NOT NULL,
        task_id TEXT NOT NULL,
        body TEXT NOT NULL,
        task TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        error_type TEXT NOT NULL,
        error TEXT NOT NULL,
        traceback TEXT NOT NULL,
        first_failed_at REAL NOT NULL,
        last_failed_at REAL NOT NULL,
        priority INTEGER NOT NULL,
        expires_at REAL NOT NULL,
        PRIMARY KEY (queue, task_id)
    );
    CREATE INDEX IF NOT EXISTS "tempest_messages_failed_latest"
        ON "tempest_messages_failed" (queue, last_failed_at);
    CREATE TABLE IF NOT EXISTS "tempest_messages_results" (
        queue TEXT NOT NULL,
        task_id TEXT NOT NULL,
        record TEXT NOT NULL,
        expires_at REAL NOT NULL,
        PRIMARY KEY (queue, task_id)
    );
    CREATE INDEX IF NOT EXISTS "tempest_messages_results_expiry"
        ON "tempest_messages_results" (queue, expires_at);
    CREATE TABLE IF NOT EXISTS "tempest_messages_engines" (
        queue TEXT NOT NULL,
        engine_id TEXT NOT NULL,
        record TEXT NOT NULL,
        expires_at REAL NOT NULL,
        PRIMARY KEY (queue, engine_id)
    );
    CREATE TABLE IF NOT EXISTS "tempest_messages_outcomes" (
        queue TEXT NOT NULL,
        minute INTEGER NOT NULL,
        outcome TEXT NOT NULL,
        count INTEGER NOT NULL,
        PRIMARY KEY (queue, minute, outcome)
    );

Delayed messages wait in ``<table>_scheduled`` until their time; the slots
that periodic tasks fired are remembered in ``<table>_fired``; messages that
failed for good are kept in ``<table>_failed``, one entry per queue and task
id; task results in ``<table>_results``, one record per queue and task id
(see "Results"); the records of live engines in ``<table>_engines`` and the
outcome counts per minute in ``<table>_outcomes`` (see "Engines, outcomes and
inspection"). ``attempts`` and ``first_failed_at`` are a message's failed
attempts and the time of its first failure; ``result_ttl`` the seconds its
result is to be kept (NULL: it asks for none). A database made by an earlier
version gains these tables and indexes (on first use, as it gained each
one before), the three columns (of the table and
``<table>_scheduled``, with ``ALTER TABLE ... ADD COLUMN``: no row rewritten,
existing messages ask for no result) and the ``_ready`` index on first use
(its ``_dequeue`` index is dropped).

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
- A claim (``BEGIN IMMEDIATE``: select the oldest available rows -- one for
  ``dequeue``, up to *count* for ``dequeue_many`` -- and lease them) holds the
  file's write lock from the select to the commit, so two consumers, in any
  threads or processes, never lease the same row. A consumer that dies after
  the commit, before or while running the task, leaves the rows leased: each
  becomes available again when its lease runs out, and runs again. That is
  the only way a message runs twice -- apart from a task that outlives its
  lease because heartbeats stopped or the clock stepped forward.
- ``ack`` deletes the row after the outcome, and returns once the delete is
  committed. Acks from several threads share a transaction -- a claim's, or
  one of their own -- and when it fails, every ack in it raises. A crash
  before the commit (or an ack that fails) means one more run, never a lost
  message. An ack deletes the row only while this consumer holds its lease.
- ``requeue`` clears the lease (only if this consumer still holds it) and
  takes back the delivery it counted; ``reject`` and poison moves insert into
  ``<table>_rejected`` and delete in one transaction: never both, never neither.
- ``schedule`` with a time to come inserts into ``<table>_scheduled``. A claim
  first moves the delayed rows whose time has come (500 at most) into the
  table, in the same transaction as the lease: a row is in one table or the
  other, never both, never neither. A crash leaves delayed messages waiting
  in the file; whichever consumer claims after their time runs them.
- ``fire`` forgets the slots of the schedule recorded more than *keep*
  seconds ago, records (schedule, slot) under the primary key and stores the
  message, in one transaction: of engines racing for a slot, exactly one
  inserts the key, and a crash records neither or both.
- ``retry`` deletes the leased row and inserts the message again (into
  ``<table>_scheduled``, or the table when it is ready at once), one attempt
  up, in one transaction; ``fail`` deletes it, stores its entry in
  ``<table>_failed`` and trims the store, in one transaction. Both act only
  while this consumer holds the lease: if it ran out and another consumer took
  the message, that one runs it and nothing is stored. ``retry_failed`` deletes
  the entry and inserts the message in one transaction.
- ``store_result`` replaces the record in one transaction (with the sweep of
  expired ones): a reader sees the old record or the new one, never half of
  one. The worker stores a result before it settles the message (``ack`` or
  ``fail``): a crash in between leaves the message leased, it runs again and
  stores its result again, replacing the first -- a waiter may get the first
  record and a later ``result()`` the second (seen twice), but a result is
  never lost where its message is not. A power loss may undo a stored result
  as it undoes an ack (see ``enqueue``): the message it belonged to then runs
  again too, unless its ack was committed before the last checkpoint.
- Otherwise a message is dropped only by ``ack``, never by a failure; a
  failed-store entry only by ``delete_failed``, ``purge_failed``, or the
  bounds of ``fail`` (*keep* entries, *ttl* seconds).

Delayed messages
----------------
A claim takes the ready rows by ``priority`` (higher first), then by
``available_at`` -- the enqueue, or the time a delayed message was due --
then by id: in the order they became ready. ``requeue`` and a lease that ran
out leave the row where it was, so it keeps its priority and its place. A
dequeue waiting in this process wakes at the next delayed message's time
(as it knew it at its last look) or when the doorbell rings; a message
scheduled by another process, earlier than any it knew of, is seen at its
next look of the file (within ``_POLL_MAX``). A delayed message becomes ready
when this machine's clock reaches its time: a clock stepped back delays it.

Leases expire by the wall clock: if it steps back, leases last longer (a dead
engine's messages wait that much longer); a step forward can end a live
lease early. Messages enqueued to run at once are not delayed by a step back.

Results
-------
``schedule(m, ..., result_ttl=T)`` stores *T* in the row's ``result_ttl``
column, as ``attempts`` is stored: the claim reads it with the row and keeps
it with the lease, so ``result_ttl(m)`` costs no query; ``requeue`` and a
lease that ran out leave the row as it is, a delayed message's promotion
copies it, ``retry`` stores it again with the new row. The failed store keeps
none: ``retry_failed`` and ``retry_failed_all`` store the message again
without it (the run after that stores no result), and ``enqueue``, ``fire``
and external producers store NULL. Messages that ask for nothing cost
nothing more: the same statements, one more (NULL) column read by the claim.

``store_result(task_id, record, ttl=T)`` is one transaction: it deletes up to
``_RESULT_SWEEP`` (100) expired records of this queue, the oldest first (the
``_results_expiry`` index), then ``INSERT OR REPLACE`` the record as JSON
with ``expires_at`` (this machine's clock + *T*). Only result-storing tasks
pay the sweep; a record past its ``expires_at`` is never returned, even
before it is deleted. After the commit it wakes, at once, every ``result()``
waiting for that id in this process (a bell per file, table and name, by task
id). ``result(task_id, timeout)`` listens to that bell, then reads the record
(one primary-key read, on a connection of the queue object's own so that
waits never hold the claims' lock), then waits for the bell or its next look
of the file: a record stored by another process is seen 5 ms after the wait
began at first, then every ``_RESULT_POLL_MAX`` (50 ms) at most. Results are
one per queue name: two names sharing a table keep theirs apart.

Engines, outcomes and inspection
--------------------------------
``announce`` replaces the engine's row of ``<table>_engines`` (its record as
JSON, ``expires_at`` this machine's clock + *ttl*) and deletes the expired rows
of the queue, in one transaction. ``add_outcomes`` adds each count to its row
(queue, minute, outcome) of ``<table>_outcomes`` and deletes the rows of minutes
more than two hours old, in one transaction; an engine calls it once per
announce, never per task. ``engines()`` and ``outcomes()`` only read, in one
read transaction on the second connection (as ``peek`` below): the rows not
expired (``expires_at`` after now), the minutes from *since* on. So a dashboard
refreshing never takes the file's write lock nor the claims' lock, and an
expired record is never listed, deleted yet or not. None of it touches the
message tables, and the enqueue, claim and ack statements are the same as
without it.

``peek`` reads, in one read transaction (no write lock: claims go on), the
available rows of the table down the ``_ready`` index and the delayed rows whose
time has come (which the next claim moves in) down ``_scheduled_due``, and
merges them as the claim would take them: by priority, then the time each
became ready, the rows already in the table first. Rows a claim would set aside
as poison are left out. ``peek_scheduled`` reads ``_scheduled_due`` in order;
``find`` reads the rows whose body starts with the id's JSON (``["<id>"``), a
scan of the queue's rows in both tables, in one read transaction: a row leased
and not expired is ``leased``. Nothing is written: no lease, no delivery. These
reads go through the queue object's second connection (the one ``result()``
reads with), so even a long scan never holds up its claims and acks.
"""

from __future__ import annotations

import copy
import heapq
import itertools
import json
import math
import operator
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
from tempest.results import check_timeout

__all__ = ["SQLiteQueue"]

_T = TypeVar("_T")

_Key = tuple[int, int, float | None]
"""What a lease remembers of its row: (row id, failed attempts, result ttl or None)."""

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

_ABSORB_WINDOW = 0.002
_ABSORB_WAIT = 0.001
"""Seconds: an ack made less than _ABSORB_WINDOW after a claim for several messages waits
up to _ABSORB_WAIT for the next claim to commit it (see SQLiteQueue._claims_expected)."""

_CHECKPOINT_EVERY = 400
"""Commits of a queue object between the checkpoints its acks make (1.5 to 2.2 WAL pages
each, where SQLite checkpoints by itself at 1000: see SQLiteQueue._checkpoint)."""

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
    lease_until REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    first_failed_at REAL,
    result_ttl REAL
);
CREATE INDEX IF NOT EXISTS {ready_index}
    ON {table} (queue, priority DESC, available_at, id);
CREATE TABLE IF NOT EXISTS {rejected} (
    id INTEGER PRIMARY KEY,
    queue TEXT NOT NULL,
    body TEXT NOT NULL,
    reason TEXT NOT NULL,
    rejected_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS {scheduled} (
    id INTEGER PRIMARY KEY,
    queue TEXT NOT NULL,
    body TEXT NOT NULL,
    priority INTEGER NOT NULL,
    available_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    first_failed_at REAL,
    result_ttl REAL
);
CREATE INDEX IF NOT EXISTS {scheduled_index}
    ON {scheduled} (queue, available_at);
CREATE TABLE IF NOT EXISTS {fired} (
    queue TEXT NOT NULL,
    schedule TEXT NOT NULL,
    slot REAL NOT NULL,
    recorded_at REAL NOT NULL,
    PRIMARY KEY (queue, schedule, slot)
);
CREATE TABLE IF NOT EXISTS {failed} (
    queue TEXT NOT NULL,
    task_id TEXT NOT NULL,
    body TEXT NOT NULL,
    task TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    error_type TEXT NOT NULL,
    error TEXT NOT NULL,
    traceback TEXT NOT NULL,
    first_failed_at REAL NOT NULL,
    last_failed_at REAL NOT NULL,
    priority INTEGER NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (queue, task_id)
);
CREATE INDEX IF NOT EXISTS {failed_index}
    ON {failed} (queue, last_failed_at);
CREATE TABLE IF NOT EXISTS {results} (
    queue TEXT NOT NULL,
    task_id TEXT NOT NULL,
    record TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (queue, task_id)
);
CREATE INDEX IF NOT EXISTS {results_index}
    ON {results} (queue, expires_at);
CREATE TABLE IF NOT EXISTS {engines} (
    queue TEXT NOT NULL,
    engine_id TEXT NOT NULL,
    record TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (queue, engine_id)
);
CREATE TABLE IF NOT EXISTS {outcomes} (
    queue TEXT NOT NULL,
    minute INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (queue, minute, outcome)
);"""
# The index the claims read in order: by priority, then by the time each row
# became ready (available_at: its enqueue, or the time a delayed message was
# due), then by id.

_MIGRATE = "DROP INDEX IF EXISTS {old_index}"
# Databases made before scheduling have the index <table>_dequeue on (queue,
# priority DESC, id) instead: it goes, since every write would keep both up to date.

_ADDED_COLUMNS = {"attempts": "INTEGER NOT NULL DEFAULT 0", "first_failed_at": "REAL",
                  "result_ttl": "REAL"}
"""Columns of the table and <table>_scheduled that databases made before retries (the
first two) or before results (``result_ttl``) lack: added on first use, in this order
(ALTER TABLE ... ADD COLUMN with a constant default rewrites no rows)."""

# A row is available when its time has come and it is not leased, or its lease
# ran out. "available_at <= enqueued_at" makes a message enqueued to run at
# once (every message, today) available whatever the clock does later; only a
# delayed message will depend on the clock.
_AVAILABLE = """\
queue = :queue AND (available_at <= :now OR available_at <= enqueued_at)
AND (lease_until IS NULL OR lease_until < :now)"""

_OUTCOMES_KEPT = 7200
"""Seconds of outcome buckets kept (the protocol promises one hour at least)."""

_RESULT_SWEEP = 100
"""Expired results deleted per store_result at most (the oldest first), so the write lock
is held briefly; stores come as often as results expire, so the backlog drains."""

_RESULT_POLL_MIN, _RESULT_POLL_MAX = 0.005, 0.05
"""Seconds between looks at the file while ``result()`` waits (for a record another
process may store): 5 ms, doubling up to 50 ms for the rest of that call. A store in this
process wakes its waiters at once instead (see _ResultBell)."""

_PROMOTE_BATCH = 500
"""Delayed messages made ready per claim at most, so the write lock is held briefly."""

_DUE = ("SELECT id FROM {scheduled} WHERE queue = :queue AND available_at <= :now "
        f"ORDER BY available_at, id LIMIT {_PROMOTE_BATCH}")
# The delayed rows whose time has come, earliest first. "promote" copies them
# into the table and "promoted" deletes them, in one write transaction: both
# statements see the same rows (nothing else writes in between).

_RETRIED = ("attempts + 1, coalesce(first_failed_at, :failed_at), result_ttl FROM {table} "
            "WHERE id = :id AND leased_by = :consumer")
# The leased row, one attempt up, its first failure time and result ttl kept:
# "retry_ready" and "retry_later" read it before "settle" deletes it, in one
# transaction. Only while this consumer holds the lease (as for acks).

_FAILED_COLUMNS = ("task_id, body, task, attempts, error_type, error, traceback, "
                   "first_failed_at, last_failed_at, priority, expires_at")

_SQL = {
    "peek": "SELECT 1 FROM {table} WHERE " + _AVAILABLE + " LIMIT 1",
    "candidate": "SELECT id, deliveries, attempts, result_ttl, CAST(body AS BLOB) "
                 "FROM {table} WHERE "
                 + _AVAILABLE + " ORDER BY priority DESC, available_at, id LIMIT :limit",
    "lease": "UPDATE {table} SET leased_by = :consumer, lease_until = :until, "
             "deliveries = deliveries + 1 WHERE id = :id",
    "enqueue": "INSERT INTO {table} (queue, body, available_at, enqueued_at) "
               "VALUES (:queue, :body, :now, :now)",
    "ready": "INSERT INTO {table} (queue, body, priority, available_at, enqueued_at, "
             "result_ttl) VALUES (:queue, :body, :priority, :now, :now, :result_ttl)",
    "later": "INSERT INTO {scheduled} (queue, body, priority, available_at, result_ttl) "
             "VALUES (:queue, :body, :priority, :due, :result_ttl)",
    "next_due": "SELECT min(available_at) FROM {scheduled} WHERE queue = :queue",
    "promote": "INSERT INTO {table} (queue, body, priority, available_at, enqueued_at, "
               "attempts, first_failed_at, result_ttl) "
               "SELECT queue, body, priority, available_at, :now, attempts, first_failed_at, "
               "result_ttl FROM {scheduled} WHERE id IN (" + _DUE + ") "
               "ORDER BY available_at, id",
    "promoted": "DELETE FROM {scheduled} WHERE id IN (" + _DUE + ")",
    "due": "SELECT count(*) FROM {scheduled} WHERE queue = :queue AND available_at <= :now",
    "scheduled": "SELECT count(*) FROM {scheduled} WHERE queue = :queue AND available_at > :now",
    "forget": "DELETE FROM {fired} WHERE queue = :queue AND schedule = :schedule "
              "AND recorded_at < :before",
    "record": "INSERT OR IGNORE INTO {fired} (queue, schedule, slot, recorded_at) "
              "VALUES (:queue, :schedule, :slot, :now)",
    "last_fired": "SELECT max(slot) FROM {fired} WHERE queue = :queue AND schedule = :schedule",
    "delete": "DELETE FROM {table} WHERE id = :id",
    "keep": "INSERT INTO {rejected} (queue, body, reason, rejected_at) "
            "SELECT queue, body, :reason, :now FROM {table} WHERE id = :id",
    "requeue": "UPDATE {table} SET leased_by = NULL, lease_until = NULL, "
               "deliveries = max(deliveries - 1, 0) WHERE id = :id AND leased_by = :consumer",
    "waiting": "SELECT count(*) FROM {table} WHERE " + _AVAILABLE,
    "rejected": "SELECT CAST(body AS BLOB), reason FROM {rejected} "
                "WHERE queue = :queue ORDER BY id LIMIT :limit OFFSET :offset",
    "rejected_count": "SELECT count(*) FROM {rejected} WHERE queue = :queue",
    # inspection (see "Engines, outcomes and inspection"): reads only
    "ready_rows": "SELECT priority, available_at, id, CAST(body AS BLOB), attempts "
                  "FROM {table} WHERE " + _AVAILABLE + " AND deliveries < :max_deliveries "
                  "ORDER BY priority DESC, available_at, id LIMIT :limit OFFSET :offset",
    "due_rows": "SELECT priority, available_at, id, CAST(body AS BLOB), attempts "
                "FROM {scheduled} WHERE queue = :queue AND available_at <= :now "
                "ORDER BY available_at, id LIMIT :limit",
    "later_rows": "SELECT priority, available_at, CAST(body AS BLOB), attempts "
                  "FROM {scheduled} WHERE queue = :queue AND available_at > :now "
                  "ORDER BY available_at, id LIMIT :limit OFFSET :offset",
    "find_in_table": "SELECT priority, NULL, CAST(body AS BLOB), attempts, "
                     "leased_by IS NOT NULL AND lease_until >= :now FROM {table} "
                     "WHERE queue = :queue AND substr(body, 1, :length) = :prefix",
    "find_in_scheduled": "SELECT priority, available_at, CAST(body AS BLOB), attempts, 0 "
                         "FROM {scheduled} "
                         "WHERE queue = :queue AND substr(body, 1, :length) = :prefix "
                         "ORDER BY available_at, id",
    # engines and outcomes
    "forget_expired": "DELETE FROM {engines} WHERE queue = :queue AND expires_at <= :now",
    "announce": "INSERT OR REPLACE INTO {engines} (queue, engine_id, record, expires_at) "
                "VALUES (:queue, :engine_id, :record, :expires_at)",
    "engines": "SELECT record FROM {engines} WHERE queue = :queue AND expires_at > :now "
               "ORDER BY engine_id",
    "forget_engine": "DELETE FROM {engines} WHERE queue = :queue AND engine_id = :engine_id",
    "forget_outcomes": "DELETE FROM {outcomes} WHERE queue = :queue AND minute < :oldest",
    "outcome_row": "INSERT OR IGNORE INTO {outcomes} (queue, minute, outcome, count) "
                   "VALUES (:queue, :minute, :outcome, 0)",
    "add_outcome": "UPDATE {outcomes} SET count = count + :count "
                   "WHERE queue = :queue AND minute = :minute AND outcome = :outcome",
    "outcomes": "SELECT minute, outcome, count FROM {outcomes} "
                "WHERE queue = :queue AND minute >= :since ORDER BY minute, outcome",
    # retry(), fail() and the failed store (see "Retries and the failed store")
    "retry_ready": "INSERT INTO {table} (queue, body, priority, available_at, enqueued_at, "
                   "attempts, first_failed_at, result_ttl) "
                   "SELECT queue, :body, priority, :now, :now, " + _RETRIED,
    "retry_later": "INSERT INTO {scheduled} (queue, body, priority, available_at, "
                   "attempts, first_failed_at, result_ttl) "
                   "SELECT queue, :body, priority, :due, " + _RETRIED,
    "settle": "DELETE FROM {table} WHERE id = :id AND leased_by = :consumer",
    "fail": "INSERT OR REPLACE INTO {failed} (queue, task_id, body, task, attempts, "
            "error_type, error, traceback, first_failed_at, last_failed_at, priority, "
            "expires_at) SELECT :queue, :task_id, :body, :task, :attempts, :error_type, "
            ":error, :traceback, coalesce(first_failed_at, :last_failed_at), :last_failed_at, "
            "priority, :expires_at FROM {table} WHERE id = :id AND leased_by = :consumer",
    "trim": "DELETE FROM {failed} WHERE queue = :queue AND (expires_at <= :now OR task_id IN "
            "(SELECT task_id FROM {failed} WHERE queue = :queue AND expires_at > :now "
            "ORDER BY last_failed_at DESC, task_id DESC LIMIT -1 OFFSET :keep))",
    "failed": "SELECT " + _FAILED_COLUMNS + " FROM {failed} WHERE queue = :queue "
              "AND expires_at > :now ORDER BY last_failed_at DESC, task_id DESC "
              "LIMIT :limit OFFSET :offset",
    "find_failed": "SELECT " + _FAILED_COLUMNS + " FROM {failed} WHERE queue = :queue "
                   "AND task_id = :task_id AND expires_at > :now",
    "failed_count": "SELECT count(*) FROM {failed} WHERE queue = :queue AND expires_at > :now",
    # The failed store keeps no result ttl: the message goes back without one.
    "retry_failed": "INSERT INTO {table} (queue, body, priority, available_at, enqueued_at) "
                    "SELECT queue, body, priority, :now, :now FROM {failed} "
                    "WHERE queue = :queue AND task_id = :task_id AND expires_at > :now",
    "retry_failed_all": "INSERT INTO {table} (queue, body, priority, available_at, "
                        "enqueued_at) SELECT queue, body, priority, :now, :now FROM {failed} "
                        "WHERE queue = :queue AND expires_at > :now "
                        "ORDER BY last_failed_at, task_id",
    "unfail": "DELETE FROM {failed} WHERE queue = :queue AND task_id = :task_id "
              "AND expires_at > :now",
    "unfail_all": "DELETE FROM {failed} WHERE queue = :queue AND expires_at > :now",
    "delete_failed": "DELETE FROM {failed} WHERE queue = :queue AND task_id = :task_id",
    "purge_failed": "DELETE FROM {failed} WHERE queue = :queue",
    "live_failed": "SELECT count(*) FROM {failed} WHERE queue = :queue "
                   "AND task_id = :task_id AND expires_at > :now",
    "live_failed_all": "SELECT count(*) FROM {failed} WHERE queue = :queue "
                       "AND expires_at > :now",
    # results (see "Results")
    "sweep_results": "DELETE FROM {results} WHERE rowid IN (SELECT rowid FROM {results} "
                     "WHERE queue = :queue AND expires_at <= :now ORDER BY expires_at "
                     f"LIMIT {_RESULT_SWEEP})",
    "store_result": "INSERT OR REPLACE INTO {results} (queue, task_id, record, expires_at) "
                    "VALUES (:queue, :task_id, :record, :expires_at)",
    "result": "SELECT record FROM {results} WHERE queue = :queue AND task_id = :task_id "
              "AND expires_at > :now",
}
# Bodies are read CAST AS BLOB: sqlite3 raises on TEXT that is not UTF-8, and
# one such row would otherwise fail every claim for ever. _stored() decodes.


def _names(table: str) -> dict[str, str]:
    return {"table": table, "rejected": f"{table}_rejected", "ready_index": f"{table}_ready",
            "scheduled": f"{table}_scheduled", "scheduled_index": f"{table}_scheduled_due",
            "fired": f"{table}_fired", "failed": f"{table}_failed",
            "failed_index": f"{table}_failed_latest", "results": f"{table}_results",
            "results_index": f"{table}_results_expiry", "engines": f"{table}_engines",
            "outcomes": f"{table}_outcomes"}


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


class _Ack:
    """One ack, waiting for the transaction that deletes its row (see "Group commit").

    Fields other than ``row`` and ``wake`` change under the queue's ``_acks``
    lock. ``wake`` is released (once, until the waiter takes it) when ``done``
    or ``lead`` is set: a C lock per waiter, so a commit wakes exactly the
    threads it concerns, without a Condition's Python-level bookkeeping.
    """

    __slots__ = ("done", "error", "lead", "row", "signaled", "wake")

    def __init__(self, row: int) -> None:
        self.row = row
        self.done = False  # settled: committed, or failed with error
        self.error: BaseException | None = None
        self.lead = False  # handed the duty to flush
        self.signaled = False  # wake released and not taken yet
        self.wake = threading.Lock()
        self.wake.acquire()

    def signal(self) -> None:
        """Wake the waiter (under the queue's _acks lock)."""
        if not self.signaled:
            self.signaled = True
            self.wake.release()


def _shared_failure(error: BaseException) -> BaseException:
    """What an ack raises when the transaction that took it failed in another thread.

    A copy of the error (one exception object raised in several threads would
    mix their tracebacks), chained to it.
    """
    twin: BaseException | None = None
    if isinstance(error, Exception):
        try:
            twin = copy.copy(error)
        except Exception:  # noqa: BLE001 - an exception that does not copy
            twin = None
    if not isinstance(twin, Exception) or type(twin) is not type(error):
        twin = sqlite3.OperationalError(f"the transaction deleting this message failed: "
                                        f"{type(error).__name__}: {error}")
    twin.__cause__ = error
    twin.__traceback__ = None
    return twin


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
        # No lock: reading an int attribute is atomic, and a ring after this
        # read is what the caller's wait() compares with under the lock.
        return self.rings

    def wait(self, seen: int, timeout: float) -> None:
        """Wait up to *timeout* seconds unless it rang after *seen*."""
        with self.condition:
            if self.rings == seen:
                self.condition.wait(timeout)


class _ResultBell:
    """Wakes the ``result()`` calls waiting in this process on one queue (file, table,
    name), each for its task id: a store rings the waiters of its id only, at once.

    A waiter listens *before* it looks at the file, and a store rings *after* its
    commit: a store that the look missed rings the event, and one that rang before
    the listen had committed before the look, which sees it. No wake-up is lost.
    Another process's store rings no bell here: waiters also look at the file
    every ``_RESULT_POLL_MAX`` seconds at most.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.waiters: dict[str, list[threading.Event]] = {}

    def listen(self, task_id: str) -> threading.Event:
        """An event that the next ring for *task_id* sets."""
        event = threading.Event()
        with self.lock:
            self.waiters.setdefault(task_id, []).append(event)
        return event

    def forget(self, task_id: str, event: threading.Event) -> None:
        """Stop listening with *event* (rung or not)."""
        with self.lock:
            waiting = self.waiters.get(task_id)
            if waiting is not None and event in waiting:
                waiting.remove(event)
                if not waiting:
                    del self.waiters[task_id]

    def ring(self, task_id: str) -> None:
        """Wake every waiter listening for *task_id*."""
        with self.lock:
            waiting = self.waiters.pop(task_id, ())
        for event in waiting:
            event.set()


_doorbells: weakref.WeakValueDictionary[tuple[str, str, str], _Doorbell] = (
    weakref.WeakValueDictionary())
_doorbells_lock = threading.Lock()
_result_bells: weakref.WeakValueDictionary[tuple[str, str, str], _ResultBell] = (
    weakref.WeakValueDictionary())
_forked_away: list[sqlite3.Connection] = []
"""Connections a forked child inherited: SQLite forbids using (or closing) them there,
and dropping the last reference would close them."""


def _doorbell(key: tuple[str, str, str]) -> _Doorbell:
    with _doorbells_lock:
        bell = _doorbells.get(key)
        if bell is None:
            bell = _doorbells[key] = _Doorbell()
        return bell


def _result_bell(key: tuple[str, str, str]) -> _ResultBell:
    with _doorbells_lock:
        bell = _result_bells.get(key)
        if bell is None:
            bell = _result_bells[key] = _ResultBell()
        return bell


def _after_fork_in_child() -> None:
    # Another thread may have held the lock (or a bell's) at the fork: start afresh.
    global _doorbells, _doorbells_lock, _result_bells
    _doorbells = weakref.WeakValueDictionary()
    _result_bells = weakref.WeakValueDictionary()
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
        ``dequeue(timeout=...)`` (and ``dequeue_many``, which waits the same
        way for its first message) wakes at once when this process enqueues (any
        SQLiteQueue object on the same file, table and name). Another process's
        message is found by looking at the file: every 5 ms while messages
        come, backing off to every 0.1 s while none do. So it waits at most
        about 0.1 s, and an idle engine costs ten cheap reads a second.
    Many consumers
        A claim runs in ``BEGIN IMMEDIATE``, holding the file's write lock from
        choosing the rows to leasing them: no two consumers, in any threads or
        processes, lease the same row. A statement waits up to
        ``busy_timeout`` seconds (default 10) for another connection's write
        lock, then raises ``sqlite3.OperationalError: database is locked``;
        the engine logs a failed dequeue and retries with a backoff.
    Retries and the failed store
        A message's failed attempts are a column of its row, read by the claim
        and kept with the lease (``attempts()`` costs no query); ``requeue``
        and a lease that ran out leave it as it is, so a crash is never
        counted as an attempt. ``retry()`` replaces the leased row with the
        message to run again, one attempt up, and ``fail()`` moves it into
        ``<table>_failed`` and trims that to ``keep`` entries and ``ttl``
        seconds: each one transaction, so a crash leaves the leased message or
        the new one, never neither, never both. ``retry_failed()`` moves an
        entry back, ready now, attempts 0, in one transaction too.
    Results
        ``schedule(..., result_ttl=)`` stores the ttl in the row (read with the
        lease: ``result_ttl()`` costs no query); ``store_result()`` keeps the
        record in ``<table>_results`` and wakes the ``result()`` calls waiting
        in this process at once; those in other processes look at the file
        every 5 to 50 ms while they wait (see "Results" in the module docstring).
    Engines and inspection
        ``announce()``, ``engines()``, ``forget_engine()``, ``add_outcomes()``,
        ``outcomes()`` keep engine records and outcome counts in
        ``<table>_engines`` and ``<table>_outcomes``, expired rows deleted by
        the writers' transactions; ``engines()``, ``outcomes()``, ``peek()``,
        ``peek_scheduled()``, ``rejected(limit, offset)``, ``rejected_count()``
        and ``find()`` only read (see "Engines, outcomes and inspection" in the
        module docstring).

    Each queue object opens one connection (lazily), shared by its threads under
    a lock: SQLite admits one writer at a time anyway, so threads queueing on
    a Python lock lose nothing and are woken at once, where separate
    connections would contend through SQLite's sleeping busy handler (and one
    connection per thread would leak with threads that end). Waiting dequeues
    do not hold the lock. Acks arriving together share one commit, often the
    next claim's. Once busy, the object opens a second connection, which its
    acks checkpoint the WAL with, off the claims' path. Fork-safe: a child
    process opens its own connection and becomes a consumer of its own.

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
        self.lease, self.heartbeat_interval, self.max_deliveries = protocol.lease_options(
            "SQLiteQueue", lease, heartbeat_interval, max_deliveries)
        self.busy_timeout = protocol.seconds("SQLiteQueue", "busy_timeout", busy_timeout)

        self._names = _names(table)
        quoted = {key: f'"{value}"' for key, value in self._names.items()}
        self._schema = [statement.strip() for statement in
                        _SCHEMA.format(**quoted).split(";") if statement.strip()]
        self._schema.append(_MIGRATE.format(old_index=f'"{table}_dequeue"'))
        self._sql = {key: text.format(**quoted) for key, text in _SQL.items()}
        self._ack_sql: dict[int, str] = {}  # by batch size
        self._peek_first = True  # after an empty claim, look before taking the write lock
        self._next_due: float | None = None  # the earliest delayed message, at the last look
        self._pause = _POLL_MIN  # between looks at the file while dequeue waits
        self._new_identity()

    def _new_identity(self) -> None:
        self._forks = protocol.forks()
        self._lock = threading.Lock()  # guards _conn: one statement or transaction at a time
        self._conn: sqlite3.Connection | None = None
        key = (os.path.realpath(self.path), self.table, self.name)
        self._doorbell = _doorbell(key)
        self._result_bell = _result_bell(key)
        # The connection result() reads with, under its own lock: waiting results never
        # hold _lock, which claims and acks need.
        self._reader_lock = threading.Lock()
        self._reader: sqlite3.Connection | None = None
        self.consumer = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        # message -> (row id, failed attempts, result ttl or None)
        self._leases = protocol.Leases()
        # Group commit of acks (see _flush): all four under _acks.
        self._acks = threading.Lock()
        self._pending: list[_Ack] = []
        self._flusher = False
        self._absorbers = 0
        # Checkpoints made by acks (see _checkpoint): _commits under _lock.
        self._commits = 0
        self._checkpointing = threading.Lock()  # guards _checkpointer
        self._checkpointer: sqlite3.Connection | None = None
        self._batch_claimed_at = -math.inf  # the last claim for several (see _claims_expected)

    # -- the queue protocol ---------------------------------------------------------

    def enqueue(self, message: Any) -> None:
        """Store *message* (as JSON), committed before this returns; wake local waiters."""
        body = protocol.encode(message)
        with self._connection() as conn:
            conn.execute(self._sql["enqueue"],
                         {"queue": self.name, "body": body, "now": time.time()})
        self._doorbell.ring()

    def schedule(self, message: Any, *, delay: float | None = None, at: float | None = None,
                 priority: int = 0, result_ttl: float | None = None) -> None:
        """Store *message* to become ready after *delay* seconds or at POSIX time *at*.

        Among ready messages, higher *priority* first. Times are this
        machine's clock; a time that has come already means now. With
        *result_ttl* (seconds > 0) the message asks for its result, kept that
        long: stored in its row's ``result_ttl`` column and read back by
        ``result_ttl(m)`` (see "Results"). Committed before this returns;
        wakes local waiters.
        """
        body = protocol.encode(message)
        ttl = None if result_ttl is None else _ttl_seconds("schedule", "result_ttl", result_ttl)
        now = time.time()
        due = now + delay if delay is not None else at if at is not None else now
        params = {"queue": self.name, "body": body, "priority": priority, "now": now,
                  "due": due, "result_ttl": ttl}
        with self._connection() as conn:
            conn.execute(self._sql["ready" if due <= now else "later"], params)
        self._doorbell.ring()

    def scheduled_count(self) -> int:
        """Messages waiting for their time."""
        return self._count("scheduled")

    def fire(self, schedule: str, slot: float, message: Any, *, priority: int = 0,
             keep: float) -> bool:
        """Store *message* for time *slot* unless that slot of *schedule* fired already.

        One transaction records the slot and stores the message (see
        "Periodic slots" in the module docstring); False, storing nothing, if
        the slot is recorded already. Slots recorded more than *keep* seconds
        ago are forgotten.
        """
        body = protocol.encode(message)
        now = time.time()
        params = {"queue": self.name, "schedule": schedule, "slot": slot, "now": now,
                  "before": now - keep, "body": body, "priority": priority, "due": slot,
                  "result_ttl": None}  # a periodic run asks for no result
        with self._connection() as conn, self._transaction(conn):
            conn.execute(self._sql["forget"], params)
            if conn.execute(self._sql["record"], params).rowcount != 1:
                return False
            conn.execute(self._sql["ready" if slot <= now else "later"], params)
        self._doorbell.ring()
        return True

    def last_fired(self, schedule: str) -> float | None:
        """The latest slot of *schedule* still remembered, or None."""
        with self._connection() as conn:
            row = conn.execute(self._sql["last_fired"],
                               {"queue": self.name, "schedule": schedule}).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def dequeue(self, timeout: float | None = None) -> Any:
        """Lease the next message; wait up to *timeout* seconds for one; None if none.

        What the queue cannot decode is returned raw (str, or bytes if it is
        not UTF-8), for the engine to reject.
        """
        messages = self._dequeue(1, timeout)
        return messages[0] if messages else None

    def dequeue_many(self, count: int, timeout: float | None = None) -> list[Any]:
        """Lease up to *count* messages, in order; wait up to *timeout* seconds for the first.

        Waits as ``dequeue`` does, then takes whatever else is available at
        once, up to *count*, in the same transaction: one commit for the lot.
        Each message is leased, settled and counted like one from ``dequeue``.
        An empty list if none came within *timeout*, and at once if *count* < 1.
        """
        if count < 1:
            return []
        return self._dequeue(count, timeout)

    def ack(self, message: Any) -> None:
        """The message's outcome is final: delete it. Returns once the delete is committed.

        Acks from several threads share transactions (see "Group commit"
        below): an ack waits for the first commit that includes its row -- a
        claim's, or one it makes itself -- and raises if that transaction failed.
        """
        self._check_fork()  # a child must not settle (nor delete) its parent's messages
        # Forgotten first: if the delete fails, heartbeats stop renewing the
        # lease and the message runs again once it expires (never lost).
        self._ack_row(self._settle(message, "ack"))

    def ack_and_dequeue(self, messages: list[Any], count: int) -> list[Any]:
        """``ack`` every message of *messages*, then ``dequeue_many(count)`` without
        waiting, in one transaction (*count* 0: the acks alone, in one commit).

        The engine calls it as a worker that has just finished a message takes
        its next ones, with the acks other workers handed it meanwhile: one
        commit instead of several. The deletes and the leases are committed
        together or not at all; acks pending from other threads join the same
        commit (see "Group commit"). If the transaction fails, it raises and
        leases nothing; the messages are forgotten first, as ``ack`` forgets
        them, so they run again once their lease runs out (never lost).
        """
        count = protocol.whole_count("SQLiteQueue.ack_and_dequeue", count)
        messages = protocol.settling("SQLiteQueue.ack_and_dequeue", messages)
        self._check_fork()
        rows: list[int] = []
        try:
            for message in messages:
                rows.append(self._settle(message, "ack"))
        except BaseException:
            for row in rows:  # the ones before the message it does not hold
                self._ack_row(row)
            raise
        taken = self._claim(max(count, 0), [_Ack(row) for row in rows])
        if self._commits >= _CHECKPOINT_EVERY:
            self._checkpoint()
        return taken

    def _ack_row(self, row: int) -> None:
        """Delete *row*, settled already, as ``ack`` does: in the first commit that can."""
        ticket = _Ack(row)
        patience = self._claims_expected()
        acks = self._acks
        acks.acquire()
        try:
            self._pending.append(ticket)
            while True:  # holding _acks
                if not ticket.lead:
                    if ticket.done:
                        break
                    if self._flusher or self._absorbers or patience:
                        # A flusher or claim will take it or, with patience, a claim
                        # is likely to start: give it the chance to take this ack
                        # too -- one commit, not two.
                        timeout = patience if not (self._flusher or self._absorbers) else -1
                        patience = 0.0
                        acks.release()
                        try:
                            woken = ticket.wake.acquire(True, timeout)
                        finally:
                            acks.acquire()
                        if woken:
                            ticket.signaled = False  # the state is looked at again
                        continue
                # Handed the duty (even if our own ack is done meanwhile: the duty
                # is for the others), or no transaction is coming: ours to commit.
                ticket.lead = False
                self._flusher = True
                acks.release()
                try:
                    self._flush(ticket)
                finally:
                    acks.acquire()
                # Done, or taken by a claim still under way (which will wake us).
        finally:
            if ticket.lead or not ticket.done:  # left by an exception (an interrupt)
                if ticket in self._pending:
                    self._pending.remove(ticket)  # its lease will bring the message back
                if ticket.lead:  # the duty must not leave with us
                    ticket.lead = self._flusher = False
                    self._hand_over()
            acks.release()
        if ticket.error is not None:
            raise _shared_failure(ticket.error)
        if self._commits >= _CHECKPOINT_EVERY:
            self._checkpoint()

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
        held = [key[0] for key in self._leases]
        with self._acks:  # their rows are ours until the delete commits
            held.extend(ticket.row for ticket in self._pending)
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

    # -- retries and the failed store ---------------------------------------------------

    def attempts(self, message: Any) -> int:
        """Failed attempts stored with *message*, which this queue object dequeued.

        Read from the lease (the claim read it with the row): no query.
        ValueError if the queue object does not hold *message*.
        """
        self._check_fork()
        attempts: int = self._leases.get(message, "SQLiteQueue.attempts")[1]
        return int(attempts)

    def retry(self, message: Any, *, delay: float, failed_at: float) -> None:
        """Settle *message* and store it again, ready in *delay* seconds, one attempt more.

        One transaction deletes the leased row and stores *message* as given
        (its task id filled in) with its priority, ``attempts`` one higher and
        its first failure time (*failed_at* unless it had one): in the table
        when *delay* is 0, else in ``<table>_scheduled`` until this machine's
        clock + *delay*. Nothing is stored if this consumer's lease ran out and
        another took the message. Wakes local waiters.
        """
        self._check_fork()
        body = protocol.encode(message)  # before the lease goes: a bad message keeps it
        row = self._settle(message, "retry")
        now = time.time()
        due = now + float(delay)
        params = {"id": row, "consumer": self.consumer, "body": body, "now": now, "due": due,
                  "failed_at": float(failed_at)}
        with self._connection() as conn, self._transaction(conn):
            conn.execute(self._sql["retry_ready" if due <= now else "retry_later"], params)
            conn.execute(self._sql["settle"], params)
        self._doorbell.ring()

    def fail(self, message: Any, record: dict[str, Any], *, keep: int, ttl: float) -> int:
        """Settle *message* into ``<table>_failed``; return how many old entries were dropped.

        One transaction deletes the leased row, stores the entry (replacing
        one with the same task id) and drops the expired entries and, beyond
        *keep*, those that failed longest ago. The write lock makes engines
        failing at once take turns, so the bound holds. Nothing is stored if
        this consumer's lease ran out and another took the message.
        """
        self._check_fork()
        last = float(record["last_failed_at"])
        params = {
            "queue": self.name, "task_id": record["task_id"], "task": record["task"],
            # The message retry_failed() will store: [task_id, task, *args].
            "body": protocol.encode([record["task_id"], record["task"], *record["args"]]),
            "attempts": record["attempts"], "error_type": record["error_type"],
            "error": record["error"], "traceback": record["traceback"],
            "last_failed_at": last, "expires_at": last + ttl, "keep": int(keep),
            "consumer": self.consumer}
        params["id"] = self._settle(message, "fail")
        with self._connection() as conn, self._transaction(conn):
            params["now"] = time.time()
            conn.execute(self._sql["fail"], params)
            conn.execute(self._sql["settle"], params)
            dropped = conn.execute(self._sql["trim"], params).rowcount
        return max(dropped, 0)

    def failed(self, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """Entries of the failed store, the latest failure first (dicts: FAILED_FIELDS)."""
        limit, offset = operator.index(limit), operator.index(offset)
        if limit < 0 or offset < 0:
            raise ValueError(f"SQLiteQueue.failed: limit ({limit}) and offset ({offset}) "
                             f"must be >= 0")
        params = {"queue": self.name, "limit": limit, "offset": offset, "now": time.time()}
        with self._connection() as conn:
            rows = conn.execute(self._sql["failed"], params).fetchall()
        return [protocol.failed_entry(row) for row in rows]

    def failed_count(self) -> int:
        """Entries in the failed store (not expired)."""
        with self._connection() as conn:
            row = conn.execute(self._sql["failed_count"],
                               {"queue": self.name, "now": time.time()}).fetchone()
        return int(row[0]) if row else 0

    def find_failed(self, task_id: str) -> dict[str, Any] | None:
        """The entry of *task_id*, or None."""
        with self._connection() as conn:
            row = conn.execute(self._sql["find_failed"], {
                "queue": self.name, "task_id": task_id, "now": time.time()}).fetchone()
        return None if row is None else protocol.failed_entry(row)

    def retry_failed(self, task_id: str) -> bool:
        """Move the entry of *task_id* back into the queue, ready now, attempts reset.

        One transaction: a crash leaves the entry or the message. False if
        there is no such entry.
        """
        return self._retry_failed("retry_failed", "unfail", task_id) > 0

    def retry_failed_all(self) -> int:
        """Move every entry back into the queue, oldest failure first, in one transaction;
        return how many."""
        return self._retry_failed("retry_failed_all", "unfail_all", None)

    def delete_failed(self, task_id: str) -> bool:
        """Forget the entry of *task_id*; False if there was none."""
        return self._delete_failed("live_failed", "delete_failed", task_id) > 0

    def purge_failed(self) -> int:
        """Forget every entry; return how many."""
        return self._delete_failed("live_failed_all", "purge_failed", None)

    def _retry_failed(self, store: str, forget: str, task_id: str | None) -> int:
        params = {"queue": self.name, "task_id": task_id, "now": time.time()}
        with self._connection() as conn, self._transaction(conn):
            # Both statements see the same entries: nothing else writes in between.
            count = conn.execute(self._sql[store], params).rowcount
            conn.execute(self._sql[forget], params)
        if count > 0:
            self._doorbell.ring()
        return max(count, 0)

    def _delete_failed(self, live: str, forget: str, task_id: str | None) -> int:
        params = {"queue": self.name, "task_id": task_id, "now": time.time()}
        with self._connection() as conn, self._transaction(conn):
            # Expired entries go too, uncounted: to whoever asks, they were gone already.
            count = int(conn.execute(self._sql[live], params).fetchone()[0])
            conn.execute(self._sql[forget], params)
        return count

    # -- results ------------------------------------------------------------------------

    def result_ttl(self, message: Any) -> float | None:
        """Seconds to keep *message*'s result, as ``schedule`` stored it; None: none asked.

        Read from the lease (the claim read the row's ``result_ttl`` with it): no
        query. ValueError if the queue object does not hold *message*.
        """
        self._check_fork()
        ttl: float | None = self._leases.get(message, "SQLiteQueue.result_ttl")[2]
        return None if ttl is None else float(ttl)

    def store_result(self, task_id: str, record: dict[str, Any], *, ttl: float) -> None:
        """Keep *record* as *task_id*'s result for *ttl* seconds; wake its waiters.

        One transaction deletes up to ``_RESULT_SWEEP`` expired results of this
        queue and stores *record* as JSON, ``expires_at`` (this machine's clock +
        *ttl*) added, replacing any record of *task_id*: a reader sees the old
        record or the new one, never part of one. Once it is committed, the
        waiters in this process are woken at once; those in other processes see
        it at their next look (within ``_RESULT_POLL_MAX``).
        """
        self._check_fork()
        seconds = _ttl_seconds("store_result", "ttl", ttl)
        now = time.time()
        expires_at = now + seconds
        # Encoded before the transaction: a record that is not JSON stores nothing.
        text = json.dumps({**record, "expires_at": expires_at}, separators=(",", ":"),
                          allow_nan=False)
        params = {"queue": self.name, "task_id": task_id, "record": text,
                  "expires_at": expires_at, "now": now}
        with self._connection() as conn, self._transaction(conn):
            conn.execute(self._sql["sweep_results"], params)
            conn.execute(self._sql["store_result"], params)
        # After the commit, never before: a waiter woken finds the record. A crash
        # here (committed, nobody rung) leaves only this process's waiters unwoken,
        # and they die with it; other processes' waiters find it by looking.
        self._result_bell.ring(task_id)

    def result(self, task_id: str, timeout: float | None = None) -> dict[str, Any] | None:
        """*task_id*'s result record, waiting up to *timeout* seconds; None if none came.

        *timeout* None waits without limit, 0 looks once. A record past its
        ``expires_at`` is never returned. A store in this process (any
        SQLiteQueue object on the same file, table and name) wakes the wait at
        once; one in another process is seen by looking at the file, every
        5 ms at first, backing off to every ``_RESULT_POLL_MAX`` (50 ms) during
        the call. Many threads may wait at once: each look is one indexed read
        on a connection of its own (shared by the object's waiters), never
        holding the lock that claims and acks take.
        """
        self._check_fork()
        limit = check_timeout(timeout)
        if limit == 0:
            return self._look_result(task_id)
        deadline = None if limit is None else time.monotonic() + limit
        bell = self._result_bell
        pause = _RESULT_POLL_MIN
        # Listening before each look: a store committed after the look rings this
        # event (see _ResultBell), so none is missed between the look and the wait.
        event = bell.listen(task_id)
        try:
            while True:
                record = self._look_result(task_id)
                if record is not None:
                    return record
                wait = pause
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    wait = min(wait, left)
                if event.wait(wait):
                    event = bell.listen(task_id)  # rung (and forgotten): listen again
                else:
                    pause = min(pause * 2, _RESULT_POLL_MAX)
        finally:
            bell.forget(task_id, event)

    def _look_result(self, task_id: str) -> dict[str, Any] | None:
        """One read of *task_id*'s record, unless it is missing or expired."""
        params = {"queue": self.name, "task_id": task_id, "now": time.time()}
        with self._reader_lock:
            conn = self._reader
            if conn is None:
                conn = self._reader = self._connect()
            try:
                # fetchall: the statement is done, no read transaction stays open
                # (one would hold back checkpoints).
                rows = conn.execute(self._sql["result"], params).fetchall()
            except sqlite3.Error:
                self._reader = None
                conn.close()
                raise
        if not rows:
            return None
        record: dict[str, Any] = json.loads(rows[0][0])
        return record

    def rejected(self, limit: int | None = None, offset: int = 0) -> list[tuple[Any, str]]:
        """The rejected messages of this queue, oldest first, as (message or raw, reason):
        all of them, or *limit* (None: no limit) from *offset*."""
        limit, offset = protocol.page_or_all("SQLiteQueue.rejected", limit, offset)
        params = {"queue": self.name, "limit": -1 if limit is None else limit,
                  "offset": offset}
        (rows,) = self._read("rejected", params=params)
        return [(_stored(body), reason) for body, reason in rows]

    def rejected_count(self) -> int:
        """How many messages ``rejected()`` lists."""
        (rows,) = self._read("rejected_count", params={"queue": self.name})
        return int(rows[0][0])

    # -- inspection (read-only: see "Engines, outcomes and inspection") -------------

    def peek(self, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """Ready messages, in the order claims would take them, left in place:
        ``{"message", "priority", "attempts"}`` each, *limit* from *offset*."""
        limit, offset = protocol.page("SQLiteQueue.peek", limit, offset)
        if not limit:
            return []
        params = {"queue": self.name, "now": time.time(), "limit": offset + limit,
                  "offset": 0, "max_deliveries": self.max_deliveries}
        with self._reading() as conn:
            due = conn.execute(self._sql["due_rows"], params).fetchall()
            if not due:  # the common case: the page is the table's alone, from the offset
                params.update(limit=limit, offset=offset)
            in_table = conn.execute(self._sql["ready_rows"], params).fetchall()
        ready: Iterator[tuple[Any, ...]] = (
            (-p, at, 0, row, body, n) for p, at, row, body, n in in_table)
        if due:
            # In the table first, then (at the same priority and time) those the next
            # claim moves in, which get later ids.
            # (Read in the order of their index: few, sorted here.)
            ready = itertools.islice(heapq.merge(
                ready, sorted((-p, at, 1, row, body, n) for p, at, row, body, n in due)),
                offset, offset + limit)
        return [protocol.inspected(_stored(body), -neg, attempts)
                for neg, _, _, _, body, attempts in ready]

    def peek_scheduled(self, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """Messages waiting for their time, the soonest first, with ``"at"``: *limit*
        from *offset*."""
        limit, offset = protocol.page("SQLiteQueue.peek_scheduled", limit, offset)
        params = {"queue": self.name, "now": time.time(), "limit": limit, "offset": offset}
        (rows,) = self._read("later_rows", params=params)
        return [protocol.inspected(_stored(body), priority, attempts, at)
                for priority, at, body, attempts in rows]

    def find(self, task_id: str) -> dict[str, Any] | None:
        """Where the message of *task_id* is now (``leased``, ``waiting`` or
        ``scheduled``), or None; a scan of this queue's rows, in one read."""
        task_id = protocol.task_id_of("SQLiteQueue.find", task_id)
        prefix = protocol.task_prefix(task_id)
        now = time.time()
        params = {"queue": self.name, "now": now, "prefix": prefix, "length": len(prefix)}
        in_table, in_scheduled = self._read("find_in_table", "find_in_scheduled",
                                            params=params)
        found: dict[str, dict[str, Any]] = {}
        for rows in (in_table, in_scheduled):
            for priority, at, body, attempts, leased in rows:
                message = _stored(body)
                if not (isinstance(message, list) and message and message[0] == task_id):
                    continue
                status = ("leased" if leased else "scheduled" if at is not None and at > now
                          else "waiting")
                found.setdefault(status, protocol.inspected(
                    message, priority, attempts, at if status == "scheduled" else None, status))
        for status in ("leased", "waiting", "scheduled"):
            if status in found:
                return found[status]
        return None

    def _read(self, *queries: str, params: dict[str, Any]) -> list[list[Any]]:
        """The rows of each of *queries*, in one read transaction (one snapshot)."""
        with self._reading() as conn:
            return [conn.execute(self._sql[query], params).fetchall() for query in queries]

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """A read transaction (one snapshot) on the connection ``result()`` reads with:
        a long read (``find`` scans) never holds the lock that this object's claims
        and acks need, nor the file's write lock."""
        self._check_fork()
        with self._reader_lock:
            conn = self._reader
            if conn is None:
                conn = self._reader = self._connect()
            try:
                conn.execute("BEGIN")
                yield conn
                conn.execute("COMMIT")  # no read transaction stays open to hold checkpoints
            except BaseException:
                self._reader = None
                conn.close()
                raise

    # -- engines and outcomes ---------------------------------------------------------

    def announce(self, engine_id: str, record: dict[str, Any], ttl: float) -> None:
        """Store or replace *engine_id*'s record, expiring *ttl* seconds from now (this
        machine's clock); expired records go in the same transaction."""
        engine_id, text, seconds = protocol.announcement(
            "SQLiteQueue.announce", engine_id, record, ttl)
        now = time.time()
        params = {"queue": self.name, "now": now, "engine_id": engine_id, "record": text,
                  "expires_at": now + seconds}
        with self._connection() as conn, self._transaction(conn):
            conn.execute(self._sql["forget_expired"], params)
            conn.execute(self._sql["announce"], params)

    def engines(self) -> list[dict[str, Any]]:
        """The records of the engines announced and not expired, by engine id: one read
        (``announce`` deletes the expired ones), no write lock taken."""
        (rows,) = self._read("engines", params={"queue": self.name, "now": time.time()})
        return [json.loads(text) for (text,) in rows]

    def forget_engine(self, engine_id: str) -> None:
        """Drop *engine_id*'s record now."""
        protocol.engine_id_of("SQLiteQueue.forget_engine", engine_id)
        with self._connection() as conn:
            conn.execute(self._sql["forget_engine"],
                         {"queue": self.name, "engine_id": engine_id})

    def add_outcomes(self, minute: int, counts: dict[str, int]) -> None:
        """Add *counts* to the bucket of POSIX *minute*, in one transaction that also
        deletes the buckets more than two hours old."""
        checked = protocol.outcome_counts("SQLiteQueue.add_outcomes", minute, counts)
        rows = [{"queue": self.name, "minute": minute, "outcome": outcome, "count": count}
                for outcome, count in checked.items()]
        with self._connection() as conn, self._transaction(conn):
            conn.execute(self._sql["forget_outcomes"],
                         {"queue": self.name, "oldest": time.time() - _OUTCOMES_KEPT})
            conn.executemany(self._sql["outcome_row"], rows)
            conn.executemany(self._sql["add_outcome"], rows)

    def outcomes(self, since: int) -> dict[int, dict[str, int]]:
        """The buckets of the minutes from *since* on: ``{minute: {outcome: count}}``."""
        start = protocol.since_minute("SQLiteQueue.outcomes", since)
        (rows,) = self._read("outcomes", params={"queue": self.name, "since": start})
        buckets: dict[int, dict[str, int]] = {}
        for minute, outcome, count in rows:
            buckets.setdefault(int(minute), {})[outcome] = int(count)
        return buckets

    def __len__(self) -> int:
        """Messages waiting: ready now (delayed ones whose time has come too) and not leased."""
        return self._count("waiting", "due")

    def _count(self, *queries: str) -> int:
        params = {"queue": self.name, "now": time.time()}
        with self._connection() as conn:
            conn.execute("BEGIN")  # one snapshot: a promotion meanwhile moves no row twice
            counts = [int(conn.execute(self._sql[query], params).fetchone()[0])
                      for query in queries]
            conn.execute("COMMIT")
        return sum(counts)

    def close(self) -> None:
        """Close the connection. The queue stays usable: a later call reopens it.

        Leases this object holds stay held until they run out. A waiting
        ``dequeue`` is not interrupted; it returns within its timeout.
        """
        if self._forks != protocol.forks():
            return  # the parent's connection is not ours to close
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        with self._checkpointing:
            conn, self._checkpointer = self._checkpointer, None
        if conn is not None:
            conn.close()
        with self._reader_lock:
            conn, self._reader = self._reader, None
        if conn is not None:
            conn.close()

    def __repr__(self) -> str:
        return (f"<SQLiteQueue path={self.path!r} table={self.table!r} name={self.name!r} "
                f"consumer={self.consumer!r}>")

    # -- internals ------------------------------------------------------------------

    def _dequeue(self, count: int, timeout: float | None) -> list[Any]:
        """dequeue and dequeue_many: wait up to *timeout* for a first message; up to *count*."""
        self._check_fork()
        seen = self._doorbell.seen()
        messages = self._claim(count)
        if messages or timeout is None or timeout <= 0:
            return messages
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return messages
            # The bell count is read before each claim: a local enqueue after an
            # empty claim, even before this wait begins, cuts the wait short.
            pause = self._pause
            wait = min(pause, remaining)
            due = self._next_due  # the next delayed message's time, as the claim saw it
            if due is not None:
                wait = min(wait, max(due - time.time(), 0.0))
            self._doorbell.wait(seen, wait)
            # The pause grows across calls while the queue stays empty: an idle
            # engine, calling with short timeouts, looks ~1/_POLL_MAX times a second.
            self._pause = min(pause * 2, _POLL_MAX)
            seen = self._doorbell.seen()
            messages = self._claim(count)
            if messages:
                self._pause = _POLL_MIN
                return messages

    def _claim(self, count: int, own: list[_Ack] | None = None) -> list[Any]:
        """Lease the next *count* messages at most, setting poison aside; [] if there is none.

        One transaction (unless poison alone fills one), which also deletes the
        acks pending when it is about to commit (see "Group commit"), and the
        rows of *own* (ack_and_dequeue's, which nobody waits for).
        """
        params: dict[str, Any] = {"queue": self.name, "consumer": self.consumer}
        found: list[tuple[_Key, bytes]] = []  # ((row id, attempts, result ttl), body)
        # Read once: another thread's claim may change it. Never with rows to delete.
        peek = self._peek_first and not own
        # Announced before waiting for the connection, so that acks arriving
        # meanwhile wait for this transaction instead of making one of their own;
        # not while the queue looks empty (a read only, no transaction to share).
        absorbing = not peek
        acks = self._acks
        if absorbing:
            with acks:
                self._absorbers += 1
        try:
            with self._lock:
                conn = self._conn or self._open()
                try:
                    if peek:
                        # While the queue is empty, a read (no write lock: other
                        # processes' claims and enqueues go on) tells there is nothing.
                        params["now"] = now = time.time()
                        if conn.execute(self._sql["peek"], params).fetchone() is None:
                            due = conn.execute(self._sql["next_due"], params).fetchone()[0]
                            self._next_due = due
                            if due is None or due > now:
                                return []
                    while True:
                        batch: list[_Ack] = []
                        try:
                            # The write lock is ours from BEGIN IMMEDIATE to the commit:
                            # the rows chosen cannot be leased by anyone else first.
                            conn.execute("BEGIN IMMEDIATE")
                            params["now"] = time.time()
                            self._promote(conn, params)
                            poisoned = self._lease_next(conn, count, params, found)
                            if own:
                                self._delete_acked(conn, own)
                                own = None  # deleted by the first commit only
                            if absorbing:
                                # Taken last, so that the most share this commit.
                                batch = self._take_acks()
                                if batch:
                                    self._delete_acked(conn, batch)
                            conn.execute("COMMIT")
                            self._commits += 1
                        except BaseException as exc:
                            found.clear()  # rolled back: leased by no one
                            self._settle_acks(batch, exc)
                            raise
                        self._settle_acks(batch, None)
                        if found or poisoned < _POISON_BATCH:
                            break
                        # A transaction's worth of poison only: committed, go on.
                except BaseException:
                    self._abort(conn)
                    raise
        finally:
            if absorbing:
                with acks:
                    self._absorbers -= 1
                    self._hand_over()  # acks that came after the take
        # A crash from here on leaves the rows leased: they come back after the lease.
        self._peek_first = not found
        if not found:
            return []
        if count > 1:  # for _claims_expected (unlocked: a hint, read without guarantees)
            self._batch_claimed_at = time.monotonic()
        add = self._leases.add
        # attempts(m), result_ttl(m): no query
        return [add(_stored(body), key) for key, body in found]

    def _promote(self, conn: sqlite3.Connection, params: dict[str, Any]) -> None:
        """Within a claim's transaction: make the delayed messages whose time has come ready.

        They keep their time as ``available_at``, so they are taken in the
        order they became ready among the others of their priority. Notes the
        next delayed message's time in ``_next_due`` for a waiting dequeue.
        """
        due = conn.execute(self._sql["next_due"], params).fetchone()[0]
        if due is not None and due <= params["now"]:
            conn.execute(self._sql["promote"], params)
            conn.execute(self._sql["promoted"], params)
            due = params["now"]  # more may be due: look again before waiting
        self._next_due = due

    def _lease_next(self, conn: sqlite3.Connection, count: int, params: dict[str, Any],
                    found: list[tuple[_Key, bytes]]) -> int:
        """Within a claim's transaction: lease available rows, in order, until *found*
        holds *count*; set aside the poison met on the way (``_POISON_BATCH`` at most).

        Returns how many rows were set aside.
        """
        poisoned = 0
        until = params["now"] + self.lease
        while poisoned < _POISON_BATCH:
            wanted = count - len(found)
            params["limit"] = wanted
            rows = conn.execute(self._sql["candidate"], params).fetchall()
            leased: list[int] = []
            for key, deliveries, attempts, result_ttl, body in rows:
                if deliveries >= self.max_deliveries:
                    self._move(conn, key, protocol.POISON_REASON)
                    poisoned += 1
                    if poisoned == _POISON_BATCH:
                        break  # the rows after it stay as they are
                    continue
                leased.append(key)
                found.append(((key, attempts, result_ttl), body))
            if leased:
                conn.executemany(self._sql["lease"], [
                    {"consumer": self.consumer, "until": until, "id": key} for key in leased])
            if len(found) == count or len(rows) < wanted:
                break  # enough, or nothing more is available
            # Poison took places in this look: look again, past what is leased now.
        return poisoned

    def _move(self, conn: sqlite3.Connection, row: int, reason: str) -> None:
        """Within a transaction: move *row* to the rejected table with *reason*."""
        conn.execute(self._sql["keep"], {"id": row, "reason": reason, "now": time.time()})
        conn.execute(self._sql["delete"], {"id": row})

    # -- group commit ----------------------------------------------------------------
    #
    # ack() returns only once its DELETE is committed, yet acks from several
    # worker threads share one transaction. The state, under the plain lock _acks:
    #
    # - _pending: tickets (_Ack) appended by ack(), taken by no transaction yet;
    # - _flusher: an ack thread has the duty to commit what is pending: it takes
    #   the connection lock, then the whole pending batch, and commits one
    #   DELETE ... WHERE leased_by = me AND id IN (...);
    # - _absorbers: claims under way (from before they wait for the connection
    #   lock to after they settled what they took): each takes the pending batch
    #   into its own transaction just before COMMIT, so under load acks cost no
    #   commit of their own.
    #
    # Invariant: a ticket taken by a transaction and not yet settled is covered
    # by _flusher or _absorbers, which drop only after settling it (committed,
    # or failed with the error) and waking its waiter. A pending ticket is taken
    # by the first transaction that takes the batch after its append. When the
    # last flusher or claim finishes with tickets still pending (appended after
    # its take), it hands the duty to the oldest one's thread (_hand_over), so
    # nothing pending is ever left without a transaction to come. An ack that
    # finds neither a flusher nor a claim under way flushes itself -- after
    # waiting a moment if a claim is likely (_claims_expected).
    #
    # Races, case by case:
    # - Failure: a transaction that fails (the DELETE, the COMMIT, the claim's
    #   own statements after the batch was taken, or opening the connection)
    #   settles every ticket of its batch with the error: each of those acks
    #   raises (the engine logs "ack failed"), the rows stay, and their leases --
    #   no longer renewed -- bring the messages back: at-least-once. A COMMIT that
    #   reports an error is taken as not committed: at worst a message whose ack
    #   raised is gone anyway, never one reported acked that runs again.
    # - Heartbeat: it renews the leases of held messages and of pending acks (the
    #   rows are ours until the DELETE commits). Tickets in flight are in a
    #   transaction holding the connection lock and the write lock: a heartbeat
    #   comes before or after it, never in between.
    # - A lease that ran out while its ack was pending (only with a write lock
    #   held elsewhere longer than the lease): another consumer may have claimed
    #   the row; "leased_by = me" leaves it to them (it runs twice, as with any
    #   lease that ran out) instead of deleting a message someone else holds.
    # - Requeue, reject: they settle other messages (_settle pops each message
    #   once), so they never touch a pending ack's row; they take the connection
    #   lock like any statement and serialize with flushes and claims.
    # - close() while acks are pending: close takes the connection lock, so it
    #   waits for a flush or claim in progress; a flusher that gets the lock after
    #   close opens a new connection. Pending acks are never dropped.
    # - fork: the child's _check_fork gives it fresh state (another thread may
    #   have held _acks at the fork); the parent's pending acks belong to parent
    #   threads and are committed by the parent. A child acking a parent's
    #   message gets ValueError, as for any message it did not dequeue.
    # - An interrupt (KeyboardInterrupt) in a waiting ack leaves its ticket
    #   pending: the next transaction deletes it, or its lease runs out. In a
    #   flusher, its batch fails and the duty is handed over.

    def _claims_expected(self) -> float:
        """Seconds an ack may wait for a claim to share its commit: 0 unless one is likely.

        A claim is likely soon when this queue object was asked for several
        messages at once a moment ago: the engine asks for one per worker
        waiting for its dispatcher, so workers are queueing for claims (the
        claims, not the tasks, are the bottleneck), and the next claim comes as
        soon as the dispatcher gets the GIL, which this thread holds until it
        blocks. Then waiting a little costs less than a commit: most acks share
        a claim's. When claims are for one message -- workers busy with long
        tasks, a single consumer thread -- the next claim is most likely the
        acking thread's own, after its ack: waiting would only delay it.
        """
        return (_ABSORB_WAIT if time.monotonic() - self._batch_claimed_at < _ABSORB_WINDOW
                else 0.0)

    def _flush(self, ticket: _Ack) -> None:
        """As the flusher: commit the delete of every pending ack; then give up the duty.

        Raises the transaction's error if it failed *ticket*'s own batch
        (a batch that failed without it is reported by its own acks).
        """
        batch: list[_Ack] = []
        try:
            self._check_fork()
            with self._lock:
                conn = self._conn or self._open()
                try:
                    batch = self._take_acks()
                    if len(batch) >= _CHUNK:
                        conn.execute("BEGIN IMMEDIATE")
                        self._delete_acked(conn, batch)
                        conn.execute("COMMIT")
                    elif batch:
                        self._delete_acked(conn, batch)  # one statement: its own transaction
                    self._commits += 1
                except BaseException:
                    self._abort(conn)
                    raise
        except BaseException as exc:
            if not batch:  # failed opening the connection: fail what waits on it
                batch = self._take_acks()
            self._settle_acks(batch, exc)
            if ticket in batch or not isinstance(exc, Exception):
                raise
        else:
            self._settle_acks(batch, None)
        finally:
            with self._acks:
                self._flusher = False
                self._hand_over()

    def _checkpoint(self) -> None:
        """After an ack: copy the WAL into the database file, off the claims' path.

        SQLite checkpoints a WAL of 1000 pages from within the COMMIT that
        reaches it, syncing the WAL and the file: tens of milliseconds on a
        disk, which would stall the claim -- and every worker of the engine --
        that happens to commit it. Here the ack's thread, whose message is
        settled and which holds no lock, runs a PASSIVE checkpoint every
        _CHECKPOINT_EVERY commits of this object, on a connection of its own
        (_checkpointing: one at a time, others go on), while claims go on
        committing. It syncs as SQLite's own would (synchronous=NORMAL), and
        more often, so no durability is given up; SQLite's automatic
        checkpoint stays as the backstop when acks are few. A failure is only
        a checkpoint skipped: the ack is committed already.
        """
        if not self._checkpointing.acquire(blocking=False):
            return  # another thread is at it
        try:
            if self._commits < _CHECKPOINT_EVERY or self._forks != protocol.forks():
                return
            self._commits = 0  # a lost update under a race only shifts the next one
            conn = self._checkpointer
            try:
                if conn is None:
                    conn = self._checkpointer = sqlite3.connect(
                        self.path, timeout=self.busy_timeout, isolation_level=None,
                        check_same_thread=False)
                    conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except sqlite3.Error as exc:
                if conn is not None and "locked" not in str(exc):  # busy: keep it for next time
                    self._checkpointer = None
                    conn.close()
        finally:
            self._checkpointing.release()

    def _take_acks(self) -> list[_Ack]:
        with self._acks:
            batch, self._pending = self._pending, []
        return batch

    def _delete_acked(self, conn: sqlite3.Connection, batch: list[_Ack]) -> None:
        """Delete the rows of *batch* that this consumer still leases."""
        for start in range(0, len(batch), _CHUNK - 1):
            rows = [ticket.row for ticket in batch[start:start + _CHUNK - 1]]
            sql = self._ack_sql.get(len(rows))
            if sql is None:
                sql = self._ack_sql[len(rows)] = (
                    f'DELETE FROM "{self.table}" WHERE leased_by = ? '
                    f'AND id IN ({", ".join("?" * len(rows))})')
            conn.execute(sql, [self.consumer, *rows])

    def _settle_acks(self, batch: list[_Ack], error: BaseException | None) -> None:
        """Mark *batch* committed (error None) or failed, and wake its waiters."""
        if batch:
            with self._acks:
                for ticket in batch:
                    ticket.error = error
                    ticket.done = True
                    ticket.signal()

    def _hand_over(self) -> None:
        """Under _acks, as a flusher or claim ends: give the duty to a pending ack, if due."""
        if self._pending and not self._flusher and not self._absorbers:
            self._flusher = True
            lead = self._pending[0]
            lead.lead = True
            lead.signal()

    def _settle(self, message: Any, action: str) -> int:
        """The row of *message*, its lease forgotten; ValueError if this object does not hold it."""
        row: int = self._leases.settle(message, f"SQLiteQueue.{action}")[0]
        return row

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
        if self._forks != protocol.forks():
            # A forked child must not touch its parent's connection (SQLite
            # forbids it), nor its leases, nor locks another thread may have
            # held at the fork: keep the connection unclosed and become a
            # consumer of its own.
            _forked_away.extend(c for c in (self._conn, self._checkpointer, self._reader)
                                if c is not None)
            self._new_identity()

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        """This object's connection, for one statement or transaction, under its lock.

        (The hot paths, _claim and _flush, spell this out without a generator.)
        """
        self._check_fork()
        with self._lock:
            conn = self._conn or self._open()
            try:
                yield conn
            except BaseException:
                self._abort(conn)
                raise

    def _open(self) -> sqlite3.Connection:
        """Under _lock: the connection, opened."""
        conn = self._conn = self._connect()
        return conn

    def _abort(self, conn: sqlite3.Connection) -> None:
        """Under _lock, after an error: roll back what *conn* left open."""
        if conn.in_transaction:
            # Left open, the transaction would keep the write lock every
            # other process is waiting for.
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                self._conn = None
                conn.close()  # closing rolls back and releases the lock

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
        if present and present[0] == len(names) and not self._missing_columns(conn):
            return
        # Under the write lock: of processes starting together, the first
        # creates and the others find everything there.
        try:
            with self._transaction(conn):
                for statement in self._schema:
                    conn.execute(statement)
                for table, column in self._missing_columns(conn):
                    conn.execute(f'ALTER TABLE "{table}" ADD COLUMN {column} '
                                 f'{_ADDED_COLUMNS[column]}')
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _missing_columns(self, conn: sqlite3.Connection) -> list[tuple[str, str]]:
        """(table, column) of the _ADDED_COLUMNS that the message tables lack."""
        missing: list[tuple[str, str]] = []
        for table in (self._names["table"], self._names["scheduled"]):
            columns = {row[1] for row in conn.execute(f'PRAGMA table_info("{table}")')}
            missing.extend((table, column) for column in _ADDED_COLUMNS
                           if column not in columns)
        return missing


def _ttl_seconds(action: str, argument: str, value: object) -> float:
    """*value* as a number of seconds > 0 (finite); ValueError naming *action*, *argument*."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not 0 < value < math.inf:
        raise ValueError(f"SQLiteQueue.{action}: {argument} must be a number of seconds > 0, "
                         f"not {value!r}")
    return float(value)


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
