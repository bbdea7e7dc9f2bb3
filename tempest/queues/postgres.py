"""PostgresQueue: a durable queue in a PostgreSQL table, shared by many engines.

Needs the ``postgres`` extra (psycopg 3.2 or newer)::

    pip install 'task-tempest[postgres]'

Schema
------
The queue creates its tables and indexes itself on first use (under a
transaction-scoped advisory lock, so engines starting together do not race),
unless they already exist. A DBA who prefers to create them in a migration
(the application's role then needs no CREATE privilege) prints the SQL with::

    python -c "from tempest.queues.postgres import schema_sql; print(schema_sql())" | psql "$DSN"

which, for the default table ``tempest_messages``, is::

    CREATE TABLE IF NOT EXISTS "tempest_messages" (
        id bigserial PRIMARY KEY,
        queue text NOT NULL,
        body text NOT NULL,
        priority integer NOT NULL DEFAULT 0,
        available_at timestamptz NOT NULL DEFAULT now(),
        enqueued_at timestamptz NOT NULL DEFAULT now(),
        deliveries integer NOT NULL DEFAULT 0,
        leased_by text,
        lease_until timestamptz,
        attempts integer NOT NULL DEFAULT 0,
        first_failed_at timestamptz,
        result_ttl double precision
    );
    ALTER TABLE "tempest_messages"
        ADD COLUMN IF NOT EXISTS attempts integer NOT NULL DEFAULT 0,
        ADD COLUMN IF NOT EXISTS first_failed_at timestamptz,
        ADD COLUMN IF NOT EXISTS result_ttl double precision;
    CREATE INDEX IF NOT EXISTS "tempest_messages_ready"
        ON "tempest_messages" (queue, priority DESC, available_at, id);
    DROP INDEX IF EXISTS "tempest_messages_dequeue";
    CREATE INDEX IF NOT EXISTS "tempest_messages_leased"
        ON "tempest_messages" (leased_by) WHERE leased_by IS NOT NULL;
    CREATE TABLE IF NOT EXISTS "tempest_messages_rejected" (
        id bigint PRIMARY KEY,
        queue text NOT NULL,
        body text NOT NULL,
        reason text NOT NULL,
        rejected_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE IF NOT EXISTS "tempest_messages_scheduled" (
        id bigserial PRIMARY KEY,
        queue text NOT NULL,
        body text NOT NULL,
        priority integer NOT NULL,
        available_at timestamptz NOT NULL,
        attempts integer NOT NULL DEFAULT 0,
        first_failed_at timestamptz,
        result_ttl double precision
    );
    ALTER TABLE "tempest_messages_scheduled"
        ADD COLUMN IF NOT EXISTS attempts integer NOT NULL DEFAULT 0,
        ADD COLUMN IF NOT EXISTS first_failed_at timestamptz,
        ADD COLUMN IF NOT EXISTS result_ttl double precision;
    CREATE INDEX IF NOT EXISTS "tempest_messages_scheduled_due"
        ON "tempest_messages_scheduled" (queue, available_at, id);
    CREATE TABLE IF NOT EXISTS "tempest_messages_fired" (
        queue text NOT NULL,
        schedule text NOT NULL,
        slot double precision NOT NULL,
        recorded_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (queue, schedule, slot)
    );
    CREATE TABLE IF NOT EXISTS "tempest_messages_failed" (
        queue text NOT NULL,
        task_id text NOT NULL,
        body text NOT NULL,
        task text NOT NULL,
        attempts integer NOT NULL,
        error_type text NOT NULL,
        error text NOT NULL,
        traceback text NOT NULL,
        first_failed_at timestamptz NOT NULL,
        last_failed_at timestamptz NOT NULL,
        priority integer NOT NULL,
        expires_at timestamptz NOT NULL,
        PRIMARY KEY (queue, task_id)
    );
    CREATE INDEX IF NOT EXISTS "tempest_messages_failed_latest"
        ON "tempest_messages_failed" (queue, last_failed_at);
    CREATE TABLE IF NOT EXISTS "tempest_messages_results" (
        queue text NOT NULL,
        task_id text NOT NULL,
        record json NOT NULL,
        expires_at timestamptz NOT NULL,
        PRIMARY KEY (queue, task_id)
    );
    CREATE INDEX IF NOT EXISTS "tempest_messages_results_expiry"
        ON "tempest_messages_results" (queue, expires_at);
    CREATE TABLE IF NOT EXISTS "tempest_messages_engines" (
        queue text NOT NULL,
        engine_id text NOT NULL,
        record json NOT NULL,
        expires_at timestamptz NOT NULL,
        PRIMARY KEY (queue, engine_id)
    );
    CREATE TABLE IF NOT EXISTS "tempest_messages_outcomes" (
        queue text NOT NULL,
        minute bigint NOT NULL,
        outcome text NOT NULL,
        count bigint NOT NULL,
        PRIMARY KEY (queue, minute, outcome)
    );

``body`` is the message as JSON text (not ``jsonb``: a body that is not valid
JSON can be stored, and comes back raw for the engine to reject). One table
holds any number of named queues (the ``queue`` column). A table made by an
earlier version gains the new tables, columns and indexes on first use.
``<table>_results`` keeps task results (see "Results"); its ``record`` is
``json`` (kept as written, unlike ``jsonb``), for a DBA's ``record->>'state'``.
A ttl is ``double precision`` (``real`` would give back 0.3 as 0.30000001).

Delayed messages and periodic slots
-----------------------------------
``schedule()`` stores a message whose time has come (or that has none) in the
table, and one to run later in ``<table>_scheduled``; times are the
database's clock. Each claim looks up the earliest delayed message (one step
down an index): while one is due, the claim first moves the due ones (500 at
most) into the table, keeping their time as ``available_at``, in one
statement -- a message is in one table or the other, whenever a process or
the server dies -- and then claims. Claims take ready rows by priority, then
``available_at`` (the order they became ready), then id. A waiting dequeue
sleeps no later than the earliest delayed message's time as its last claim
saw it; every ``schedule()`` notifies, so waiters look again at once when an
earlier one comes. ``requeue`` and a lease that ran out leave the row in
place: it keeps its priority and its place.

``fire()`` records (schedule, slot) under the primary key of ``<table>_fired``
and stores the message in the same statement: of engines racing for a slot,
one inserts, the others wait for its commit and insert nothing. Slots recorded
more than *keep* seconds ago are deleted by the next ``fire()`` of that
schedule.

Retries and the failed store
----------------------------
A message's failed attempts and its first failure time are columns of its
row (``attempts``, ``first_failed_at``), in the table and in
``<table>_scheduled``: promotion carries them, and ``requeue`` and a lease
that ran out leave the row as it is. The claim returns ``attempts`` with each
row and the queue object keeps it with the lease, so ``attempts(m)`` sends no
query. ``retry()`` deletes the leased row and stores the message again, one
attempt up, in one statement. ``fail()`` deletes it and stores an entry in
``<table>_failed`` (one per queue and task id, the latest failure replacing
an earlier one) in one transaction, then drops expired entries and those
beyond *keep*; an advisory lock per queue makes engines failing at once take
turns, so the bound holds. Entry times are the engine's clock (the record's
``last_failed_at``); what has expired is decided by the database's.

Results
-------
A message that asks for its result (``schedule(m, ..., result_ttl=T)``) has
*T* in its row's ``result_ttl`` column, NULL for every other message (those
of ``enqueue``, ``fire`` and other producers): it travels as ``attempts``
does -- promotion, ``requeue``, a lease that ran out and ``retry`` keep it,
and the claim returns it with the row, so ``result_ttl(m)`` sends no query.
``retry_failed`` and ``retry_failed_all`` store the message again without it
(a failed entry does not keep it): the run they start stores no result.
Messages that ask for none cost nothing more: the same statements, one
NULL column more.

``store_result(task_id, record, ttl=T)`` is one statement: it upserts the
row (queue, task_id) of ``<table>_results`` -- the record as JSON, with
``expires_at`` (the database's ``now()`` + *T*) in the JSON and in its column
-- and sends ``pg_notify`` on the queue's result channel (``<table>/results:
<name>``, or a digest of it when longer than 63 bytes), delivered at the
commit. Its payload is the JSON array ``[task_id, record]``, the record as
stored: a waiter woken by it returns the record without a SELECT. A record
too long for a notification (8000 bytes) sends ``[task_id]``, and the waiter
reads the row; ``[]`` when even the id does not fit, and every waiter of the
queue object looks. A payload that is not such an array is taken as a bare
task id (what earlier code of this module sent): its waiters look. The same
statement deletes up to 100 expired results of the queue, oldest first, down
the (queue, expires_at) index, skipping rows that another store holds: only
tasks that store results pay for the cleanup, and it never waits. An expired row is never returned,
deleted yet or not.

A waiting ``result(task_id, timeout)`` registers its id with the queue
object's result listener -- one connection LISTENing on that channel, shared
by every waiting thread of the queue object, read by a thread of its own
that wakes the waiters of each id notified -- and only then SELECTs: a store
committed before the SELECT is found by it, one committed after is announced
to the listener, so no wake-up is lost. It looks again every 5 s (a safety
net for a listener cut off without its thread knowing, not a poll). The
listener opens with the first wait (a connection beside the four of the
statements) and closes 5 s after the last, at ``close()``, or when its
connection fails; then its waiters look again, on a new one.

Engines, outcomes and inspection
--------------------------------
``announce`` upserts the engine's row of ``<table>_engines`` (its record as
``json``, ``expires_at`` the database's ``now()`` + *ttl*) and deletes the
queue's expired rows in the same statement. ``add_outcomes`` upserts (queue,
minute, outcome) rows of ``<table>_outcomes``, adding to their ``count``, and
deletes the queue's rows of minutes more than two hours old, in one
statement. The deletes skip rows another statement holds (``SKIP LOCKED``):
they never wait. The engine calls them once per announce (every few
seconds), never per task; the message tables and their statements are
untouched. ``engines()`` and ``outcomes()`` are one ``SELECT`` each, writing
nothing (a dashboard may read through a read-only replica or role): the rows
with ``expires_at`` after ``now()``, so an expired record is never listed,
deleted yet or not; the minutes from *since* on.

``peek`` is one read: the available rows of the table down the ``_ready``
index, and the delayed rows whose time has come (the next claim moves them in,
with later ids), merged in the claim's order -- priority, then the time each
became ready -- less the rows a claim would set aside as poison.
``peek_scheduled`` reads ``_scheduled_due`` in order. ``find`` reads the rows of
the queue whose body starts with the id's JSON (``["<id>"``), in both tables:
one sequential scan of the queue's rows per search, no lock taken. A row leased
and not expired is ``leased``. None of them writes anything.

Where a result can be lost or seen twice
----------------------------------------
* The worker stores the result before it settles the message (``ack`` or
  ``fail``): a crash between the two leaves the message leased; it runs
  again after its lease and stores its result again, replacing the first
  (one upsert: a reader sees the old record or the new one, never half). So
  a result is never lost where its message is not, and a waiter may see the
  first run's record while ``result`` later returns the second's. A success
  goes through ``store_result_and_ack``: the result and the DELETE commit
  together, so there is no crash point between them at all.
* ``store_result`` that fails (a connection error) raises before the message
  is settled: the message returns after its lease, and its next run stores
  the result. A store whose reply was lost may have committed: the rerun
  replaces it.
* A record is kept for its *ttl* on the database's clock; past it, no call
  returns it. A message through the failed store and ``retry_failed`` asks
  for no result any more: the record of its last failed attempt stays until
  it expires.
* A notification is lost only with the listening connection; its waiters
  then look again at once, listening anew, so a stored result is still found.
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import os
import re
import secrets
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tempest.exceptions import ConfigurationError
from tempest.queues import protocol

try:
    import psycopg
    from psycopg import sql
except ImportError:  # the extra is not installed: PostgresQueue() says how to fix it
    _DRIVER_MISSING = True
else:
    _DRIVER_MISSING = False

__all__ = ["PostgresQueue", "schema_sql"]

_TABLE = re.compile(r"[a-z_][a-z0-9_]{0,47}\Z")
# Lowercase only: the name is quoted in every statement, and a DBA typing it
# unquoted in psql gets the same table. 48 characters leaves room for the
# "_rejected" and index suffixes within PostgreSQL's 63-byte identifiers.

_MAX_IDENTIFIER = 63
"""PostgreSQL's longest identifier (and LISTEN channel), in bytes."""

_CONNECT_TIMEOUT = 10
"""Seconds to wait for a connection unless the DSN says otherwise (libpq: forever)."""

_WORK_CONNECTIONS = 4
"""Connections a queue object uses at once for its statements (waiting dequeues aside).

Every statement is one short round trip, so a few connections keep up with many
threads, and a hundred engines stay within a server's max_connections.
"""

_RECLAIM = 1.0
"""Seconds a listening wait goes at most without a claim.

Every enqueue and requeue notifies, so while no notification comes nothing
new is available -- except a message whose lease ran out (its consumer died),
which no one announces: a claim this often finds it, long before a lease
(30 s by default) would matter.
"""

_BUSY_DUE = 0.005
"""Seconds a waiting dequeue sleeps when a due message is being moved by another engine."""

_KEEP = 5.0
"""Seconds a listener kept between waits may go unused before it is closed.

The engine's next wait comes within a fraction of a second; one that does not
come (the engine stopped, the application only enqueues now) must not leave a
connection listening unread, which would hold back the server's notification
queue. A thread of the queue object's (see ``_reap``) or ``close()`` closes it.
"""

_HANDOFF = 0.1
"""Seconds a listener whose wait ended with messages is kept for the next wait.

The engine's next leader waits at once while it has free workers, or when a
worker frees up: it takes the listener over, LISTENing already (no UNLISTEN
after the claim, no claim and LISTEN before the next wait: a call's message
starts a round trip sooner). An engine busy for longer must not receive every
enqueue's notification unread: the reaper (``_reap``) then UNLISTENs it and
gives the connection back to the pool.
"""

_RESULT_RECHECK = 5.0
"""Seconds a waiting ``result()`` goes at most without looking at the table again.

It is woken by the notification of ``store_result``, not by this: the look
again is a safety net for a notification that can never come (the listening
connection silently cut by the network, which the listener's thread does not
notice at once). A record stored meanwhile is found then, not lost.
"""

_RESULT_SWEEP = 100
"""Expired results a ``store_result`` deletes at most (the oldest first)."""

_OUTCOMES_KEPT = 7200
"""Seconds of outcome buckets kept (the protocol promises one hour at least)."""

_RESULT_TTL_MAX = 1e11
"""The longest a result is kept, in seconds (about 3,000 years): PostgreSQL's
timestamps end in the year 294276, so a longer *ttl* is kept this long."""

_SCHEMA = """\
CREATE TABLE IF NOT EXISTS {table} (
    id bigserial PRIMARY KEY,
    queue text NOT NULL,
    body text NOT NULL,
    priority integer NOT NULL DEFAULT 0,
    available_at timestamptz NOT NULL DEFAULT now(),
    enqueued_at timestamptz NOT NULL DEFAULT now(),
    deliveries integer NOT NULL DEFAULT 0,
    leased_by text,
    lease_until timestamptz,
    attempts integer NOT NULL DEFAULT 0,
    first_failed_at timestamptz,
    result_ttl double precision
);
ALTER TABLE {table}
    ADD COLUMN IF NOT EXISTS attempts integer NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS first_failed_at timestamptz,
    ADD COLUMN IF NOT EXISTS result_ttl double precision;
CREATE INDEX IF NOT EXISTS {ready_index}
    ON {table} (queue, priority DESC, available_at, id);
DROP INDEX IF EXISTS {old_index};
CREATE INDEX IF NOT EXISTS {leased_index}
    ON {table} (leased_by) WHERE leased_by IS NOT NULL;
CREATE TABLE IF NOT EXISTS {rejected} (
    id bigint PRIMARY KEY,
    queue text NOT NULL,
    body text NOT NULL,
    reason text NOT NULL,
    rejected_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS {scheduled} (
    id bigserial PRIMARY KEY,
    queue text NOT NULL,
    body text NOT NULL,
    priority integer NOT NULL,
    available_at timestamptz NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    first_failed_at timestamptz,
    result_ttl double precision
);
ALTER TABLE {scheduled}
    ADD COLUMN IF NOT EXISTS attempts integer NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS first_failed_at timestamptz,
    ADD COLUMN IF NOT EXISTS result_ttl double precision;
CREATE INDEX IF NOT EXISTS {scheduled_index}
    ON {scheduled} (queue, available_at, id);
CREATE TABLE IF NOT EXISTS {fired} (
    queue text NOT NULL,
    schedule text NOT NULL,
    slot double precision NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (queue, schedule, slot)
);
CREATE TABLE IF NOT EXISTS {failed} (
    queue text NOT NULL,
    task_id text NOT NULL,
    body text NOT NULL,
    task text NOT NULL,
    attempts integer NOT NULL,
    error_type text NOT NULL,
    error text NOT NULL,
    traceback text NOT NULL,
    first_failed_at timestamptz NOT NULL,
    last_failed_at timestamptz NOT NULL,
    priority integer NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (queue, task_id)
);
CREATE INDEX IF NOT EXISTS {failed_index}
    ON {failed} (queue, last_failed_at);
CREATE TABLE IF NOT EXISTS {results} (
    queue text NOT NULL,
    task_id text NOT NULL,
    record json NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (queue, task_id)
);
CREATE INDEX IF NOT EXISTS {results_index}
    ON {results} (queue, expires_at);
CREATE TABLE IF NOT EXISTS {engines} (
    queue text NOT NULL,
    engine_id text NOT NULL,
    record json NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (queue, engine_id)
);
CREATE TABLE IF NOT EXISTS {outcomes} (
    queue text NOT NULL,
    minute bigint NOT NULL,
    outcome text NOT NULL,
    count bigint NOT NULL,
    PRIMARY KEY (queue, minute, outcome)
);"""
# Claims read <table>_ready in order: by priority, then by the time each row
# became ready (available_at: its enqueue, or the time a delayed message was
# due), then by id. Tables made before scheduling have <table>_dequeue on
# (queue, priority DESC, id) instead, which goes: every write would keep both.

# Every time below comes from the database's clock (now()), never from the
# engines' machines: engines whose clocks disagree still agree on which
# leases have run out.

_CLAIM = """\
WITH due AS MATERIALIZED (
    SELECT min(available_at) AS at FROM {scheduled} WHERE queue = %(queue)s
), candidate AS MATERIALIZED (
    SELECT id, deliveries FROM {table}
    WHERE queue = %(queue)s AND available_at <= now()
      AND (lease_until IS NULL OR lease_until < now())
      AND (NOT %(gate)s OR NOT EXISTS (SELECT FROM due WHERE at <= now()))
      AND {no_flush_wait}
    ORDER BY priority DESC, available_at, id
    FOR UPDATE SKIP LOCKED
    LIMIT %(count)s
), claimed AS (
    UPDATE {table}
    SET leased_by = %(consumer)s, lease_until = now() + make_interval(secs => %(lease)s),
        deliveries = deliveries + 1
    WHERE id = ANY(ARRAY(SELECT id FROM candidate WHERE deliveries < %(max_deliveries)s))
    RETURNING id, body, priority, available_at, attempts, result_ttl
), poison AS (
    DELETE FROM {table}
    WHERE id = ANY(ARRAY(SELECT id FROM candidate WHERE deliveries >= %(max_deliveries)s))
    RETURNING id, queue, body
), kept AS (
    INSERT INTO {rejected} (id, queue, body, reason)
    SELECT id, queue, body, %(poison)s FROM poison
)
SELECT id, body, 0 AS kind, priority, available_at, NULL::float8, attempts, result_ttl
FROM claimed
UNION ALL
SELECT id, NULL, 1, 0, NULL, NULL, 0, NULL FROM poison
UNION ALL
SELECT NULL, NULL, 2, 0, NULL, extract(epoch FROM at - now())::float8, 0, NULL FROM due
WHERE at IS NOT NULL
ORDER BY 3, 4 DESC, 5, 1"""
# One statement, so one round trip and one transaction: the oldest *count*
# available rows, locked with SKIP LOCKED (concurrent engines skip them instead
# of waiting), are each either leased to this consumer with one more delivery
# counted or -- when this delivery would exceed max_deliveries -- moved to the
# rejected table as poison. The UPDATE and the DELETE take the candidates in
# cases that exclude each other: one statement must not modify a row twice.
# "= ANY(ARRAY(...))" makes each an index scan on the primary key for the few
# ids found (a plain IN may be planned as a join over the whole table). The
# claimed rows come back in the order they were chosen (RETURNING has no order
# of its own).
#
# Delayed messages: "due" looks up the earliest one (one step down an index)
# and a last row (kind 2) tells how many seconds away it is, which bounds a
# waiting dequeue's sleep. While one is due -- its time came and no claim moved
# it into the table yet -- the gate holds: the claim takes nothing, and the
# caller runs _PROMOTE and claims again, so a message that became ready first
# is taken first. A claim right after a promotion that moved nothing (the due
# rows are being moved by another engine) goes without the gate, so waits for
# an engine's commit never loop.

_PROMOTE = """\
WITH moved AS (
    DELETE FROM {scheduled}
    WHERE id = ANY(ARRAY(
        SELECT id FROM {scheduled} WHERE queue = %(queue)s AND available_at <= now()
        ORDER BY available_at, id FOR UPDATE SKIP LOCKED LIMIT 500))
    RETURNING queue, body, priority, available_at, id, attempts, first_failed_at, result_ttl
), stored AS (
    INSERT INTO {table} (queue, body, priority, available_at, attempts, first_failed_at,
                         result_ttl)
    SELECT queue, body, priority, available_at, attempts, first_failed_at, result_ttl
    FROM moved
    ORDER BY available_at, id
    RETURNING 1
)
SELECT count(*) FROM stored"""
# One statement, so one transaction: a delayed message is in one table or the
# other, never both, never neither, whenever the process or the server dies.
# It keeps its due time as available_at, its failed attempts and its result ttl.
# SKIP LOCKED:
# engines promoting at the same moment share the rows instead of waiting for
# each other.

_SCHEDULE = """\
WITH due AS (
    SELECT greatest(now(), coalesce(
        to_timestamp(%(at)s::float8),
        now() + make_interval(secs => coalesce(%(delay)s::float8, 0)))) AS at
), ready AS (
    INSERT INTO {table} (queue, body, priority, result_ttl)
    SELECT %(queue)s, %(body)s, %(priority)s, %(result_ttl)s::float8 FROM due WHERE at <= now()
), later AS (
    INSERT INTO {scheduled} (queue, body, priority, available_at, result_ttl)
    SELECT %(queue)s, %(body)s, %(priority)s, at, %(result_ttl)s::float8 FROM due
    WHERE at > now()
)
SELECT pg_notify(%(channel)s, '')"""
# The notification wakes waiting dequeues for a ready message, and makes them
# look again at the earliest delayed one (it may be earlier than they knew).

_FIRE = """\
WITH forget AS (
    DELETE FROM {fired}
    WHERE queue = %(queue)s AND schedule = %(schedule)s
      AND recorded_at < now() - make_interval(secs => %(keep)s)
), recorded AS (
    INSERT INTO {fired} (queue, schedule, slot) VALUES (%(queue)s, %(schedule)s, %(slot)s)
    ON CONFLICT DO NOTHING
    RETURNING greatest(now(), to_timestamp(slot)) AS at
), ready AS (
    INSERT INTO {table} (queue, body, priority)
    SELECT %(queue)s, %(body)s, %(priority)s FROM recorded WHERE at <= now()
), later AS (
    INSERT INTO {scheduled} (queue, body, priority, available_at)
    SELECT %(queue)s, %(body)s, %(priority)s, at FROM recorded WHERE at > now()
)
SELECT count(*), pg_notify(%(channel)s, '') FROM recorded"""
# One statement: the slot is recorded and its message stored together, or
# neither. Of engines firing the same slot at once, the primary key lets one
# insert; the others wait for its commit and then insert nothing.

_LAST_FIRED = "SELECT max(slot) FROM {fired} WHERE queue = %(queue)s AND schedule = %(schedule)s"

_SCHEDULED = """\
SELECT count(*) FROM {scheduled} WHERE queue = %(queue)s AND available_at > now()"""

_MOVE = """\
WITH moved AS (DELETE FROM {table} WHERE id = %(id)s RETURNING id, queue, body)
INSERT INTO {rejected} (id, queue, body, reason)
SELECT id, queue, body, %(reason)s FROM moved"""

_ENQUEUE = """\
WITH stored AS (INSERT INTO {table} (queue, body) VALUES (%(queue)s, %(body)s) RETURNING id)
SELECT pg_notify(%(channel)s, '') FROM stored"""

_REQUEUE = """\
WITH freed AS (
    UPDATE {table} SET leased_by = NULL, lease_until = NULL,
                       deliveries = greatest(deliveries - 1, 0)
    WHERE id = %(id)s AND leased_by = %(consumer)s
    RETURNING id)
SELECT pg_notify(%(channel)s, '') FROM freed"""

_ACK = "DELETE FROM {table} WHERE id = ANY(%(ids)s::bigint[]) AND {no_flush_wait}"
# The rows of every ack that waited while the previous DELETE was in flight.

_NO_FLUSH_WAIT = "set_config('synchronous_commit', 'off', true) IS NOT NULL"
# In a claim's or an ack's WHERE: that statement's commit does not wait for the
# WAL flush (synchronous_commit off for its own transaction only; the session's
# setting stays). Evaluated for the rows it looks at: a statement that finds
# none writes nothing either. A PostgreSQL crash (not a lost connection) can
# then forget the claims and acks of its last moments (up to three times
# wal_writer_delay, 0.6 s by default): those messages are leased or ready again
# and run again; nothing is lost. Enqueues, schedules, results, retries and
# the failed store keep the server's setting.

_LEASE_TEST = "AND (lease_until IS NULL OR lease_until < now())\n"
_ACK_CLAIM = ("WITH acked AS (\n    " + _ACK + "\n), "
              + _CLAIM.removeprefix("WITH ").replace(
                  _LEASE_TEST, _LEASE_TEST + "      AND id <> ALL(%(ids)s::bigint[])\n", 1))
# An ack and the claim after it, in one statement: one round trip, one commit.
# The acked rows are never candidates (a row whose lease ran out could be
# otherwise, and one statement must not modify a row twice).

_HEARTBEAT = """\
UPDATE {table} SET lease_until = now() + make_interval(secs => %(lease)s)
WHERE leased_by = %(consumer)s AND id = ANY(%(ids)s::bigint[])"""

_WAITING = """\
SELECT (SELECT count(*) FROM {table}
        WHERE queue = %(queue)s AND available_at <= now()
          AND (lease_until IS NULL OR lease_until < now()))
     + (SELECT count(*) FROM {scheduled} WHERE queue = %(queue)s AND available_at <= now())"""
# Delayed messages whose time has come are waiting, moved into the table or not.

_REJECTED = """\
SELECT body, reason FROM {rejected} WHERE queue = %(queue)s ORDER BY rejected_at, id
LIMIT %(limit)s OFFSET %(offset)s"""
# LIMIT NULL: all of them.

_REJECTED_COUNT = "SELECT count(*) FROM {rejected} WHERE queue = %(queue)s"

_PEEK = """\
(SELECT body, priority, attempts, available_at, 0 AS kind, id FROM {table}
 WHERE queue = %(queue)s AND available_at <= now()
   AND (lease_until IS NULL OR lease_until < now()) AND deliveries < %(max_deliveries)s
 ORDER BY priority DESC, available_at, id LIMIT %(window)s)
UNION ALL
(SELECT body, priority, attempts, available_at, 1, id FROM {scheduled}
 WHERE queue = %(queue)s AND available_at <= now()
 ORDER BY priority DESC, available_at, id LIMIT %(window)s)
ORDER BY priority DESC, available_at, kind, id LIMIT %(limit)s OFFSET %(offset)s"""
# The ready messages in the claim's order (see _CLAIM): the rows of the table
# available now (not those a claim would set aside as poison), and the delayed
# ones due and not yet moved in, which promotion stores with later ids. Each side
# walks its index for the first *window* (offset + limit) rows at most.

_PEEK_SCHEDULED = """\
SELECT body, priority, attempts, extract(epoch FROM available_at)::float8 FROM {scheduled}
WHERE queue = %(queue)s AND available_at > now()
ORDER BY available_at, id LIMIT %(limit)s OFFSET %(offset)s"""

_FIND = """\
SELECT body, priority, attempts, NULL::float8,
       CASE WHEN leased_by IS NOT NULL AND lease_until >= now() THEN 'leased'
            ELSE 'waiting' END
FROM {table} WHERE queue = %(queue)s AND left(body, %(length)s) = %(prefix)s
UNION ALL
SELECT body, priority, attempts, extract(epoch FROM available_at)::float8,
       CASE WHEN available_at > now() THEN 'scheduled' ELSE 'waiting' END
FROM {scheduled} WHERE queue = %(queue)s AND left(body, %(length)s) = %(prefix)s"""
# One search: a scan of the queue's rows (no index serves it, and none is added:
# every enqueue would pay for it).

_EXPIRED_ENGINES = """\
DELETE FROM {engines} WHERE queue = %(queue)s AND engine_id = ANY(ARRAY(
    SELECT engine_id FROM {engines}
    WHERE queue = %(queue)s AND expires_at <= now() AND engine_id <> %(engine_id)s
    FOR UPDATE SKIP LOCKED))"""
# The expired records, but not the one being announced (one statement must not
# modify a row twice) and none that another statement holds: never a wait.

_ANNOUNCE = """\
WITH expired AS (""" + _EXPIRED_ENGINES + """)
INSERT INTO {engines} (queue, engine_id, record, expires_at)
VALUES (%(queue)s, %(engine_id)s, %(record)s::json,
        now() + make_interval(secs => %(ttl)s::float8))
ON CONFLICT (queue, engine_id) DO UPDATE SET
    record = excluded.record, expires_at = excluded.expires_at"""

_ENGINES = """\
SELECT record::text FROM {engines} WHERE queue = %(queue)s AND expires_at > now()
ORDER BY engine_id COLLATE "C"
"""
# Only a read (announce deletes the expired rows), so it runs on a read-only
# replica or role: "expires_at > now()" leaves out what is not deleted yet.
# COLLATE "C": by code point, as Python sorts.

_FORGET_ENGINE = "DELETE FROM {engines} WHERE queue = %(queue)s AND engine_id = %(engine_id)s"

_ADD_OUTCOMES = """\
WITH old AS (
    DELETE FROM {outcomes} WHERE queue = %(queue)s AND (minute, outcome) IN (
        SELECT minute, outcome FROM {outcomes}
        WHERE queue = %(queue)s AND minute < least(%(minute)s::bigint,
                                                   extract(epoch FROM now())::bigint - %(kept)s)
        FOR UPDATE SKIP LOCKED)
)
INSERT INTO {outcomes} AS bucket (queue, minute, outcome, count)
SELECT %(queue)s, %(minute)s, outcome, count
FROM unnest(%(outcomes)s::text[], %(counts)s::bigint[]) AS counted (outcome, count)
ON CONFLICT (queue, minute, outcome) DO UPDATE SET count = bucket.count + excluded.count"""
# The minute counted into is never among those deleted (one statement must not
# modify a row twice). Engines adding to one minute take its rows in one order
# (OUTCOMES'), so they wait for each other at most, never deadlock.

_OUTCOMES = """\
SELECT minute, outcome, count FROM {outcomes}
WHERE queue = %(queue)s AND minute >= %(since)s::float8 ORDER BY minute, outcome"""

_EXISTING = """\
SELECT to_regclass(%(table)s) IS NOT NULL AND to_regclass(%(rejected)s) IS NOT NULL
   AND to_regclass(%(ready_index)s) IS NOT NULL AND to_regclass(%(leased_index)s) IS NOT NULL
   AND to_regclass(%(scheduled)s) IS NOT NULL AND to_regclass(%(scheduled_index)s) IS NOT NULL
   AND to_regclass(%(fired)s) IS NOT NULL AND to_regclass(%(old_index)s) IS NULL
   AND to_regclass(%(failed)s) IS NOT NULL AND to_regclass(%(failed_index)s) IS NOT NULL
   AND to_regclass(%(results)s) IS NOT NULL AND to_regclass(%(results_index)s) IS NOT NULL
   AND to_regclass(%(engines)s) IS NOT NULL AND to_regclass(%(outcomes)s) IS NOT NULL
   AND (SELECT count(*) = 6 FROM pg_attribute
        WHERE attrelid IN (to_regclass(%(table)s), to_regclass(%(scheduled)s))
          AND attname IN ('attempts', 'first_failed_at', 'result_ttl') AND NOT attisdropped)"""
# Tables made before retries lack two columns of the message tables, and those
# made before results a third (result_ttl) and <table>_results: the schema's
# ALTER TABLE ... ADD COLUMN IF NOT EXISTS adds them (instantly: a constant
# default, or none, rewrites no rows).

_RETRY = """\
WITH settled AS (
    DELETE FROM {table} WHERE id = %(id)s AND leased_by = %(consumer)s
    RETURNING queue, priority, attempts + 1 AS attempts,
              coalesce(first_failed_at, to_timestamp(%(failed_at)s::float8)) AS first_failed_at,
              now() + make_interval(secs => %(delay)s::float8) AS at, result_ttl
), ready AS (
    INSERT INTO {table} (queue, body, priority, attempts, first_failed_at, result_ttl)
    SELECT queue, %(body)s, priority, attempts, first_failed_at, result_ttl FROM settled
    WHERE at <= now()
), later AS (
    INSERT INTO {scheduled} (queue, body, priority, available_at, attempts, first_failed_at,
                             result_ttl)
    SELECT queue, %(body)s, priority, at, attempts, first_failed_at, result_ttl FROM settled
    WHERE at > now()
)
SELECT pg_notify(%(channel)s, '') FROM settled"""
# One statement: the leased row goes and the retried one comes in the same
# transaction, so a crash leaves one or the other. Only a row still leased to
# this consumer: if its lease ran out and another engine took the message, that
# engine runs it (with the count it had) and nothing is stored here. The
# notification, like schedule()'s, makes waiting dequeues look at the earliest
# delayed message again.

_FAIL = """\
WITH settled AS (
    DELETE FROM {table} WHERE id = %(id)s AND leased_by = %(consumer)s
    RETURNING priority, first_failed_at
)
INSERT INTO {failed} (queue, task_id, body, task, attempts, error_type, error, traceback,
                      first_failed_at, last_failed_at, priority, expires_at)
SELECT %(queue)s, %(task_id)s, %(body)s, %(task)s, %(attempts)s, %(error_type)s, %(error)s,
       %(traceback)s, coalesce(first_failed_at, to_timestamp(%(last_failed_at)s::float8)),
       to_timestamp(%(last_failed_at)s::float8), priority, to_timestamp(%(expires_at)s::float8)
FROM settled
ON CONFLICT (queue, task_id) DO UPDATE SET
    body = excluded.body, task = excluded.task, attempts = excluded.attempts,
    error_type = excluded.error_type, error = excluded.error, traceback = excluded.traceback,
    first_failed_at = excluded.first_failed_at, last_failed_at = excluded.last_failed_at,
    priority = excluded.priority, expires_at = excluded.expires_at"""

_TRIM = """\
WITH gone AS (
    DELETE FROM {failed}
    WHERE queue = %(queue)s AND (expires_at <= now() OR task_id = ANY(ARRAY(
        SELECT task_id FROM {failed} WHERE queue = %(queue)s AND expires_at > now()
        ORDER BY last_failed_at DESC, task_id DESC OFFSET %(keep)s)))
    RETURNING 1
)
SELECT count(*) FROM gone"""
# fail() runs _FAIL and then _TRIM in one transaction, under an advisory lock
# on the failed store of this queue: two engines failing at once would each
# trim seeing only its own new entry (under READ COMMITTED), and leave more
# than *keep*.

_FAILED_COLUMNS = """\
task_id, body, task, attempts, error_type, error, traceback,
extract(epoch FROM first_failed_at)::float8, extract(epoch FROM last_failed_at)::float8,
priority, extract(epoch FROM expires_at)::float8"""

_FAILED = """\
SELECT """ + _FAILED_COLUMNS + """ FROM {failed}
WHERE queue = %(queue)s AND expires_at > now()
ORDER BY last_failed_at DESC, task_id DESC LIMIT %(limit)s OFFSET %(offset)s"""

_FIND_FAILED = """\
SELECT """ + _FAILED_COLUMNS + """ FROM {failed}
WHERE queue = %(queue)s AND task_id = %(task_id)s AND expires_at > now()"""

_FAILED_COUNT = "SELECT count(*) FROM {failed} WHERE queue = %(queue)s AND expires_at > now()"

_RETRY_FAILED = """\
WITH entries AS (
    DELETE FROM {failed}
    WHERE queue = %(queue)s AND {which} AND expires_at > now()
    RETURNING body, priority, last_failed_at, task_id
), stored AS (
    INSERT INTO {table} (queue, body, priority)
    SELECT %(queue)s, body, priority FROM entries ORDER BY last_failed_at, task_id
    RETURNING 1
)
SELECT count(*), pg_notify(%(channel)s, '') FROM stored"""
# One statement: an entry is in the failed store or in the queue, whenever a
# process or the server dies. Its body is the message [task_id, task, *args]
# as fail() stored it; the new row starts with attempts 0. {which} picks one
# entry (retry_failed) or every one (retry_failed_all, oldest failure first).

_DELETE_FAILED = """\
WITH gone AS (
    DELETE FROM {failed} WHERE queue = %(queue)s AND {which}
    RETURNING expires_at > now() AS live
)
SELECT count(*) FILTER (WHERE live) FROM gone"""
# Expired entries go too, uncounted: to whoever asks, they were gone already.

_ONE = "task_id = %(task_id)s"
_EVERY = "true"

_STORE_RESULT = """\
WITH kept AS MATERIALIZED (
    SELECT now() + make_interval(secs => %(ttl)s::float8) AS expires_at
), swept AS (
    DELETE FROM {results}
    WHERE queue = %(queue)s AND task_id = ANY(ARRAY(
        SELECT task_id FROM {results}
        WHERE queue = %(queue)s AND expires_at <= now() AND task_id <> %(task_id)s
        ORDER BY expires_at FOR UPDATE SKIP LOCKED LIMIT %(sweep)s))
), stored AS (
    INSERT INTO {results} (queue, task_id, record, expires_at)
    SELECT %(queue)s, %(task_id)s,
           (%(head)s || round(extract(epoch FROM expires_at)::numeric, 6)::text || '}}')::json,
           expires_at
    FROM kept
    ON CONFLICT (queue, task_id) DO UPDATE SET
        record = excluded.record, expires_at = excluded.expires_at
    RETURNING json_build_array(task_id, record)::text AS note
)
SELECT pg_notify(%(channel)s, CASE
    WHEN octet_length(note) < 8000 THEN note
    WHEN octet_length(%(task_id)s) < 7990 THEN json_build_array(%(task_id)s::text)::text
    ELSE '[]' END)
FROM stored"""
# One statement, so one transaction: the record (replacing an earlier one of
# the id) and its notification commit together, and a reader sees the old
# record or the new one, never half of either. The notification is sent at the
# commit, when the record is there to be read: a waiter woken by it finds it.
# expires_at is the database's clock, written into the JSON as text by the
# same statement (*head* is the record's JSON without its closing brace, then
# a comma when it has keys, then "expires_at": ; '}}' is one brace once the
# statement is rendered), with six decimals, so it reads back as a float and equals the
# column to the microsecond.
#
# The notification's payload (under 8000 bytes, PostgreSQL's limit) is the
# JSON array [task_id, record] -- the record as stored, so a waiter woken by it
# needs no SELECT -- or [task_id] when the record does not fit (the waiter
# reads it), or [] when even that does not (every waiter of the queue looks).
#
# The sweep: up to *sweep* expired rows of this queue go, oldest first, down
# the (queue, expires_at) index; SKIP LOCKED, so it never waits for a row
# another store holds. It leaves the row stored here alone: one statement
# must not modify a row twice.

_STORE_RESULT_ACK = ("WITH acked AS (\n    DELETE FROM {table} WHERE id = %(id)s\n), "
                     + _STORE_RESULT.removeprefix("WITH "))
# store_result and the ack of the message that produced it, in one statement:
# one round trip, one commit, both or neither. The DELETE keeps the server's
# synchronous_commit (not _NO_FLUSH_WAIT): it commits with the result, which
# must survive a PostgreSQL crash once a waiter may have read it.

_RESULT = """\
SELECT record::text FROM {results}
WHERE queue = %(queue)s AND task_id = %(task_id)s AND expires_at > now()"""
# An expired row is never returned, swept or not: expiry is the database's clock.


def _names(table: str) -> dict[str, str]:
    return {"table": table, "rejected": f"{table}_rejected",
            "ready_index": f"{table}_ready", "old_index": f"{table}_dequeue",
            "leased_index": f"{table}_leased", "scheduled": f"{table}_scheduled",
            "scheduled_index": f"{table}_scheduled_due", "fired": f"{table}_fired",
            "failed": f"{table}_failed", "failed_index": f"{table}_failed_latest",
            "results": f"{table}_results", "results_index": f"{table}_results_expiry",
            "engines": f"{table}_engines", "outcomes": f"{table}_outcomes"}


def _listed(body: str) -> Any:
    """A stored body as inspection lists it: the message, or the body raw (as ``dequeue``
    hands it out)."""
    message = protocol.decode(body)
    return _Raw(body) if message is body else message


def _positive(action: str, argument: str, value: object) -> float:
    """*value* as a number of seconds > 0 (finite); ValueError naming *action*, *argument*."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not 0 < value < math.inf:
        raise ValueError(f"PostgresQueue.{action}: {argument} must be a number of seconds > 0, "
                         f"not {value!r}")
    return float(value)


def _check_table(table: object) -> str:
    if not isinstance(table, str) or not _TABLE.match(table):
        raise ConfigurationError(
            f"PostgresQueue: table must be a plain lowercase identifier (a letter or _, "
            f"then letters, digits or _, at most 48 characters), not {table!r}")
    return table


def schema_sql(table: str = "tempest_messages") -> str:
    """The SQL that creates *table*, the tables beside it and their indexes (idempotent).

    Beside it: ``_rejected``, ``_scheduled``, ``_fired``, ``_failed``,
    ``_results``, ``_engines`` and ``_outcomes``; tables made by an older version
    gain the columns they lack. For a migration, or a DBA's ``psql``;
    PostgresQueue runs the same statements itself on first use when anything
    is missing.
    """
    names = _names(_check_table(table))
    return _SCHEMA.format(**{key: f'"{name}"' for key, name in names.items()})


class _Raw(str):
    """A stored body that is not a message, handed to the engine as it was stored.

    A fresh object each time (``str`` caches short strings): the queue finds
    the row again by the identity of what ``dequeue`` returned.
    """

    __slots__ = ()


class _Ack:
    """One ack, waiting for the DELETE that takes its row (see ``PostgresQueue.ack``).

    ``done``, ``error`` and ``lead`` change under the queue's ``_acks`` lock.
    ``wake`` is released once: when the ack is done, or handed the duty to
    send the next DELETE -- a C lock per waiter, so a commit wakes exactly
    the threads it concerns.
    """

    __slots__ = ("done", "error", "lead", "row", "wake")

    def __init__(self, row: int) -> None:
        self.row = row
        self.done = False  # settled: committed, or failed with error
        self.error: BaseException | None = None
        self.lead = False  # handed the duty to send the next DELETE
        self.wake = threading.Lock()
        self.wake.acquire()


def _shared_failure(error: BaseException) -> BaseException:
    """What an ack raises when the DELETE that took it failed in another thread.

    A new exception (one object raised in several threads would mix their
    tracebacks), of the driver's class where it can be, chained to *error*.
    """
    text = f"the statement deleting this message failed: {type(error).__name__}: {error}"
    twin: BaseException
    try:
        twin = type(error)(text) if isinstance(error, psycopg.Error) else \
            psycopg.OperationalError(text)
    except Exception:  # noqa: BLE001 - a class that takes other arguments
        twin = psycopg.OperationalError(text)
    twin.__cause__ = error
    return twin


def _wait_readable(conn: psycopg.Connection[Any], timeout: float) -> None:
    """Sleep until *conn*'s socket has input (a notification) or *timeout* passes.

    The next ``notifies(timeout=0)`` reads what came. Not ``notifies(timeout=)``
    itself: psycopg's wait rounds its last interval down to whole milliseconds
    and spins through the final one, a millisecond of CPU per wait -- most of
    what an idle engine would cost.
    """
    if timeout > 0:
        with selectors.DefaultSelector() as selector:
            selector.register(conn.fileno(), selectors.EVENT_READ)
            selector.select(timeout)


class _Kept:
    """A connection left LISTENing between two waits of the same queue object."""

    __slots__ = ("claimed_at", "conn", "generation", "hold", "used_at")

    def __init__(self, conn: psycopg.Connection[Any], generation: int,
                 claimed_at: float | None, hold: float) -> None:
        self.conn = conn
        self.generation = generation
        # The last claim made while it listened; None: the next wait claims at once.
        self.claimed_at = claimed_at
        self.hold = hold  # seconds it may go unused: _KEEP after an empty wait, else _HANDOFF
        self.used_at = time.monotonic()


class _Waiter:
    """One waiting ``result()``: the event its listener sets, and the record the
    notification carried (None: it carried none, the waiter reads the row)."""

    __slots__ = ("event", "record")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.record: dict[str, Any] | None = None


def _noted(payload: str) -> tuple[str | None, dict[str, Any] | None]:
    """(task id, record) of a result notification's *payload* (see _STORE_RESULT).

    The id is None for ``[]`` (every waiter looks); the record is None when the
    payload carries none. A payload that is no such array is a bare task id.
    """
    if payload.startswith("["):
        try:
            note = json.loads(payload)
        except ValueError:
            note = None
        if note == []:
            return None, None
        if isinstance(note, list) and len(note) <= 2 and isinstance(note[0], str):
            record = note[1] if len(note) == 2 else None
            return note[0], record if isinstance(record, dict) else None
    return payload, None


class _ResultListener:
    """A connection LISTENing for one queue object's results, read by a thread of its own.

    Every waiting ``result()`` of the queue object registers a waiter under its
    task id (``add``) before it looks at the table; the thread reads each
    notification (the task id stored and, where it fits, the record) and wakes
    every waiter of that id, handing it the record, so any number of threads
    wait on one connection. Once no call has
    waited for ``_KEEP`` seconds, or at ``stop()`` (the queue's ``close()``),
    or when the connection fails, the thread closes the connection and ends;
    then ``alive`` is False and every waiter still registered is woken, so it
    looks again and listens on a new listener: no wake-up is lost.
    """

    def __init__(self, conn: psycopg.Connection[Any], name: str) -> None:
        self.conn = conn
        self.alive = True  # False once the thread ended or is ending: add() refuses
        self.lock = threading.Lock()  # guards alive, waiters, idle_since, stopping
        self.waiters: dict[str, set[_Waiter]] = {}
        self.idle_since = time.monotonic()
        self.stopping = False
        self._bell, self._ringer = socket.socketpair()  # stop() wakes the thread's select
        self._bell.setblocking(False)
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name=f"tempest-postgres-results:{name}")

    def add(self, task_id: str, waiter: _Waiter) -> bool:
        """Wake *waiter* on the next notification of *task_id*; False if this listener ended."""
        with self.lock:
            if not self.alive:
                return False
            self.waiters.setdefault(task_id, set()).add(waiter)
            return True

    def remove(self, task_id: str, waiter: _Waiter) -> None:
        """Forget *waiter* (a wait that ends)."""
        with self.lock:
            waiters = self.waiters.get(task_id)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self.waiters[task_id]
            if not self.waiters:
                self.idle_since = time.monotonic()

    def _everyone(self) -> list[_Waiter]:
        """Every registered waiter, of every id; the caller holds ``lock``."""
        return [waiter for waiters in self.waiters.values() for waiter in waiters]

    def stop(self) -> None:
        """End the thread, which closes the connection (no round trip: closing ends the LISTEN)."""
        with self.lock:
            self.stopping = True
        try:
            self._ringer.send(b"\0")
        except OSError:  # the thread ended and closed it already
            pass

    def _run(self) -> None:
        conn = self.conn
        selector = selectors.DefaultSelector()
        try:
            selector.register(conn.fileno(), selectors.EVENT_READ)
            selector.register(self._bell, selectors.EVENT_READ)
            while True:
                # What arrived (those read with the LISTEN's reply too), then sleep
                # until more comes. A notification read here wakes its waiters with
                # the record it carries: one stored before a waiter registered is
                # a record of its id all the same (the one its look would find, or
                # an earlier run's, which a rerun replaces -- see "Where a result
                # can be lost or seen twice").
                woken = [_noted(notice.payload) for notice in conn.notifies(timeout=0)]
                ring: list[tuple[_Waiter, dict[str, Any] | None]] = []
                with self.lock:
                    for task_id, record in woken:
                        if task_id is None:  # too long to say: every waiter looks
                            ring.extend((waiter, None) for waiter in self._everyone())
                        else:
                            ring.extend((waiter, record)
                                        for waiter in self.waiters.get(task_id, ()))
                    idle = 0.0 if self.waiters else time.monotonic() - self.idle_since
                    if self.stopping or idle >= _KEEP:
                        self.alive = False  # under the lock: no add() after this succeeds
                        return
                for waiter, record in ring:
                    if record is not None:
                        waiter.record = record  # before the event: the waiter reads it after
                    waiter.event.set()
                selector.select(_KEEP - idle)
                try:
                    while self._bell.recv(64):
                        pass
                except BlockingIOError:
                    pass
        except (psycopg.Error, OSError):
            pass  # the connection is gone: the waiters look again and listen anew (finally)
        finally:
            with self.lock:
                self.alive = False
                left = self._everyone()
                self.waiters = {}
            for waiter in left:
                waiter.event.set()
            selector.close()
            conn.close()
            self._bell.close()
            self._ringer.close()


class PostgresQueue:
    """A durable queue in a PostgreSQL table, shared by many engines on many machines.

    ``dsn`` is a libpq connection string (``postgresql://user@host/db`` or
    ``"host=... dbname=..."``); ``table`` names the table (created on first
    use, see :func:`schema_sql`), and ``name`` the queue within it, so one
    table can hold several queues. Delivery is **at-least-once**: a message
    stays in the table, leased to the engine that dequeued it, until that
    engine acks it (its outcome is final: success, failure or timeout).

    Leases
        A dequeued message is leased for ``lease`` seconds (default 30),
        renewed by ``heartbeat()`` every ``heartbeat_interval`` seconds
        (default a third of the lease). When an engine dies (``kill -9``, a
        lost machine), its leases run out and another engine takes its
        messages: a message runs again only then. Lease times use the
        database's clock, so engines on machines with skewed clocks agree.
    Poison
        A message delivered more than ``max_deliveries`` times (default 5)
        without an outcome, which keeps killing its engines, is moved to the
        ``<table>_rejected`` table with the reason ``TooManyDeliveries``
        instead of being handed out again.
    Waiting
        ``dequeue(timeout=...)`` LISTENs for the ``pg_notify`` that every
        ``enqueue`` sends in its transaction: an idle engine wakes the moment
        work arrives, without polling. A lease that ran out sends no
        notification, so a waiting dequeue also claims once a second. The
        listening connection stays LISTENing from one empty wait to the next,
        so an idle engine costs the server one claim a second. It stops
        listening as soon as a wait finds work; once waits stop coming (the
        engine stopped), a thread of the queue object's closes it after 5 s,
        and so does ``close()``.
    Many engines
        Each dequeue claims the oldest available row with ``FOR UPDATE SKIP
        LOCKED``: engines never block each other and never take the same row.
    Batches
        ``dequeue_many(n, timeout=...)`` waits like ``dequeue`` for a first
        message, then claims up to *n* of the oldest available rows in the
        same statement (the engine asks for one per worker free right now).
        Each is leased, renewed, counted and settled on its own. Acks from
        several threads share a ``DELETE``: those that arrive while one is in
        flight go together in the next, and each returns once its row is gone.
    Retries and the failed store
        ``retry()`` replaces the leased row with the message to run again,
        ``attempts`` one higher, in one statement: a crash leaves one or the
        other, and a crash never counts as an attempt (a redelivered or
        requeued row keeps its count). ``fail()`` moves the message into
        ``<table>_failed``, shared by every engine on the queue, and trims it
        to ``keep`` entries and ``ttl`` seconds in the same transaction.
        ``retry_failed()`` moves an entry back, ready now, attempts 0, in one
        statement. A message whose lease ran out and that another engine took
        meanwhile is left to that engine: ``retry`` and ``fail`` store nothing.
    Results
        ``schedule(m, result_ttl=)`` stores the ttl in the message's row (and
        ``result_ttl(m)`` reads it from the lease); ``store_result()`` upserts
        ``<table>_results`` and notifies in one statement; ``result()`` waits
        on a listener that every waiting thread of the queue object shares
        (one connection, a thread reading it), woken by that notification.
    Engines and inspection
        ``announce()``, ``engines()``, ``forget_engine()``, ``add_outcomes()``,
        ``outcomes()`` keep engine records and outcome counts in
        ``<table>_engines`` and ``<table>_outcomes``, expired rows deleted by
        the writers' statements; ``engines()``, ``outcomes()``, ``peek()``,
        ``peek_scheduled()``, ``rejected(limit, offset)``, ``rejected_count()``
        and ``find()`` only read (see "Engines, outcomes and inspection" in the
        module docstring).

    Connections are opened lazily and kept in a small pool that every method
    borrows from for one statement, so any number of threads may share the
    queue: workers ack while the engine's leader waits for a message. (One
    connection per thread would cost an engine of 50 threads 50 connections,
    and leak those of threads that end; one connection behind a lock would
    make every ack wait behind a dequeue that waits for work.) At most four
    connections run statements at once, plus one per waiting ``dequeue``,
    which LISTENs on a connection of its own, and one shared by every
    waiting ``result()``. A connection error (a restart,
    a failover, a terminated backend) propagates as
    ``psycopg.OperationalError`` -- the engine logs it and retries with a
    backoff -- and the queue discards its pooled connections, so the next
    call reconnects. Unless the DSN sets them, connections get
    ``connect_timeout=10`` and an ``application_name`` naming this consumer
    (see :attr:`consumer`). Fork-safe: a child process opens its own.
    """

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

    consumer: str
    """Who holds this queue object's leases: ``host:pid:random``, stored in
    ``leased_by`` and shown as ``application_name`` in ``pg_stat_activity``."""

    def __init__(self, dsn: str, table: str = "tempest_messages", *,
                 name: str = "tempest", lease: float = protocol.DEFAULT_LEASE,
                 max_deliveries: int = protocol.DEFAULT_MAX_DELIVERIES,
                 heartbeat_interval: float | None = None) -> None:
        if _DRIVER_MISSING:
            raise ConfigurationError(
                "PostgresQueue needs the psycopg driver: pip install 'task-tempest[postgres]'")
        if tuple(int(part) for part in re.findall(r"\d+", psycopg.__version__)[:2]) < (3, 2):
            raise ConfigurationError(
                f"PostgresQueue needs psycopg 3.2 or newer, not {psycopg.__version__}: "
                f"pip install -U 'task-tempest[postgres]'")
        self.table = _check_table(table)
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"PostgresQueue: name must be a non-empty str, not {name!r}")
        self.name = name
        self.lease, self.heartbeat_interval, self.max_deliveries = protocol.lease_options(
            "PostgresQueue", lease, heartbeat_interval, max_deliveries)
        if not isinstance(dsn, str):
            raise ConfigurationError(f"PostgresQueue: dsn must be a str, not {type(dsn).__name__}")
        try:
            given = psycopg.conninfo.conninfo_to_dict(dsn)
        except psycopg.ProgrammingError as exc:
            # libpq's message names the faulty part; the DSN itself may hold a password.
            raise ConfigurationError(f"PostgresQueue: the dsn cannot be parsed: {exc}") from None
        self._dsn = dsn
        self._connect_timeout = "connect_timeout" not in given
        self._application_name = "application_name" not in given

        channel = f"{table}:{name}"
        if len(channel.encode()) > _MAX_IDENTIFIER:
            channel = "tempest:" + hashlib.sha1(f"{table}\0{name}".encode()).hexdigest()
        self._channel = channel
        names = _names(self.table)
        ids = {key: sql.Identifier(value) for key, value in names.items()}

        def render(text: str) -> bytes:
            # Rendered once: table names are fixed per queue.
            return sql.SQL(text).format(**ids, no_flush_wait=sql.SQL(_NO_FLUSH_WAIT)).as_bytes(None)

        self._sql = {key: render(text) for key, text in (
            ("claim", _CLAIM), ("move", _MOVE), ("enqueue", _ENQUEUE),
            ("requeue", _REQUEUE), ("ack", _ACK), ("ack_claim", _ACK_CLAIM),
            ("heartbeat", _HEARTBEAT),
            ("waiting", _WAITING), ("rejected", _REJECTED), ("promote", _PROMOTE),
            ("schedule", _SCHEDULE), ("fire", _FIRE), ("last_fired", _LAST_FIRED),
            ("scheduled", _SCHEDULED), ("retry", _RETRY), ("fail", _FAIL), ("trim", _TRIM),
            ("failed", _FAILED), ("find_failed", _FIND_FAILED),
            ("failed_count", _FAILED_COUNT),
            ("retry_failed", _RETRY_FAILED.replace("{which}", _ONE)),
            ("retry_failed_all", _RETRY_FAILED.replace("{which}", _EVERY)),
            ("delete_failed", _DELETE_FAILED.replace("{which}", _ONE)),
            ("purge_failed", _DELETE_FAILED.replace("{which}", _EVERY)),
            ("store_result", _STORE_RESULT), ("store_result_ack", _STORE_RESULT_ACK),
            ("result", _RESULT),
            ("rejected_count", _REJECTED_COUNT), ("peek", _PEEK),
            ("peek_scheduled", _PEEK_SCHEDULED), ("find", _FIND), ("announce", _ANNOUNCE),
            ("engines", _ENGINES), ("forget_engine", _FORGET_ENGINE),
            ("add_outcomes", _ADD_OUTCOMES), ("outcomes", _OUTCOMES))}
        self._sql["listen"] = sql.SQL("LISTEN {}").format(sql.Identifier(channel)).as_bytes(None)
        # Results have a channel of their own, so that a store never wakes a waiting
        # dequeue (a claim for nothing), nor an enqueue a waiting result(). "/" is in
        # no table name, so it is no queue's dequeue channel.
        result_channel = f"{table}/results:{name}"
        if len(result_channel.encode()) > _MAX_IDENTIFIER:
            result_channel = "tempest/results:" + hashlib.sha1(
                f"{table}\0{name}".encode()).hexdigest()
        self._result_channel = result_channel
        self._sql["listen_results"] = sql.SQL("LISTEN {}").format(
            sql.Identifier(result_channel)).as_bytes(None)
        self._sql["unlisten"] = sql.SQL("UNLISTEN {}").format(
            sql.Identifier(channel)).as_bytes(None)
        self._names = names
        # Serialises fail() across engines on this queue's failed store (see _TRIM).
        self._failed_lock_key = int.from_bytes(
            hashlib.sha1(f"tempest:{table}:failed\0{name}".encode()).digest()[:8],
            "big", signed=True)

        self._pool_lock = threading.Lock()
        self._idle: list[tuple[psycopg.Connection[Any], int]] = []
        self._generation = 0  # bumped to discard every connection made before
        self._schema_lock = threading.Lock()
        self._schema_ready = False
        self._new_identity()

    def _new_identity(self) -> None:
        self._forks = protocol.forks()
        self._work_slots = threading.BoundedSemaphore(_WORK_CONNECTIONS)
        self.consumer = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._leases = protocol.Leases()
        self._next_due: float | None = None  # monotonic time the earliest delayed one is due
        # Grouped acks (see ack): tickets waiting for the next DELETE, and whether
        # a thread has the duty to send it (one DELETE in flight at a time).
        self._acks = threading.Lock()
        self._pending: list[_Ack] = []
        self._acking = False
        # The listener kept between waits (see _wait): _kept changes under _pool_lock;
        # _listening lets one waiter at a time use it; the reaper thread ends its
        # LISTEN once waits stop coming (_reap), woken by _reaper_bell.
        self._listening = threading.Lock()
        self._kept: _Kept | None = None
        self._reaper: threading.Thread | None = None
        self._reaper_bell = threading.Condition(self._pool_lock)
        # Waiting result() calls share one listener (see _ResultListener): the
        # current one changes under _pool_lock; _result_connecting lets one thread
        # at a time open a new one (the others wait for it, then use it).
        self._result_listener: _ResultListener | None = None
        self._result_connecting = threading.Lock()

    # -- the queue protocol ---------------------------------------------------------

    def enqueue(self, message: Any) -> None:
        """Store *message* (as JSON) and wake the engines waiting for one."""
        body = protocol.encode(message)
        with self._connection() as conn:
            conn.execute(self._sql["enqueue"], {"queue": self.name, "body": body,
                                                "channel": self._channel})

    def schedule(self, message: Any, *, delay: float | None = None, at: float | None = None,
                 priority: int = 0, result_ttl: float | None = None) -> None:
        """Store *message* to become ready after *delay* seconds or at POSIX time *at*.

        Times are the database's clock (``now()``); a time that has come
        already means now. Among ready messages, higher *priority* first.
        Wakes the engines waiting for a message. *result_ttl* (seconds > 0)
        asks for the message's result, kept that long: stored in the row's
        ``result_ttl`` column by the same statement, read back by
        ``result_ttl(m)``.
        """
        body = protocol.encode(message)
        ttl = None if result_ttl is None else _positive("schedule", "result_ttl", result_ttl)
        with self._connection() as conn:
            conn.execute(self._sql["schedule"], {
                "queue": self.name, "body": body, "priority": priority, "at": at,
                "delay": delay, "result_ttl": ttl, "channel": self._channel})

    def scheduled_count(self) -> int:
        """Messages waiting for their time."""
        with self._connection() as conn:
            row = conn.execute(self._sql["scheduled"], {"queue": self.name}).fetchone()
        return int(row[0]) if row else 0

    def fire(self, schedule: str, slot: float, message: Any, *, priority: int = 0,
             keep: float) -> bool:
        """Store *message* for time *slot* unless that slot of *schedule* fired already.

        One statement records the slot in ``<table>_fired`` and stores the
        message; False, storing nothing, if the slot is recorded already.
        Slots recorded more than *keep* seconds ago are forgotten.
        """
        body = protocol.encode(message)
        with self._connection() as conn:
            row = conn.execute(self._sql["fire"], {
                "queue": self.name, "schedule": schedule, "slot": float(slot), "keep": keep,
                "body": body, "priority": priority, "channel": self._channel}).fetchone()
        return bool(row and row[0])

    def last_fired(self, schedule: str) -> float | None:
        """The latest slot of *schedule* still remembered, or None."""
        with self._connection() as conn:
            row = conn.execute(self._sql["last_fired"],
                               {"queue": self.name, "schedule": schedule}).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def dequeue(self, timeout: float | None = None) -> Any:
        """Lease the next message; wait up to *timeout* seconds for one; None if none.

        What the queue cannot decode is returned raw (a str), for the engine
        to reject.
        """
        messages = self.dequeue_many(1, timeout)
        return messages[0] if messages else None

    def dequeue_many(self, count: int, timeout: float | None = None) -> list[Any]:
        """Lease up to *count* messages, oldest first; wait up to *timeout* seconds for the first.

        Waits only while none is available: then takes, in the same statement,
        whatever else is available right now, up to *count*. An empty list when
        none came within *timeout* (or *count* is 0). Each message is leased,
        renewed, counted and settled on its own, exactly like one from
        ``dequeue``.
        """
        count = operator.index(count)
        if count <= 0:
            return []
        if timeout is None or timeout <= 0:
            return self._claim(count)
        deadline = time.monotonic() + timeout
        self._check_fork()
        # One waiter at a time may keep its listener for the next wait; any
        # other waits as before, on a listener of its own for this wait only.
        if not self._listening.acquire(blocking=False):
            return self._wait(count, deadline, keep=False)
        try:
            return self._wait(count, deadline, keep=True)
        finally:
            self._listening.release()

    def ack(self, message: Any) -> None:
        """The message's outcome is final: delete it. Returns once the DELETE is committed.

        Acks from several threads share round trips: while one thread's DELETE
        is in flight, the acks that arrive wait, and the next DELETE -- sent
        by the oldest of them -- takes all their rows in one statement. So a
        lone ack costs one round trip as before, and eight threads acking at
        once cost about two. An ack whose DELETE failed raises (the message
        returns after its lease, as when a lone DELETE fails).
        """
        # Forgotten first: if the delete fails, heartbeats stop renewing the
        # lease and the message runs again once it expires (never lost).
        ticket = _Ack(self._settle(message, "ack")[0])
        with self._acks:
            self._pending.append(ticket)
            lead = not self._acking
            self._acking = True
        if not lead:
            try:
                ticket.wake.acquire()  # done by another thread's DELETE, or handed the duty
            except BaseException:  # an exception injected while waiting
                with self._acks:
                    if not ticket.done and ticket in self._pending:
                        self._pending.remove(ticket)  # its lease brings the message back
                    if ticket.lead:  # the duty must not leave with this thread
                        ticket.lead = False
                        self._hand_over()
                raise
            if ticket.done:
                if ticket.error is not None:
                    raise _shared_failure(ticket.error)
                return
        self._delete_acked(ticket)

    def ack_and_dequeue(self, messages: list[Any], count: int) -> list[Any]:
        """``ack`` every message of *messages*, then ``dequeue_many(count)`` without
        waiting, in one statement (*count* 0: the DELETE alone).

        The engine calls it as a worker that has just finished a message takes
        its next ones, with the acks other workers handed it meanwhile: one
        round trip and one commit instead of several. The DELETE and the claim
        commit together, or neither does. A lost connection is followed by the
        DELETE alone on a new one (and no message); if that fails too it
        raises: the messages were not acked, and their leases bring them
        back, as when ``ack`` raises.
        """
        count = operator.index(count)
        messages = protocol.settling("PostgresQueue.ack_and_dequeue", messages)
        rows: list[int] = []
        try:
            for message in messages:
                rows.append(self._settle(message, "ack")[0])
        except BaseException:  # a message it does not hold: the ones before it are acked
            if rows:
                self._delete(rows)
            raise
        if count < 1:
            self._delete(rows)
            return []
        try:
            return self._claim(count, acked=rows)
        except psycopg.OperationalError:
            # The connection went (a restart, pg_terminate_backend): the statement
            # was rolled back, or committed with its reply lost (then what it
            # leased comes back after the lease). The DELETE is safe to repeat:
            # once more, alone, on a new connection, so that a finished task
            # does not run again just because its connection was cut.
            self._delete(rows)
            return []

    def _delete(self, rows: list[int]) -> None:
        """The ack's DELETE of *rows*, in one statement."""
        with self._connection() as conn:
            conn.execute(self._sql["ack"], {"ids": rows})

    def reject(self, message: Any, reason: str) -> None:
        """Move the message (raw bodies too) to ``<table>_rejected`` with *reason*."""
        row = self._settle(message, "reject")[0]
        with self._connection() as conn:
            conn.execute(self._sql["move"], {"id": row, "reason": reason})

    def requeue(self, message: Any) -> None:
        """Give a leased message back now, unrun; this delivery does not count."""
        row = self._settle(message, "requeue")[0]
        with self._connection() as conn:
            conn.execute(self._sql["requeue"], {"id": row, "consumer": self.consumer,
                                                "channel": self._channel})

    def heartbeat(self) -> None:
        """Renew the leases of the messages this queue object holds.

        Leases that dead engines held need no recovery step: they simply run
        out and the next dequeue takes the message.
        """
        held = [key[0] for key in self._leases]
        if not held:
            return
        with self._connection() as conn:
            conn.execute(self._sql["heartbeat"], {"lease": self.lease, "ids": held,
                                                  "consumer": self.consumer})

    # -- retries and the failed store ---------------------------------------------------

    def attempts(self, message: Any) -> int:
        """Failed attempts stored with *message*, which this queue object dequeued.

        Read from the lease (the claim returned it with the row): no query.
        ValueError if the queue object does not hold *message*.
        """
        self._check_fork()
        _, attempts, _ = self._leases.get(message, "PostgresQueue.attempts")
        return int(attempts)

    def retry(self, message: Any, *, delay: float, failed_at: float) -> None:
        """Settle *message* and store it again, ready in *delay* seconds, one attempt more.

        One statement deletes the leased row and stores *message* as given
        (its task id filled in) with its priority, ``attempts`` one higher and
        its first failure time (*failed_at* unless it had one): in the table
        when *delay* is 0, else in ``<table>_scheduled`` until the database's
        ``now()`` + *delay*. Wakes the engines waiting for a message.
        """
        body = protocol.encode(message)  # before the lease goes: a bad message keeps it
        row = self._settle(message, "retry")[0]
        with self._connection() as conn:
            conn.execute(self._sql["retry"], {
                "id": row, "consumer": self.consumer, "body": body, "delay": float(delay),
                "failed_at": float(failed_at), "channel": self._channel})

    def fail(self, message: Any, record: dict[str, Any], *, keep: int, ttl: float) -> int:
        """Settle *message* into ``<table>_failed``; return how many old entries were dropped.

        One transaction deletes the leased row, stores the entry (replacing
        one with the same task id) and drops the expired entries and, beyond
        *keep*, those that failed longest ago.
        """
        last = float(record["last_failed_at"])
        params = {
            "queue": self.name, "task_id": record["task_id"], "task": record["task"],
            # The message retry_failed() will store: [task_id, task, *args].
            "body": protocol.encode([record["task_id"], record["task"], *record["args"]]),
            "attempts": record["attempts"], "error_type": record["error_type"],
            "error": record["error"], "traceback": record["traceback"],
            "last_failed_at": last, "expires_at": last + ttl, "keep": int(keep),
            "consumer": self.consumer}
        params["id"] = self._settle(message, "fail")[0]
        with self._connection() as conn, conn.transaction():
            conn.execute(b"SELECT pg_advisory_xact_lock(%s)", (self._failed_lock_key,))
            conn.execute(self._sql["fail"], params)
            dropped = conn.execute(self._sql["trim"], params).fetchone()
        return int(dropped[0]) if dropped else 0

    def failed(self, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """Entries of the failed store, the latest failure first (dicts: FAILED_FIELDS)."""
        limit, offset = operator.index(limit), operator.index(offset)
        if limit < 0 or offset < 0:
            raise ValueError(f"PostgresQueue.failed: limit ({limit}) and offset ({offset}) "
                             f"must be >= 0")
        with self._connection() as conn:
            found = conn.execute(self._sql["failed"], {
                "queue": self.name, "limit": limit, "offset": offset}).fetchall()
        return [protocol.failed_entry(each) for each in found]

    def failed_count(self) -> int:
        """Entries in the failed store (not expired)."""
        with self._connection() as conn:
            row = conn.execute(self._sql["failed_count"], {"queue": self.name}).fetchone()
        return int(row[0]) if row else 0

    def find_failed(self, task_id: str) -> dict[str, Any] | None:
        """The entry of *task_id*, or None."""
        with self._connection() as conn:
            row = conn.execute(self._sql["find_failed"],
                               {"queue": self.name, "task_id": task_id}).fetchone()
        return None if row is None else protocol.failed_entry(row)

    def retry_failed(self, task_id: str) -> bool:
        """Move the entry of *task_id* back into the queue, ready now, attempts reset.

        One statement: a crash leaves the entry or the message. False if
        there is no such entry.
        """
        return self._retry_failed("retry_failed", task_id) > 0

    def retry_failed_all(self) -> int:
        """Move every entry back into the queue, in one statement; return how many."""
        return self._retry_failed("retry_failed_all", None)

    def delete_failed(self, task_id: str) -> bool:
        """Forget the entry of *task_id*; False if there was none."""
        return self._delete_failed("delete_failed", task_id) > 0

    def purge_failed(self) -> int:
        """Forget every entry; return how many."""
        return self._delete_failed("purge_failed", None)

    def _retry_failed(self, statement: str, task_id: str | None) -> int:
        with self._connection() as conn:
            row = conn.execute(self._sql[statement], {
                "queue": self.name, "task_id": task_id, "channel": self._channel}).fetchone()
        return int(row[0]) if row else 0

    def _delete_failed(self, statement: str, task_id: str | None) -> int:
        with self._connection() as conn:
            row = conn.execute(self._sql[statement],
                               {"queue": self.name, "task_id": task_id}).fetchone()
        return int(row[0]) if row else 0

    # -- results ----------------------------------------------------------------------

    def result_ttl(self, message: Any) -> float | None:
        """Seconds to keep *message*'s result, as ``schedule`` stored it; None: none asked.

        Read from the lease (the claim returned the row's ``result_ttl`` with
        it): no query. ValueError if the queue object does not hold *message*.
        """
        self._check_fork()
        _, _, ttl = self._leases.get(message, "PostgresQueue.result_ttl")
        return None if ttl is None else float(ttl)

    def store_result(self, task_id: str, record: dict[str, Any], *, ttl: float) -> None:
        """Store (replace) *task_id*'s result *record*, kept *ttl* seconds; wake its waiters.

        One statement, so one transaction: the record (JSON, ``expires_at``
        added: the database's ``now()`` + *ttl*, POSIX seconds; an
        ``expires_at`` in *record* is replaced) goes into ``<table>_results``,
        replacing one of the same id, with a ``pg_notify`` that wakes every
        ``result()`` waiting for it, in every process, at the commit. The
        same statement deletes up to 100 expired results of the queue. A
        *record* that is not JSON raises TypeError or ValueError, storing
        nothing. A connection error propagates: the caller has not settled the
        message yet, so the task runs again and stores its result then.
        """
        params = self._result_params("store_result", task_id, record, ttl)
        with self._connection() as conn:
            conn.execute(self._sql["store_result"], params)

    def store_result_and_ack(self, message: Any, task_id: str, record: dict[str, Any], *,
                             ttl: float) -> None:
        """``store_result(task_id, record, ttl=ttl)``, then ``ack(message)``, in one statement.

        One transaction: the record is stored (its waiters notified at the
        commit) and the message's row deleted together, or neither happens, so
        no outcome is acked before its result is stored. The engine uses it for
        a success whose result is kept: one round trip and one commit instead
        of two. The DELETE commits as the result does, flushed to the WAL
        (an ``ack``'s alone does not wait for the flush). Raises as
        ``store_result`` does, and ValueError for a message this queue object
        does not hold, storing nothing. On any error the message stays leased,
        as after a failed ``store_result``: it is not batched with other acks
        (that DELETE would go without its result). A reply lost after the
        commit leaves the row deleted and the message still leased here (its
        heartbeat renews nothing): it runs no more.
        """
        params = self._result_params("store_result_and_ack", task_id, record, ttl)
        self._check_fork()
        row = self._leases.get(message, "PostgresQueue.store_result_and_ack")[0]
        with self._connection() as conn:
            conn.execute(self._sql["store_result_ack"], {**params, "id": row})
        self._settle(message, "store_result_and_ack")

    def _result_params(self, action: str, task_id: str, record: dict[str, Any],
                       ttl: float) -> dict[str, Any]:
        """The parameters of _STORE_RESULT for *record*, checked: TypeError or ValueError
        for what cannot be stored (a record that is not JSON, a bad *ttl*)."""
        fields = protocol.result_fields(f"PostgresQueue.{action}", task_id, record)
        seconds = min(_positive(action, "ttl", ttl), _RESULT_TTL_MAX)
        text = json.dumps(fields, separators=(",", ":"), allow_nan=False)
        return {"queue": self.name, "task_id": task_id, "ttl": seconds,
                "head": text[:-1] + ("," if fields else "") + '"expires_at":',
                "sweep": _RESULT_SWEEP, "channel": self._result_channel}

    def result(self, task_id: str, timeout: float | None = None) -> dict[str, Any] | None:
        """*task_id*'s result record once stored and not expired; None if none came in time.

        Waits up to *timeout* seconds (None: no limit; 0 or less: looks once,
        one SELECT). A wait registers with the queue object's result listener
        (one connection LISTENing on the queue's result channel, shared by
        every waiting thread, opened by the first), then looks, then sleeps
        until the notification of its id comes: a store at any moment after
        the look wakes it, within milliseconds, and hands it the record (no
        SELECT; a record over 8000 bytes is read). It looks again every 5 s
        regardless (a safety net, not a poll). The record is returned as JSON
        gives it back, ``expires_at`` included. A connection error propagates
        as ``psycopg.OperationalError``.
        """
        if not isinstance(task_id, str) or not task_id:
            return None
        if timeout is not None:
            timeout = float(timeout)
            if not timeout > 0:  # 0, negative (or NaN): look once
                return self._find_result(task_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        self._check_fork()
        with self._pool_lock:
            listener = self._result_listener
        if listener is None or not listener.alive:
            # No listener yet: a record stored already needs none (a call after
            # the task finished, Engine.result's usual case), so look first.
            found = self._find_result(task_id)
            if found is not None:
                return found
        waiter = _Waiter()
        listener = self._listen_for(task_id, waiter)
        try:
            while True:
                # Cleared before the look: a notification from now on sets it, and
                # one that came after the registration but before this look is
                # harmless (the look below finds what it announced).
                waiter.event.clear()
                found = self._find_result(task_id)
                if found is not None:
                    return found
                pause = _RESULT_RECHECK
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return None
                    pause = min(pause, remaining)
                waiter.event.wait(pause)
                if waiter.record is not None:  # the notification carried it: no SELECT
                    return waiter.record
                if not listener.alive:
                    # Closed or lost: a notification may have gone with it. Listen on
                    # a new one before the next look, so none is missed from then on.
                    listener.remove(task_id, waiter)
                    listener = self._listen_for(task_id, waiter)
        finally:
            listener.remove(task_id, waiter)

    def _find_result(self, task_id: str) -> dict[str, Any] | None:
        """One SELECT: *task_id*'s record unless it expired, or None."""
        with self._connection() as conn:
            row = conn.execute(self._sql["result"],
                               {"queue": self.name, "task_id": task_id}).fetchone()
        if row is None:
            return None
        found: dict[str, Any] = json.loads(row[0])
        return found

    def _listen_for(self, task_id: str, waiter: _Waiter) -> _ResultListener:
        """Register *waiter* for *task_id*'s notification, with a listener that is LISTENing.

        The LISTEN is committed before this returns: whatever is stored after
        the caller's next look is announced to it.
        """
        while True:
            with self._pool_lock:
                listener = self._result_listener
            if listener is not None and listener.add(task_id, waiter):
                return listener
            with self._result_connecting:  # one thread connects; the others wait, then add
                with self._pool_lock:
                    listener = self._result_listener
                if listener is None or not listener.alive:
                    conn = self._connect()  # takes no work slot, as a waiting dequeue's
                    try:
                        conn.execute(self._sql["listen_results"])
                        listener = _ResultListener(conn, self.name)
                    except BaseException:
                        conn.close()
                        raise
                    with self._pool_lock:
                        self._result_listener = listener
                    listener.thread.start()
            if listener.add(task_id, waiter):
                return listener

    def rejected(self, limit: int | None = None, offset: int = 0) -> list[tuple[Any, str]]:
        """The rejected messages of this queue, oldest first, as (message or raw, reason):
        all of them, or *limit* (None: no limit) from *offset*."""
        limit, offset = protocol.page_or_all("PostgresQueue.rejected", limit, offset)
        with self._connection() as conn:
            rows = conn.execute(self._sql["rejected"], {
                "queue": self.name, "limit": limit, "offset": offset}).fetchall()
        return [(protocol.decode(body), reason) for body, reason in rows]

    def rejected_count(self) -> int:
        """How many messages ``rejected()`` lists."""
        return self._one("rejected_count", {"queue": self.name})

    # -- inspection (read-only: see "Engines, outcomes and inspection") -------------

    def peek(self, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """Ready messages, in the order claims would take them, left in place:
        ``{"message", "priority", "attempts"}`` each, *limit* from *offset*."""
        limit, offset = protocol.page("PostgresQueue.peek", limit, offset)
        if not limit:
            return []
        with self._connection() as conn:
            rows = conn.execute(self._sql["peek"], {
                "queue": self.name, "max_deliveries": self.max_deliveries,
                "window": offset + limit, "limit": limit, "offset": offset}).fetchall()
        return [protocol.inspected(_listed(body), priority, attempts)
                for body, priority, attempts, *_ in rows]

    def peek_scheduled(self, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """Messages waiting for their time (the database's clock), the soonest first,
        with ``"at"``: *limit* from *offset*."""
        limit, offset = protocol.page("PostgresQueue.peek_scheduled", limit, offset)
        with self._connection() as conn:
            rows = conn.execute(self._sql["peek_scheduled"], {
                "queue": self.name, "limit": limit, "offset": offset}).fetchall()
        return [protocol.inspected(_listed(body), priority, attempts, at)
                for body, priority, attempts, at in rows]

    def find(self, task_id: str) -> dict[str, Any] | None:
        """Where the message of *task_id* is now (``leased``, ``waiting`` or
        ``scheduled``), or None; one scan of this queue's rows."""
        task_id = protocol.task_id_of("PostgresQueue.find", task_id)
        prefix = protocol.task_prefix(task_id)
        with self._connection() as conn:
            rows = conn.execute(self._sql["find"], {
                "queue": self.name, "prefix": prefix, "length": len(prefix)}).fetchall()
        found: dict[str, dict[str, Any]] = {}
        for body, priority, attempts, at, status in rows:
            message = protocol.decode(body)
            if isinstance(message, list) and message and message[0] == task_id:
                found.setdefault(status, protocol.inspected(
                    message, priority, attempts, at if status == "scheduled" else None, status))
        for status in ("leased", "waiting", "scheduled"):
            if status in found:
                return found[status]
        return None

    # -- engines and outcomes ---------------------------------------------------------

    def announce(self, engine_id: str, record: dict[str, Any], ttl: float) -> None:
        """Store or replace *engine_id*'s record, expiring *ttl* seconds from now (the
        database's clock); expired records go in the same statement."""
        engine_id, text, seconds = protocol.announcement(
            "PostgresQueue.announce", engine_id, record, ttl)
        with self._connection() as conn:
            conn.execute(self._sql["announce"], {
                "queue": self.name, "engine_id": engine_id, "record": text,
                "ttl": min(seconds, _RESULT_TTL_MAX)})

    def engines(self) -> list[dict[str, Any]]:
        """The records of the engines announced and not expired, by engine id: one
        SELECT (``announce`` deletes the expired ones)."""
        with self._connection() as conn:
            rows = conn.execute(self._sql["engines"], {"queue": self.name}).fetchall()
        return [json.loads(text) for (text,) in rows]

    def forget_engine(self, engine_id: str) -> None:
        """Drop *engine_id*'s record now."""
        protocol.engine_id_of("PostgresQueue.forget_engine", engine_id)
        with self._connection() as conn:
            conn.execute(self._sql["forget_engine"],
                         {"queue": self.name, "engine_id": engine_id})

    def add_outcomes(self, minute: int, counts: dict[str, int]) -> None:
        """Add *counts* to the bucket of POSIX *minute*, in one statement that also
        deletes the buckets more than two hours old (the database's clock)."""
        checked = protocol.outcome_counts("PostgresQueue.add_outcomes", minute, counts)
        if not checked:
            return
        outcomes = [outcome for outcome in protocol.OUTCOMES if outcome in checked]
        with self._connection() as conn:
            conn.execute(self._sql["add_outcomes"], {
                "queue": self.name, "minute": minute, "kept": _OUTCOMES_KEPT,
                "outcomes": outcomes, "counts": [checked[o] for o in outcomes]})

    def outcomes(self, since: int) -> dict[int, dict[str, int]]:
        """The buckets of the minutes from *since* on: ``{minute: {outcome: count}}``."""
        start = protocol.since_minute("PostgresQueue.outcomes", since)
        with self._connection() as conn:
            rows = conn.execute(self._sql["outcomes"],
                                {"queue": self.name, "since": start}).fetchall()
        buckets: dict[int, dict[str, int]] = {}
        for minute, outcome, count in rows:
            buckets.setdefault(int(minute), {})[outcome] = int(count)
        return buckets

    def _one(self, statement: str, params: dict[str, Any]) -> int:
        """The one number *statement* selects."""
        with self._connection() as conn:
            row = conn.execute(self._sql[statement], params).fetchone()
        return int(row[0]) if row else 0

    def __len__(self) -> int:
        """Messages waiting: available now and not leased."""
        with self._connection() as conn:
            row = conn.execute(self._sql["waiting"], {"queue": self.name}).fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:
        """Close every connection (those in use, when they are given back).

        The queue stays usable: a later call opens new connections. A waiting
        ``dequeue`` is not interrupted; it returns within its timeout. Waiting
        ``result()`` calls go on, on a listener of their own.
        """
        self._check_fork()  # a child closes nothing of its parent's
        with self._pool_lock:
            idle, self._idle = self._idle, []
            self._generation += 1  # a wait under way stops listening as it ends
            kept, self._kept = self._kept, None
            self._reaper = None  # the reaper sees it is not the queue's any more, and ends
            self._reaper_bell.notify_all()
            listener, self._result_listener = self._result_listener, None
        if listener is not None:
            listener.stop()  # its waiters are woken, and listen on a new one
        if kept is not None:
            idle.append((kept.conn, kept.generation))
        for conn, _ in idle:
            conn.close()

    def __repr__(self) -> str:
        return (f"<PostgresQueue table={self.table!r} name={self.name!r} "
                f"consumer={self.consumer!r}>")  # never the DSN: it may hold a password

    # -- internals ------------------------------------------------------------------

    def _claim(self, count: int, *, acked: list[int] | None = None) -> list[Any]:
        """Lease up to *count* available messages, setting poison aside; [] if none.

        *acked*: the rows of messages acked by the first statement (see ack_and_dequeue).
        """
        params = {"consumer": self.consumer, "lease": self.lease, "queue": self.name,
                  "max_deliveries": self.max_deliveries, "poison": protocol.POISON_REASON,
                  "count": count, "gate": True}
        statement = self._sql["claim"]
        if acked is not None:
            statement, params["ids"] = self._sql["ack_claim"], acked
        messages: list[Any] = []
        while True:
            with self._connection() as conn:
                rows = conn.execute(statement, params).fetchall()
                statement = self._sql["claim"]  # acked once: a second look only claims
                looked = time.monotonic()
                due_in = None
                if rows and rows[-1][2] == 2:  # the earliest delayed message
                    due_in = rows.pop()[5]
                    if due_in <= 0 and params["gate"]:
                        # Due and not yet moved: move it (and its like), then claim.
                        moved = conn.execute(self._sql["promote"], params).fetchone()
                        params["gate"] = bool(moved and moved[0])
                        continue
            # When a waiting dequeue must look again at the latest (see _wait).
            # (Due already, and another engine is moving it: look again in a moment.)
            self._next_due = None if due_in is None else looked + max(due_in, _BUSY_DUE)
            params["gate"] = True
            poisoned = 0
            for key, body, kind, _, _, _, attempts, result_ttl in rows:
                if kind:
                    poisoned += 1
                    continue
                message = protocol.decode(body)
                if message is body:
                    message = _Raw(body)
                messages.append(self._leases.add(message, (key, attempts, result_ttl)))
            if not poisoned or len(messages) >= count:
                return messages
            # Poison took places in the batch: look for messages to fill them.
            params["count"] = count - len(messages)

    def _wait(self, count: int, deadline: float, *, keep: bool) -> list[Any]:
        """Claim, waiting for a notification while nothing is available, until *deadline*.

        The listening connection only listens: claims borrow another, so a
        notification is never read in the middle of a query. A claim comes
        after the LISTEN and after every notification, so a message enqueued
        at any moment of the wait wakes it. With *keep*, the connection stays
        listening when the wait ends empty, for the next wait: an idle engine
        then costs a claim per ``_RECLAIM`` seconds and nothing more (no claim,
        LISTEN, claim, UNLISTEN each time its leader's wait returns). A wait
        that claimed messages keeps it too, for _HANDOFF seconds: the next
        leader's wait comes sooner than that while the engine has free workers.
        """
        kept = self._take_kept() if keep else None
        claimed_at: float | None = None  # the claim before a new LISTEN does not count
        if kept is None:
            messages = self._claim(count)
            if messages:
                return messages
            conn, generation = self._borrow()  # a wait takes no work slot
        else:
            conn, generation, claimed_at = kept.conn, kept.generation, kept.claimed_at
            messages = []
        try:
            if kept is None:
                conn.execute(self._sql["listen"])
            while True:
                # What was announced since the last claim (stale ones too: they
                # cost a claim). The claim decides, not the payloads.
                announced = False
                for _ in conn.notifies(timeout=0):  # reads what arrived, waits for nothing
                    announced = True
                now = time.monotonic()
                if announced or claimed_at is None or now - claimed_at >= _RECLAIM:
                    messages = self._claim(count)
                    claimed_at = now
                    if messages:
                        break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                wake = claimed_at + _RECLAIM
                due = self._next_due  # the earliest delayed message's time, at the last claim
                if due is not None and due < wake:
                    wake = due
                    claimed_at = due - _RECLAIM  # so that the loop claims once it is due
                _wait_readable(conn, min(remaining, wake - time.monotonic()))
        except BaseException:
            lost = conn.broken
            conn.close()  # closing ends the LISTEN
            if lost:
                self.close()  # the server went away, most likely for every connection
            raise
        if keep:
            # The claim that found fewer than *count* saw every message available
            # (those after it are announced to this connection, LISTENing still):
            # the next wait claims on a notification, or after _RECLAIM. One that
            # filled *count* may have left more: the next wait claims at once.
            full = len(messages) >= count
            if self._keep(_Kept(conn, generation, None if full else claimed_at,
                                _HANDOFF if messages else _KEEP)):
                return messages
        # Closed meanwhile, or not the kept listener's wait: a connection left
        # listening and unread would hold back the server's notification queue.
        self._stop_listening(conn, generation)
        return messages

    def _keep(self, kept: _Kept) -> bool:
        """Keep *kept* listening for the next wait, unless close() came meanwhile."""
        with self._pool_lock:
            if kept.generation != self._generation:
                return False
            self._kept = kept
            if self._reaper is None:
                self._reaper = threading.Thread(
                    target=self._reap, daemon=True,
                    name=f"tempest-postgres-listener:{self.name}")
                self._reaper.start()
            else:
                self._reaper_bell.notify()  # it may sleep for longer than this hold
        return True

    def _reap(self) -> None:
        """Reaper thread: end the kept listener's LISTEN once no wait used it for its hold.

        An engine's leader waits again within a fraction of a second; when waits
        stop coming (the engine stopped or is busy, the application only
        enqueues now), a connection left listening unread would hold back the
        server's notification queue. A listener kept after an empty wait is
        closed after _KEEP seconds (no round trip: closing ends the LISTEN);
        one kept after a claim, after _HANDOFF seconds, UNLISTENs and goes back
        to the pool (a busy engine uses it again soon). Ends when no listener
        is kept nor in use, or at close().
        """
        me = threading.current_thread()
        while True:
            with self._pool_lock:
                while True:
                    if self._reaper is not me:  # close() came
                        return
                    kept = self._kept
                    if kept is None:
                        if not self._listening.locked():  # no wait has it in hand
                            self._reaper = None
                            return
                        self._reaper_bell.wait(_KEEP)
                        continue
                    idle = time.monotonic() - kept.used_at
                    if idle >= kept.hold:
                        self._kept = None
                        break
                    self._reaper_bell.wait(kept.hold - idle)
            if kept.hold < _KEEP:
                self._stop_listening(kept.conn, kept.generation)
            else:
                kept.conn.close()

    def _take_kept(self) -> _Kept | None:
        """The kept listener, if it is still good; the caller holds ``_listening``."""
        with self._pool_lock:
            kept, self._kept = self._kept, None
            good = kept is not None and kept.generation == self._generation
        if kept is None:
            return None
        if not good or kept.conn.closed or kept.conn.broken:
            kept.conn.close()
            return None
        return kept

    def _borrow(self) -> tuple[psycopg.Connection[Any], int]:
        """An idle pooled connection, or a new one, with its generation; give it back."""
        with self._pool_lock:
            conn, generation = self._idle.pop() if self._idle else (None, self._generation)
        return conn or self._connect(), generation

    def _stop_listening(self, conn: psycopg.Connection[Any], generation: int) -> None:
        try:
            conn.execute(self._sql["unlisten"])
        except psycopg.Error:
            conn.close()  # the messages in hand must not be lost to this
        self._give_back(conn, generation)

    def _delete_acked(self, ticket: _Ack) -> None:
        """With the duty: delete every pending ack's row in one statement, then pass it on."""
        with self._acks:
            ticket.lead = False
            batch, self._pending = self._pending, []  # ticket's own is among them
        error: BaseException | None = None
        rows = [each.row for each in batch]
        try:
            try:
                self._delete(rows)
            except psycopg.OperationalError:
                # The connection went (a restart, pg_terminate_backend): the DELETE
                # was rolled back, or committed with its reply lost. It is safe to
                # repeat, once, on a new connection, so that finished tasks do not
                # run again just because their connection was cut.
                self._delete(rows)
        except BaseException as exc:  # noqa: BLE001 - raised below, and by every ack it took
            error = exc
        with self._acks:
            for each in batch:
                each.done = True
                each.error = error
                if each is not ticket:
                    each.wake.release()
            self._hand_over()
        if error is not None:
            raise error

    def _hand_over(self) -> None:
        """Under _acks, as a DELETE ends: the oldest pending ack sends the next one, if any."""
        if self._pending:
            first = self._pending[0]
            first.lead = True
            first.wake.release()
        else:
            self._acking = False

    def _settle(self, message: Any, action: str) -> tuple[int, int, float | None]:
        """The (row id, failed attempts, result ttl) leased with *message*, forgotten."""
        self._check_fork()  # a child must not settle its parent's messages
        key: tuple[int, int, float | None] = self._leases.settle(
            message, f"PostgresQueue.{action}")
        return key

    def _connect(self) -> psycopg.Connection[Any]:
        options: dict[str, Any] = {}
        if self._connect_timeout:
            options["connect_timeout"] = _CONNECT_TIMEOUT
        if self._application_name:
            options["application_name"] = f"tempest {self.consumer}"[:_MAX_IDENTIFIER]
        conn = psycopg.connect(self._dsn, autocommit=True, **options)
        # A claim must walk the ready index in its order and stop at LIMIT. For a
        # table not analyzed yet (a new queue: autovacuum analyzes it a minute or
        # more later) the planner guesses a handful of rows and takes a bitmap
        # scan of every ready row plus a sort instead: each claim then costs in
        # proportion to the backlog (1.4 ms instead of 0.4 ms at 3,000 waiting).
        # The queue's own statements never need a bitmap scan.
        conn.execute("SET enable_bitmapscan = off")
        return conn

    def _check_fork(self) -> None:
        if protocol.forks() != self._forks:
            # A forked child must not touch its parent's sockets, nor hold its
            # leases or acks: drop them unclosed (psycopg never closes a parent's
            # connection from a child) and become a consumer of its own. Fresh
            # locks: another thread of the parent may have held one at the fork.
            self._pool_lock = threading.Lock()
            self._schema_lock = threading.Lock()
            self._idle = []
            self._generation += 1
            self._new_identity()

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        """Borrow a pooled connection for a statement; one thread uses it at a time.

        A statement waits for one of the ``_WORK_CONNECTIONS`` slots; a waiting
        dequeue's listener takes none, so waiters can never starve the claims
        they depend on.
        """
        self._check_fork()
        slots = self._work_slots
        slots.acquire()
        try:
            conn, generation = self._borrow()
            try:
                if not self._schema_ready:
                    self._create_schema(conn)
                yield conn
            except psycopg.OperationalError:
                if conn.broken or conn.closed:
                    # The server went away, most likely for every pooled connection
                    # (a restart, a failover): drop them all; the next call reconnects.
                    self.close()
                raise
            finally:
                self._give_back(conn, generation)
        finally:
            slots.release()

    def _give_back(self, conn: psycopg.Connection[Any], generation: int) -> None:
        reusable = (not conn.closed and not conn.broken
                    and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE)
        with self._pool_lock:
            if reusable and generation == self._generation:
                self._idle.append((conn, generation))
                return
        conn.close()

    def _create_schema(self, conn: psycopg.Connection[Any]) -> None:
        with self._schema_lock:
            if self._schema_ready:
                return
            exists = conn.execute(_EXISTING.encode(), self._names).fetchone()
            if not (exists and exists[0]):
                # Concurrent engines serialise here, and the second finds everything
                # created; without the lock, two CREATE TABLE IF NOT EXISTS can both
                # miss the table and one fails on the catalog's unique index.
                lock_key = int.from_bytes(
                    hashlib.sha1(f"tempest:{self.table}".encode()).digest()[:8],
                    "big", signed=True)
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key,))
                    # Look again under the lock: the engine that held it may have
                    # just made everything. Running the DDL anyway would take
                    # ACCESS EXCLUSIVE locks table by table (ALTER TABLE ... IF NOT
                    # EXISTS takes it even when there is nothing to add), and a
                    # claim holding one table while it waits for the other
                    # deadlocks with it.
                    exists = conn.execute(_EXISTING.encode(), self._names).fetchone()
                    if not (exists and exists[0]):
                        conn.execute(schema_sql(self.table).encode())
            self._schema_ready = True
