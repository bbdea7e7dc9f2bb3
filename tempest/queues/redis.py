"""RedisQueue: a durable queue in Redis lists, shared by many engines (reliable fetch).

Needs the ``redis`` extra (redis-py) and Redis 6.2 or newer (``BLMOVE``,
``ZRANGE ... BYSCORE``)::

    pip install 'task-tempest[redis]'

Keys
----
Every key of a queue named ``NAME`` starts with ``tempest:{NAME}:``. The braces
are a Redis Cluster hash tag: all of one queue's keys hash to one slot, as the
scripts below need. Nothing else is stored, so ``redis-cli --scan --pattern
'tempest:{NAME}:*'`` lists (and ``DEL`` removes) a whole queue.

====================================  ======  ================================================
key                                   type    holds
====================================  ======  ================================================
``tempest:{NAME}:waiting``            list    ready messages of priority 0: ``LPUSH``-ed by
                                              producers, taken from the other end (FIFO);
                                              now and then a wake token (below)
``tempest:{NAME}:waiting:<p>``        list    ready messages of priority ``<p>`` (not 0), as
                                              ``waiting``
``tempest:{NAME}:priorities``         zset    the priorities ``<p>`` (not 0) whose list holds
                                              messages, scored by themselves
``tempest:{NAME}:scheduled``          zset    messages whose time has not come (or has, and
                                              no script made them ready yet), scored by
                                              their due time in ms on the server's clock
``tempest:{NAME}:sequence``           string  a counter: the ``scheduled`` members' prefix
``tempest:{NAME}:inflight:<id>``      list    what consumer ``<id>`` took and has not settled
``tempest:{NAME}:consumers``          zset    consumer id -> the end of its lease, in ms on
                                              the Redis server's clock
``tempest:{NAME}:deliveries``         hash    sha1 of an entry -> deliveries that ended
                                              without an outcome (only recovered messages)
``tempest:{NAME}:rejected``           list    ``<reason>\\n<message>`` for each rejected one
``tempest:{NAME}:fired:<schedule>``   zset    fired slots of periodic *schedule* (the
                                              slot's ``repr``) -> when recorded (ms, server)
``tempest:{NAME}:slots:<schedule>``   zset    the same slots, scored by themselves
                                              (``last_fired``)
``tempest:{NAME}:failed``             hash    task id -> the failed store's entry (its
                                              JSON), a newline, and the message entry
                                              ``retry_failed`` stores again
``tempest:{NAME}:failed:by_time``     zset    task id -> the entry's ``last_failed_at``
``tempest:{NAME}:failed:expires``     zset    task id -> the entry's ``expires_at``
                                              (POSIX seconds, compared with the server's)
``tempest:{NAME}:result:<id>``        list    one element: the result record of task
                                              ``<id>`` (its JSON, ``expires_at``
                                              included); the list expires with it
                                              (``PEXPIRE``): see "Results"
``tempest:{NAME}:engine:<id>``        string  the record of live engine ``<id>`` (its JSON),
                                              expiring with it (``PX``)
``tempest:{NAME}:engines``            zset    engine id -> when its record expires (ms,
                                              server); ``announce`` prunes it
``tempest:{NAME}:outcomes:<minute>``  hash    outcome -> count in POSIX minute ``<minute>``;
                                              expires 3900 s after its last count
``tempest:{NAME}:outcomes``           zset    minute -> when its hash expires (ms, server);
                                              ``add_outcomes`` prunes it
====================================  ======  ================================================

A message is stored as its compact JSON (``["id","Task",1,2]``), so any client
can enqueue with ``LPUSH tempest:{NAME}:waiting '<json>'``; what is not a JSON
list is handed to the engine raw (bytes), for it to reject. A message of
priority *p* other than 0 is stored (in ``waiting:<p>``, in-flight lists, the
``deliveries`` hash) as the *entry* ``\\xffp<p>\\n<json>``, so that one given
back or recovered returns to its own list; ``rejected`` holds the bare JSON.
A message that failed before (see "Retries and the failed store") has the
header ``\\xffa<attempts>,<first_failed_at>\\n`` in front of that entry, as
in ``\\xffa2,1733500000.25\\n\\xffp5\\n<json>``. A message whose result is
to be kept (``schedule(..., result_ttl=)``, see "Results") has the header
``\\xffr<ttl ms>\\n`` outermost, in front of all that, as in
``\\xffr86400000\\n\\xffa2,1733500000.25\\n\\xffp5\\n<json>`` (the ms written
exactly: ``result_ttl(m)`` gives back the seconds passed).
(A raw message of an external producer starting with those bytes would be
read as prioritised, as failed before, or as asking for its result.) A
``scheduled`` member is a 16-digit counter followed by the entry: members are
unique, and those due at the same ms go in the order of the calls.

The wake token is the 5 bytes ``\\xffwake`` (never JSON): pushed into
``waiting`` to wake consumers blocked in ``BLMOVE`` there, or to make one
taking bare ``LMOVE`` look again. Consumers drop it wherever they meet it;
``len()`` does not count it, recovery does not give it back nor count it as a
delivery.

How a message travels
---------------------
``dequeue`` ``LMOVE``-s the oldest waiting message onto this consumer's
in-flight list, atomically (while nothing is scheduled or prioritised: else a
script takes, see the next section). Unless this consumer's lease was renewed within
the last quarter lease (and whenever that finds nothing), it runs instead one
Lua script that renews the lease in the ``consumers`` zset, recovers the
in-flight lists of consumers whose lease ran out (see below), and moves the
message, all atomically. So a move never lands in the list of a consumer
whose lease ran out (short of a stall of most of a lease between the check
and the move). When nothing waits, ``dequeue(timeout=...)`` blocks in
``BLMOVE`` -- in slices of at most half a lease, renewing the lease between
slices -- and wakes the moment a message is pushed. ``ack`` removes the message
from the in-flight list (``LREM``; the acks of concurrent threads go in one
round trip); ``reject`` moves it to ``rejected``; ``requeue`` moves it back to
the taking end of ``waiting``, to be taken next.

``dequeue_many(n)`` (the engine's leader takes one message for itself and one
for each worker waiting behind it) moves up to *n* messages in one round trip:
one Lua script ``LMOVE``-s them one by one, oldest first, onto the in-flight
list. While the lease is fresh, that script first checks on the server's clock
that the lease still runs, and moves nothing otherwise; else (and whenever it
finds nothing) the claim script above renews, recovers and moves up to *n*.
When nothing waits, ``BLMOVE`` waits for the first message as in ``dequeue``
and, while the lease is fresh, that one message is the batch: nothing lies
between the move and the task, and the next dequeue takes what came after
it. Once the lease is no longer fresh (a long wait), the renewal that
follows ``BLMOVE`` takes up to *n* - 1 more in the same script. Each message of a batch
is then an in-flight entry like any other: leased, recovered, counted and
settled on its own.

Delayed and prioritised messages
--------------------------------
``enqueue``, ``schedule`` and ``fire`` each run one script, which first makes
ready the due members of ``scheduled`` (at most 1000, oldest due first:
``LPUSH``-ed onto their priority's list, as if enqueued at that moment), then
stores the message: ready (``LPUSH`` onto its list) if its time has come, else
into ``scheduled``. So a message stored after another one's time comes after
it, whether or not anyone dequeued in between. The script also reports
whether anything is scheduled or prioritised: while nothing was, less than
50 ms before (and this object has stored nothing delayed, retried or fired
since), ``enqueue`` -- and a ``schedule`` ready now, of priority 0, asking
only for its result -- is a bare ``LPUSH`` instead, at the cost of the script
(about a third of the enqueue rate, see bench/README.md). Another client's
delayed message falling due within those 50 ms may then come after such an
enqueue, as after an external producer's. The claim and take scripts
make due members ready the same way before they take; they take from the
highest priority present in ``priorities`` -- positive ones before
``waiting``, negative ones after it -- and report what they saw besides
``waiting``: prioritised messages ready, or the ms until the next due time.
While neither applies (nothing scheduled, nothing prioritised), ``dequeue``
keeps its bare ``LMOVE`` on ``waiting``, looking again by script at most every
50 ms and at the next due time; a wait's ``BLMOVE`` ends no later than a fifth
of a second before the next due time, and the dequeue then polls (every 10 ms
at most, and exactly at the due time), since a ``BLMOVE`` timeout is only as
precise as the server's ``hz``.

Storing a prioritised message ready, or a delayed one due earlier than any
other, pushes wake tokens: one per live consumer (up to 64) when ``waiting``
is empty (consumers may be blocked in ``BLMOVE`` on it), else one at the
taking end unless one is there already, for a consumer taking bare ``LMOVE``
to meet. A consumer that takes a token drops it and runs the claim script,
which takes by priority and tells it the next due time. ``requeue`` and
recovery push a message back onto the taking end of its own priority's list:
ready at once, taken next among its priority. An external producer's
``LPUSH`` does not make due messages ready first: a delayed message due
before it may come after it.

``fire`` records the slot with ``ZADD NX`` in ``fired:<schedule>`` (first
forgetting up to 1000 slots recorded more than *keep* ago, from both zsets),
and stores the message only if the slot was new, in the same script.

An in-flight entry is identified by its exact bytes: two messages with the same
bytes (the same task id and arguments) are interchangeable, and share their
delivery count.

``heartbeat()`` (the engine calls it every ``heartbeat_interval`` seconds)
renews the lease and runs the same recovery: every consumer whose lease ran out
has its in-flight list pushed back to the taking end of ``waiting`` (oldest
first), each message counted in ``deliveries``. A message that has now been
delivered ``max_deliveries`` times without an outcome goes to ``rejected`` with
the reason ``TooManyDeliveries`` instead. Recovery is atomic (a Lua script) and
runs in dequeues too (a dequeue renews the lease once its last renewal is a
quarter lease old), so an engine picks up a dead engine's messages
within about a heartbeat interval after its lease ends. All times are the Redis
server's (``TIME``), so engines on machines with skewed clocks agree.

Retries and the failed store
----------------------------
The failed attempts of a message travel in its entry (the ``\\xffa`` header,
see "Keys"): a message requeued, recovered after its lease or counted as a
delivery keeps its entry's bytes, so its count; ``attempts(m)`` reads it from
the entry the dequeue brought back (no round trip). ``retry`` runs one script
that settles the in-flight entry as ``ack`` does and stores the message as
the engine passes it, under a header one attempt higher (the first failure
time kept), into ``scheduled`` (due *delay* seconds from now on the server's
clock; ready at once for 0), waking waiting consumers as ``schedule`` does.
The enqueue, dequeue and ack paths read no more keys than before.

``fail`` runs one script that settles the in-flight entry and writes the
entry of the failed store under its task id, beside the message entry that
``retry_failed`` will store again (``[task_id, task, *args]``, its priority,
no header: attempts 0). The same script drops entries whose ``expires_at``
is past on the server's clock and, beyond *keep*, those that failed longest
ago (up to 1000 of each per call). ``failed``, ``failed_count`` and
``find_failed`` skip entries whose ``expires_at`` is past, dropped or not.
``retry_failed`` moves one entry back in a script; ``retry_failed_all`` does
so 1000 at a time, the oldest failure first. The store is one per queue
name: every engine sharing the queue shares it.

Results
-------
``schedule(m, ..., result_ttl=T)`` stores *T* with the message, as the
``\\xffr`` header of its entry (see "Keys"): like the attempts header it
travels in the entry's bytes, so ``requeue``, recovery after a lease and
the ``deliveries`` count keep it, and ``retry`` stores it again in front of
the new attempts header. The failed store's message entry has none:
``retry_failed`` and ``retry_failed_all`` store the message again without
it (its result is no longer kept). ``enqueue``, ``fire`` and external
producers store none. ``result_ttl(m)`` reads it from the entry the dequeue
brought back (no round trip). Every script strips the header where it reads
a priority or a message's JSON; the enqueue, dequeue and ack paths of the
messages without one do no more than before.

``store_result(task_id, record, ttl=T)`` runs one script: ``DEL
result:<id>``, ``RPUSH result:<id> <json>`` (``expires_at`` added: the
server's clock + *T*) and ``PEXPIRE result:<id> <ttl ms>``. The record is
its own wake-up: ``result(task_id, timeout)`` blocks in ``BLMOVE
result:<id> result:<id> RIGHT LEFT`` (slices of at most 5 s, inside the
socket timeout), which returns the record the moment it is there -- at
once if it was stored before the wait began -- so a result costs its waiter
one round trip, never a poll nor a second read. Moving the one element onto
the same list leaves it in place and hands it to every blocked waiter in
turn, so one store wakes them all, in every process. ``timeout=0`` looks
once (``LINDEX``). A waiting ``result`` holds a connection of the pool for
the wait (not the dequeue's nor the acks' own). Redis drops an expired
record itself: none past its ``expires_at`` is returned, and nothing needs
cleaning up. Results are one per queue name, like the failed store.
``store_result_and_ack(m, task_id, record, ttl=T)``, which the engine uses
for a success, is the same script followed by ``ack``'s removal of *m*'s
in-flight entry, in one script: the record and the ack happen together, in
one round trip.

Engines, outcomes and inspection
--------------------------------
``announce`` is one script: it prunes ``engines`` of the expired ids, sets
``engine:<id>`` with ``PX``, scores the id with its expiry and sets the index
to expire with its last member (``PEXPIREAT``), so the index of engines that
all stopped is gone with them. ``add_outcomes`` is one script of ``HINCRBY`` on
``outcomes:<minute>`` and ``EXPIRE 3900``, noting the minute in the
``outcomes`` index, pruned and expiring the same way. ``engines()`` and
``outcomes()`` are one script each that only reads (so it may run on a
read-only replica): the index members scored after the server's now
(``ZRANGE ... BYSCORE``), then their keys -- a record that expired is gone with
its key, its member pruned yet or not. None of them touches a message key, and
the enqueue, dequeue and ack paths are the same as without them.

``peek`` is one script per 1000 messages, reading only: the ready lists from
their taking end, highest priority first (positive ones, ``waiting``, negative
ones), each followed by the ``scheduled`` members whose time came and that no
script made ready yet (the next script pushes them at the back of their list,
in due order). Wake tokens are skipped; ``LPOS ... MAXLEN`` counts those in the
entries an *offset* passes over, so a page deep in the queue costs no copy of
what it skips. ``peek_scheduled`` is a ``ZRANGE ... BYSCORE`` of the members
not due yet (the server's clock). ``find`` looks through ``scheduled``, the
ready lists and the in-flight lists of the registered consumers, in the order
messages travel, with a script that reads 1000 entries per call and returns
only those whose message starts with the id's JSON: a search never holds
Redis for long, and a message moving on during it is met again further on.

Where a message can be lost or run twice
----------------------------------------
Nothing is lost while Redis keeps its data; every case below errs towards
running a message twice.

* The engine dies (``kill -9``, a lost machine) holding messages: they stay
  in its in-flight list until its lease runs out, then return. Those it had
  run but not yet acked run again -- including those whose ``ack`` had
  returned but was still waiting for the round trip of another thread's acks.
* A ``dequeue`` whose reply is lost (the connection broke after Redis moved the
  message): the message sits in this consumer's in-flight list, unknown to it.
  The queue marks itself suspect and, before its next move (and at every
  heartbeat, while no dequeue is between request and reply), gives back every
  in-flight entry it does not know of. It never ran, so it runs once.
  The same for a ``dequeue_many`` whose reply is lost: every message the
  script moved is such a stray, and all are given back, oldest taken first.
  After a ``BLMOVE`` whose reply did come, a lost reply of the renewal that
  takes the rest of the batch raises too, before any message of the batch is
  handed out: the one ``BLMOVE`` moved is given back with the rest. The
  messages of a reply that did arrive are all leased at once (under the lock
  a reconciliation takes), so none is ever taken for a stray.
* An ``ack``, ``reject`` or ``requeue`` that fails for a connection error is not
  an error for the engine: the queue keeps it and retries it at the next
  heartbeat or dequeue (logged as a warning on the ``tempest.queues.redis``
  logger). Until then the message stays in flight, leased; if the outage
  outlasts the lease, another engine may run it again.
* A consumer that is alive but misses its lease (Redis unreachable, or the
  process stalled, for longer than ``lease``) loses its messages to recovery,
  and they may run twice. Its late ``ack`` still removes a message from
  ``waiting`` if no one took it yet. A Redis outage longer than the lease does
  this to every engine at once: the server's clock moved on meanwhile.
* A ``BLMOVE`` returning while the lease is fresh hands its message out at
  once: the lease, renewed under a quarter lease before, runs on for three
  quarters of one at least (less a stall between that check and the move,
  as below). Otherwise, between ``BLMOVE`` handing a message over and the
  lease renewal that follows it, a consumer whose lease had run out during
  the wait (a stall longer than half a lease) is not registered: dying in
  those microseconds would strand the message in an in-flight list no one
  recovers. (The rest of a batch is moved after that renewal, in the same
  script: only the first is exposed.)
  ``dequeue``'s bare ``LMOVE`` has the same exposure after a stall of most of
  a lease between its freshness check and the move; ``dequeue_many``'s
  script checks the lease where it moves, so a batch never lands in the list
  of a consumer whose lease ran out.
* The messages of a batch wait in the engine for their workers (a moment:
  only workers already free get one) and are leased meanwhile. An engine dying
  then loses none: they are in its in-flight list and return with the rest.
  A stopping engine requeues those it did not start.
* ``retry`` and ``fail`` are one script each: a crash leaves the leased
  message (it returns after its lease with the count it had, and its attempt
  runs again) or the retried message or failed entry, never both. One that
  meets a connection error is deferred and retried as ``ack`` is (``fail``
  then reports nothing dropped); its script settles only an entry still in
  flight here or waiting, so a retry after a lost reply stores nothing twice.
* Scheduled and fired messages: every script is atomic, so a crash (of the
  engine or the producer) never leaves half a step. A ``schedule`` or
  ``fire`` whose reply is lost may have stored the message: a retry of
  ``schedule`` stores it twice; a retried ``fire`` finds the slot recorded and
  returns False, so a slot is stored once however often it is fired (while
  it is remembered: *keep* seconds at least). A due message moves from
  ``scheduled`` to its ready list inside a script, never through a client,
  so no engine's death loses it; from then on it travels as any other.
* A result is stored (``store_result``) before its message is settled, or
  with its ack in one script (``store_result_and_ack``): a crash between the
  two leaves the message leased, and it runs again and
  stores its result again, replacing the first (at-least-once: a waiter may
  see the first record, then ``result`` returns the second). A result is
  never lost where its message is not. A message that goes through the
  failed store and ``retry_failed`` no longer asks for its result: the
  record of its last failed attempt stays until it expires, and the run
  after ``retry_failed`` stores none.
* Redis itself must keep what it acknowledged: with ``appendonly yes`` and
  ``appendfsync always`` a crash of Redis loses nothing; with ``everysec``, up
  to a second of writes: enqueues are lost, and messages moved or acked in that
  second run again. Without persistence a restart loses every message.
"""

from __future__ import annotations

import collections
import decimal
import functools
import itertools
import json
import logging
import math
import os
import re
import secrets
import select
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tempest.exceptions import ConfigurationError
from tempest.queues import protocol

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.commands.core import Script as _Script
    from redis.exceptions import NoScriptError
    from redis.retry import Retry
except ImportError:  # the extra is not installed: RedisQueue() says how to fix it
    _DRIVER_MISSING = True
else:
    _DRIVER_MISSING = False

__all__ = ["RedisQueue"]

_log = logging.getLogger(__name__)

_CONNECT_TIMEOUT = 10.0
"""Seconds to wait for a connection unless the URL says otherwise."""

_SOCKET_TIMEOUT = 15.0
"""Seconds to wait for a reply unless the URL says otherwise (a hung server)."""

_MAX_WAIT = 5.0
"""Longest single BLMOVE, in seconds: well inside the socket timeout."""

_MIN_WAIT = 0.01
"""Shortest BLMOVE, in seconds: Redis reads a timeout under 1 ms as 0, which blocks forever."""

_FRESH = 0.25
"""Fraction of the lease within which a renewal is fresh: dequeue needs no script."""

_SWEEP_LIMIT = 50
"""Dead consumers one script recovers at most, so that it never holds Redis for long."""

_BATCH_LIMIT = 1000
"""Messages one ``dequeue_many`` takes at most, so that it never holds Redis for long."""

_PROMOTE_LIMIT = 1000
"""Due messages one script makes ready at most (the next script goes on)."""

_PRUNE_LIMIT = 1000
"""Fired slots one ``fire`` forgets at most."""

_RECHECK = 0.05
"""Seconds a consumer takes bare LMOVEs for, at most, before a script looks for
prioritised and due messages again (a wake token makes it look at once)."""

_PRECISE = 0.2
"""Seconds before a delayed message's time within which a waiting dequeue polls
instead of blocking: BLMOVE's timeout is only as precise as the server's ``hz``."""

_TTL_MAX = 1e11
"""The longest an engine record is kept, in seconds (about 3,000 years): ``PX`` takes
a 64-bit number of ms."""

_OUTCOMES_KEPT = 3900
"""Seconds an outcome bucket lives after its last count (the protocol promises one hour)."""

_POLL = 0.01
"""Seconds between two polls in that last stretch (an enqueue waits that long at most)."""

_SPARES = 64
"""Idle connections kept for the callers' commands (see _borrow); more are closed."""

_CONNECTION_ERRORS: tuple[type[Exception], ...] = ()
if not _DRIVER_MISSING:
    _CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError)

# -- Lua scripts ---------------------------------------------------------------------------
# Each runs atomically in Redis. ARGV[1] is the key prefix ``tempest:{NAME}:``:
# the scripts name the keys they need from it (other consumers' in-flight
# lists, the ready list of each priority) beside those declared in KEYS; the
# hash tag keeps them all in the declared keys' slot.

_TOKEN = b"\xffwake"
"""The wake token pushed into ``waiting``: never JSON, never a message (see "Keys")."""

_MARK = b"\xffp"
"""The start of a stored entry whose priority is not 0: ``\\xffp<priority>\\n<json>``."""

_FAILED_MARK = b"\xffa"
"""The start of a stored entry that failed before: ``\\xffa<attempts>,<first>\\n<entry>``."""

_RESULT_MARK = b"\xffr"
"""The start of a stored entry whose result is kept: ``\\xffr<ttl ms>\\n<entry>``,
outermost (before the failed-attempts header)."""

_MARKS = (_MARK, _FAILED_MARK, _RESULT_MARK)

_PRIORITY = re.compile(rb"-?[1-9][0-9]{0,9}")
"""A priority in a ``\\xffp`` header: an integer other than 0, at most 10 digits. Any
other header counts as priority 0 (it is skipped all the same)."""

_RECORD_FIELDS = ("task_id", "task", "args", "attempts", "error_type", "error", "traceback",
                  "last_failed_at")
"""What the engine's record for ``fail`` holds; the queue adds the rest of FAILED_FIELDS."""

_HEADERS = """\
local function unheaded(entry)  -- *entry* without its result and failed-attempts headers
    if string.sub(entry, 1, 2) == '\\255r' then  -- outermost
        local newline = string.find(entry, '\\n', 3, true)
        if newline then
            entry = string.sub(entry, newline + 1)
        end
    end
    if string.sub(entry, 1, 2) == '\\255a' then
        local newline = string.find(entry, '\\n', 3, true)
        if newline then
            return string.sub(entry, newline + 1)
        end
    end
    return entry
end
local function split_priority(entry)  -- of an unheaded entry: the priority (a string,
    -- nil for 0) and the message. As _header reads it: a priority header that is no
    -- integer counts as none (ZADD would refuse it, stranding the entry in
    -- waiting:<it>), and is skipped all the same.
    if string.sub(entry, 1, 2) == '\\255p' then
        local newline = string.find(entry, '\\n', 3, true)
        if newline then
            local p = string.sub(entry, 3, newline - 1)
            if not string.find(p, '^%-?[1-9]%d?%d?%d?%d?%d?%d?%d?%d?%d?$') then  -- _PRIORITY
                p = nil
            end
            return p, string.sub(entry, newline + 1)
        end
    end
    return nil, entry
end
"""

_COMMON = _HEADERS + """\
local prefix = ARGV[1]
local waiting, scheduled, priorities = prefix .. 'waiting', prefix .. 'scheduled',
    prefix .. 'priorities'
local TOKEN = '\\255wake'
local function num(x)  -- a number as Redis reads it back exactly
    return string.format('%.17g', x)
end
local function clock()  -- {lease clock (whole ms), schedule clock (ms, to the us)}
    local time = redis.call('TIME')
    local ms = tonumber(time[1]) * 1000
    return ms + math.floor(tonumber(time[2]) / 1000), ms + tonumber(time[2]) / 1000
end
local function priority_of(entry)  -- the priority as a string, nil for 0
    return (split_priority(unheaded(entry)))
end
local function body_of(entry)  -- the stored message without its attempts and priority
    local _, body = split_priority(unheaded(entry))
    return body
end
local function ready_list(entry)
    local p = priority_of(entry)
    if p then
        return prefix .. 'waiting:' .. p, p
    end
    return waiting, nil
end
"""

_READY = """\
local function wake()
    -- A BLMOVE waits only on an empty 'waiting': then a token for each consumer
    -- (the extra ones are dropped by the next takes); else one at the taking
    -- end, where a consumer taking bare LMOVEs meets it and looks again.
    if redis.call('LLEN', waiting) == 0 then
        local n = math.min(math.max(redis.call('ZCARD', prefix .. 'consumers'), 1), 64)
        for _ = 1, n do
            redis.call('RPUSH', waiting, TOKEN)
        end
    elseif redis.call('LINDEX', waiting, -1) ~= TOKEN then
        redis.call('RPUSH', waiting, TOKEN)
    end
end
local function make_ready(entry, front)  -- front: the taking end; returns the priority
    local list, p = ready_list(entry)
    if front then
        redis.call('RPUSH', list, entry)
    else
        redis.call('LPUSH', list, entry)
    end
    if p then
        redis.call('ZADD', priorities, p, p)
    end
    return p
end
local function promote(now, limit)  -- due messages, in due order; true if one has a priority
    local due = redis.call('ZRANGE', scheduled, '-inf', num(now), 'BYSCORE', 'LIMIT', 0, limit)
    local prioritised = false
    for _, member in ipairs(due) do
        if make_ready(string.sub(member, 17), false) then
            prioritised = true
        end
    end
    if #due > 0 then
        redis.call('ZREM', scheduled, unpack(due))
    end
    return prioritised
end
local function hint(now)
    -- -1: prioritised messages are ready (or due ones left to promote): take by
    -- script; -2: nothing else than 'waiting'; else ms until the next due time.
    if redis.call('EXISTS', priorities) == 1 then
        return -1
    end
    local first = redis.call('ZRANGE', scheduled, 0, 0, 'WITHSCORES')
    if #first == 0 then
        return -2
    end
    local left = tonumber(first[2]) - now
    if left <= 0 then
        return -1
    end
    return math.floor(left)
end
local function take_one(inflight)  -- the next ready message, moved; nil if none
    while true do
        local top = redis.call('ZRANGE', priorities, -1, -1)[1]
        local entry
        if top and tonumber(top) > 0 then
            entry = redis.call('LMOVE', prefix .. 'waiting:' .. top, inflight, 'RIGHT', 'LEFT')
        else
            entry = redis.call('RPOP', waiting)
            while entry == TOKEN do
                entry = redis.call('RPOP', waiting)
            end
            if entry then
                redis.call('LPUSH', inflight, entry)
                return entry
            end
            if not top then
                return nil
            end
            entry = redis.call('LMOVE', prefix .. 'waiting:' .. top, inflight, 'RIGHT', 'LEFT')
        end
        if entry then
            if redis.call('EXISTS', prefix .. 'waiting:' .. top) == 0 then
                redis.call('ZREM', priorities, top)
            end
            return entry
        end
        redis.call('ZREM', priorities, top)  -- an empty list (a late ack took its last)
    end
end
local function take(inflight, count, reply)  -- moves up to *count* onto *reply*
    if redis.call('EXISTS', priorities) == 0 then
        -- Only 'waiting' holds ready messages (the common case): no lookups.
        while count > 0 do
            local entry = redis.call('LMOVE', waiting, inflight, 'RIGHT', 'LEFT')
            if not entry then
                return
            end
            if entry == TOKEN then
                redis.call('LPOP', inflight)
            else
                reply[#reply + 1] = entry
                count = count - 1
            end
        end
        return
    end
    for _ = 1, count do
        local entry = take_one(inflight)
        if not entry then
            return
        end
        reply[#reply + 1] = entry
    end
end
local function store(entry, due, now)  -- ready now, or at *due* (ms)
    if due <= now then
        if make_ready(entry, false) then
            wake()
        end
        return
    end
    local first = redis.call('ZRANGE', scheduled, 0, 0, 'WITHSCORES')
    local seq = redis.call('INCR', prefix .. 'sequence')
    redis.call('ZADD', scheduled, num(due), string.format('%016.0f', seq) .. entry)
    if #first == 0 or due < tonumber(first[2]) then
        wake()  -- earlier than any a waiting consumer knows of
    end
end
"""

_CLAIM = _COMMON + _READY + """\
-- KEYS: waiting, inflight, consumers, deliveries, rejected, scheduled, priorities
-- ARGV: prefix, consumer, lease (ms), max_deliveries, poison reason, messages to
--       take (0 or more), sweep limit, drop a token from inflight (0/1), promote limit
-- Returns {registered anew (0/1), dead consumers recovered, hint, messages taken...}.
local inflight, consumers, deliveries, rejected = KEYS[2], KEYS[3], KEYS[4], KEYS[5]
if ARGV[8] == '1' then
    redis.call('LREM', inflight, 1, TOKEN)
end
local now, exact = clock()
-- Renew first: this consumer is never among the dead it recovers below.
local added = redis.call('ZADD', consumers, now + tonumber(ARGV[3]), ARGV[2])
local max_deliveries = tonumber(ARGV[4])
local dead = redis.call('ZRANGE', consumers, '-inf', now, 'BYSCORE', 'LIMIT', 0,
                        tonumber(ARGV[7]))
for _, consumer in ipairs(dead) do
    local list = prefix .. 'inflight:' .. consumer
    -- The newest entry is at the left: popping from there and pushing each onto
    -- the taking end of its ready list leaves the oldest to be taken first.
    local entry = redis.call('LPOP', list)
    while entry do
        if entry ~= TOKEN then
            local field = redis.sha1hex(entry)
            if redis.call('HINCRBY', deliveries, field, 1) >= max_deliveries then
                redis.call('HDEL', deliveries, field)
                redis.call('RPUSH', rejected, ARGV[5] .. '\\n' .. body_of(entry))
            else
                make_ready(entry, true)
            end
        end
        entry = redis.call('LPOP', list)
    end
    redis.call('ZREM', consumers, consumer)
end
promote(exact, tonumber(ARGV[9]))
local reply = {added, #dead, 0}
take(inflight, tonumber(ARGV[6]), reply)
if redis.call('EXISTS', priorities) == 1 then
    wake()  -- more prioritised messages ready: other consumers help
    reply[3] = -1
else
    reply[3] = hint(exact)
end
return reply
"""

_TAKING = """\
-- {1, hint, messages taken...}, oldest first; {0} unless this consumer's lease
-- is still running (then the caller runs _CLAIM, which renews it).
local function take_leased(inflight, consumers, consumer, count, promote_limit)
    local now, exact = clock()
    local leased_until = redis.call('ZSCORE', consumers, consumer)
    if not leased_until or tonumber(leased_until) <= now then
        return {0}
    end
    promote(exact, promote_limit)
    local reply = {1, 0}
    take(inflight, count, reply)
    if redis.call('EXISTS', priorities) == 1 then
        wake()
        reply[2] = -1
    else
        reply[2] = hint(exact)
    end
    return reply
end
"""

_TAKE = _COMMON + _READY + _TAKING + """\
-- KEYS: waiting, inflight, consumers, scheduled, priorities
-- ARGV: prefix, consumer, messages to take, drop a token from inflight (0/1),
--       promote limit
if ARGV[4] == '1' then
    redis.call('LREM', KEYS[2], 1, TOKEN)
end
return take_leased(KEYS[2], KEYS[3], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[5]))
"""

_STORE = _COMMON + _READY + """\
-- KEYS: waiting, scheduled, priorities, sequence
-- ARGV: prefix, entry, 'now' | 'delay' | 'at', delay or due time (ms), promote limit
-- Due messages are made ready first: one stored after their time comes after them.
local _, now = clock()
if promote(now, tonumber(ARGV[5])) then
    wake()
end
local due = now
if ARGV[3] == 'delay' then
    due = now + tonumber(ARGV[4])
elseif ARGV[3] == 'at' then
    due = tonumber(ARGV[4])
end
store(ARGV[2], due, now)
-- 1 if nothing is scheduled or prioritised: the next enqueues may be bare LPUSHes.
if redis.call('EXISTS', scheduled, priorities) == 0 then
    return 1
end
return 0
"""

_FIRE = _COMMON + _READY + """\
-- KEYS: waiting, scheduled, priorities, sequence, fired, slots
-- ARGV: prefix, entry, slot (exact repr), due time (ms), keep (ms), promote limit,
--       prune limit
-- Returns 1 if it recorded the slot and stored the message, 0 if the slot was
-- recorded already.
local fired, slots = KEYS[5], KEYS[6]
local _, now = clock()
local old = redis.call('ZRANGE', fired, '-inf', num(now - tonumber(ARGV[5])), 'BYSCORE',
                       'LIMIT', 0, tonumber(ARGV[7]))
if #old > 0 then
    redis.call('ZREM', fired, unpack(old))
    redis.call('ZREM', slots, unpack(old))
end
if redis.call('ZADD', fired, 'NX', num(now), ARGV[3]) == 0 then
    return 0
end
redis.call('ZADD', slots, ARGV[3], ARGV[3])
if promote(now, tonumber(ARGV[6])) then
    wake()
end
store(ARGV[2], tonumber(ARGV[4]), now)
return 1
"""

_COUNT = _COMMON + """\
-- KEYS: waiting, scheduled, priorities    ARGV: prefix
-- Returns {ready messages (not leased), messages whose time has not come}.
local _, now = clock()
local ready = redis.call('LLEN', waiting)
    - #redis.call('LPOS', waiting, TOKEN, 'COUNT', 0)
for _, p in ipairs(redis.call('ZRANGE', priorities, 0, -1)) do
    ready = ready + redis.call('LLEN', prefix .. 'waiting:' .. p)
end
local later = redis.call('ZCOUNT', scheduled, '(' .. num(now), '+inf')
return {ready + redis.call('ZCARD', scheduled) - later, later}
"""

_ACKING = """\
-- A message no longer in flight here: this consumer's lease ran out and it was
-- recovered. If it still waits, no one has run it again yet: remove it there
-- (from waiting:<p> for a priority p other than 0).
local function ack(inflight, waiting, deliveries, first)  -- ARGV[first], ... acked
    local counted = redis.call('EXISTS', deliveries) == 1
    local settled = 0
    for i = first, #ARGV do
        local entry = ARGV[i]
        local found = redis.call('LREM', inflight, 1, entry) == 1
        if not found then
            local list, p = waiting, (split_priority(unheaded(entry)))
            if p then  -- where make_ready put it: waiting:<p>
                list = list .. ':' .. p
            end
            found = redis.call('LREM', list, -1, entry) == 1
        end
        if found then
            settled = settled + 1
            if counted then
                redis.call('HDEL', deliveries, redis.sha1hex(entry))
            end
        end
    end
    return settled
end
"""

_ACK = _HEADERS + _ACKING + """\
-- KEYS: inflight, waiting, deliveries    ARGV: messages (one or many acks at once)
-- Only the ack itself: the path every message takes stays short.
return ack(KEYS[1], KEYS[2], KEYS[3], 1)
"""

_ACK_TAKE = _COMMON + _READY + _ACKING + _TAKING + """\
-- KEYS: waiting, inflight, consumers, scheduled, priorities, deliveries
-- ARGV: prefix, consumer, messages to take, promote limit, acked messages
-- The acks of ARGV[5], ..., then the take of _TAKE, atomically; the reply as _TAKE's
-- (the ack is done either way).
ack(KEYS[2], KEYS[1], KEYS[6], 5)
return take_leased(KEYS[2], KEYS[3], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]))
"""

_REJECT = _COMMON + """\
-- KEYS: inflight, waiting, deliveries, rejected    ARGV: prefix, message, reason
local entry = ARGV[2]
if redis.call('LREM', KEYS[1], 1, entry) == 0
        and redis.call('LREM', ready_list(entry), -1, entry) == 0 then
    return 0  -- another consumer holds it now, and will settle it itself
end
redis.call('HDEL', KEYS[3], redis.sha1hex(entry))
redis.call('RPUSH', KEYS[4], ARGV[3] .. '\\n' .. body_of(entry))
return 1
"""

_REQUEUE = _COMMON + _READY + """\
-- KEYS: inflight, waiting, priorities    ARGV: prefix, message
-- Only what is still in flight here goes back: never a second copy. A wake
-- token (a stray) is only dropped.
local entry = ARGV[2]
if redis.call('LREM', KEYS[1], 1, entry) == 1 then
    if entry == TOKEN then
        return 0
    end
    if make_ready(entry, true) then
        wake()
    end
    return 1
end
return 0
"""

_UNLEASE = """\
local function unlease(inflight, deliveries, entry)
    -- Settle *entry* as ack does: from this consumer's in-flight list, else
    -- (its lease ran out and it was recovered, but no one took it yet) from its
    -- ready list. False if it is in neither: another consumer holds it now.
    if redis.call('LREM', inflight, 1, entry) == 0
            and redis.call('LREM', ready_list(entry), -1, entry) == 0 then
        return false
    end
    redis.call('HDEL', deliveries, redis.sha1hex(entry))
    return true
end
"""

_RETRY = _COMMON + _READY + _UNLEASE + """\
-- KEYS: inflight, waiting, deliveries, scheduled, priorities, sequence
-- ARGV: prefix, leased entry, entry to store (one attempt more), delay (ms),
--       promote limit
-- Returns 1, or 0 (storing nothing) if the leased entry is held by no one here.
if not unlease(KEYS[1], KEYS[3], ARGV[2]) then
    return 0
end
local _, now = clock()
if promote(now, tonumber(ARGV[5])) then
    wake()
end
store(ARGV[3], now + tonumber(ARGV[4]), now)
return 1
"""

_FAILED = """\
local failed, by_time, expires = prefix .. 'failed', prefix .. 'failed:by_time',
    prefix .. 'failed:expires'
local function seconds_now()  -- the server's clock, POSIX seconds
    local time = redis.call('TIME')
    return tonumber(time[1]) + tonumber(time[2]) / 1000000
end
local function live(id, now)  -- the entry of *id* exists and expires after *now*
    local at = redis.call('ZSCORE', expires, id)
    return at and tonumber(at) > now
end
local function forget(ids)
    if #ids > 0 then
        redis.call('HDEL', failed, unpack(ids))
        redis.call('ZREM', by_time, unpack(ids))
        redis.call('ZREM', expires, unpack(ids))
    end
end
"""

_FAIL = _COMMON + _UNLEASE + _FAILED + """\
-- KEYS: inflight, waiting, deliveries, failed, failed:by_time, failed:expires
-- ARGV: prefix, leased entry, task id, stored value, last_failed_at, expires_at
--       (POSIX seconds), keep, prune limit
-- Returns how many entries the bounds dropped, or -1 (storing nothing) if the
-- leased entry is held by no one here.
if not unlease(KEYS[1], KEYS[3], ARGV[2]) then
    return -1
end
local id, limit = ARGV[3], tonumber(ARGV[8])
redis.call('HSET', failed, id, ARGV[4])
redis.call('ZADD', by_time, ARGV[5], id)
redis.call('ZADD', expires, ARGV[6], id)
local old = redis.call('ZRANGE', expires, '-inf', num(seconds_now()), 'BYSCORE', 'LIMIT', 0,
                       limit)
forget(old)
local dropped = #old
local over = math.min(redis.call('HLEN', failed) - tonumber(ARGV[7]), limit)
if over > 0 then
    local oldest = redis.call('ZRANGE', by_time, 0, over - 1)
    forget(oldest)
    dropped = dropped + #oldest
end
return dropped
"""

_LIST_FAILED = _COMMON + _FAILED + """\
-- KEYS: failed, failed:by_time, failed:expires    ARGV: prefix, limit, offset
-- Returns the stored values of entries not expired, latest last_failed_at first.
local now = seconds_now()
local limit, skip = tonumber(ARGV[2]), tonumber(ARGV[3])
local reply = {}
local start = 0
if redis.call('ZCOUNT', expires, '-inf', num(now)) == 0 then
    start, skip = skip, 0  -- nothing expired: no entry to look at one by one
end
while #reply < limit do
    local ids = redis.call('ZREVRANGE', by_time, start, start + 999)
    if #ids == 0 then
        break
    end
    for _, id in ipairs(ids) do
        if live(id, now) then
            if skip > 0 then
                skip = skip - 1
            else
                reply[#reply + 1] = redis.call('HGET', failed, id)
                if #reply == limit then
                    break
                end
            end
        end
    end
    start = start + 1000
end
return reply
"""

_FIND_FAILED = _COMMON + _FAILED + """\
-- KEYS: failed, failed:expires    ARGV: prefix, task id ('': the count instead)
-- Returns the stored value of the entry, nil if none (or expired); or how many
-- entries have not expired.
local now = seconds_now()
if ARGV[2] == '' then
    return redis.call('ZCOUNT', expires, '(' .. num(now), '+inf')
end
if live(ARGV[2], now) then
    return redis.call('HGET', failed, ARGV[2])
end
return false
"""

_RETRY_FAILED = _COMMON + _READY + _FAILED + """\
-- KEYS: waiting, scheduled, priorities, sequence, failed, failed:by_time,
--       failed:expires
-- ARGV: prefix, task id ('': the entries that failed longest ago), how many of
--       those, promote limit
-- Returns {entries stored ready again, entries looked at (expired ones dropped)}.
local _, now = clock()
local ids = {ARGV[2]}
if ARGV[2] == '' then
    ids = redis.call('ZRANGE', by_time, 0, tonumber(ARGV[3]) - 1)
end
if promote(now, tonumber(ARGV[4])) then
    wake()
end
local moved, gone = 0, {}
for _, id in ipairs(ids) do
    local value = redis.call('HGET', failed, id)
    if value then
        if live(id, now / 1000) then
            -- The value is the entry's JSON, a newline (JSON holds none), the message.
            store(string.sub(value, string.find(value, '\\n', 1, true) + 1), now, now)
            moved = moved + 1
        end
        gone[#gone + 1] = id
    end
end
forget(gone)
return {moved, #ids}
"""

_STORING = """\
local function store_result(key, head, comma, ttl, ttl_ms)
    -- Replaces the record of list *key*: the JSON *head* without its closing
    -- brace, *comma* (',', or '' for an empty record), expires_at (the server's
    -- clock + *ttl* seconds) and the brace; the list expires in *ttl_ms*. Its one
    -- element is what each waiter's BLMOVE rotates onto the same list for the next.
    local time = redis.call('TIME')
    local expires_at = tonumber(time[1]) + tonumber(time[2]) / 1000000 + tonumber(ttl)
    redis.call('DEL', key)
    redis.call('RPUSH', key, head .. comma .. '"expires_at":'
        .. string.format('%.17g', expires_at) .. '}')
    redis.call('PEXPIRE', key, ttl_ms)
end
"""

_STORE_RESULT = _STORING + """\
-- KEYS: result:<id>
-- ARGV: the record's JSON without its closing brace, ',' (or '' for an empty
--       record), ttl (seconds), ttl (whole ms, at least 1)
-- No shared prelude: nothing else.
store_result(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4])
return 1
"""

_STORE_RESULT_ACK = _HEADERS + _ACKING + _STORING + """\
-- KEYS: result:<id>, inflight, waiting, deliveries
-- ARGV: as _STORE_RESULT's, then the in-flight entry of the task's message
-- The result stored, then the message acked as _ACK does, atomically: never
-- one without the other. Returns how many entries the ack settled (0 or 1).
store_result(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4])
return ack(KEYS[2], KEYS[3], KEYS[4], 5)
"""

_DELETE_FAILED = _COMMON + _FAILED + """\
-- KEYS: failed, failed:by_time, failed:expires    ARGV: prefix, task id ('': all)
-- Returns how many entries (not expired) it forgot.
local now = seconds_now()
if ARGV[2] == '' then
    local count = redis.call('ZCOUNT', expires, '(' .. num(now), '+inf')
    redis.call('DEL', failed, by_time, expires)
    return count
end
local was = live(ARGV[2], now)
forget({ARGV[2]})
return was and 1 or 0
"""

_PEEK = _COMMON + """\
-- KEYS: waiting, scheduled, priorities    ARGV: prefix, limit, offset, due limit
-- Returns the entries of the ready messages in the order the takes hand them out,
-- *offset* skipped, *limit* at most: by priority (positive ones, 'waiting', negative
-- ones), each list from its taking end, then the due members of 'scheduled' that no
-- script made ready yet (the next one pushes them, in due order, at the back of their
-- list). Wake tokens are skipped. Reads only.
local _, now = clock()
local want, skip = tonumber(ARGV[2]), tonumber(ARGV[3])
local reply = {}
local due_of, seen, order = {}, {['0'] = true}, {0}
local function note(p)
    if not seen[p] then
        seen[p] = true
        order[#order + 1] = tonumber(p)
    end
end
for _, p in ipairs(redis.call('ZRANGE', priorities, 0, -1)) do
    note(p)
end
local due = redis.call('ZRANGE', scheduled, '-inf', num(now), 'BYSCORE', 'LIMIT', 0,
                       tonumber(ARGV[4]))
for _, member in ipairs(due) do
    local entry = string.sub(member, 17)
    local p = priority_of(entry) or '0'
    note(p)
    due_of[p] = due_of[p] or {}
    table.insert(due_of[p], entry)
end
table.sort(order, function(a, b) return a > b end)
local function tokens_within(list, n)  -- wake tokens among the n entries at the taking end
    return #redis.call('LPOS', list, TOKEN, 'RANK', -1, 'COUNT', 0, 'MAXLEN', n)
end
local function from_list(list, tokens)
    local length = redis.call('LLEN', list)
    local index = 0  -- entries from the taking end passed over so far
    if skip > 0 and length > 0 then
        if not tokens then
            index = math.min(skip, length)
            skip = skip - index
        else
            -- The fewest entries from the taking end that hold *skip* messages:
            -- LPOS counts the tokens among them, in C, without copying any.
            local span = math.min(skip, length)
            local found = tokens_within(list, span)
            while span - found < skip and span < length do
                span = math.min(skip + found, length)
                found = tokens_within(list, span)
            end
            index = span
            skip = skip - (span - found)
        end
    end
    while want > 0 and index < length do
        local chunk = math.min(want + 64, length - index)
        local items = redis.call('LRANGE', list, -(index + chunk), -(index + 1))
        for i = #items, 1, -1 do
            if items[i] ~= TOKEN then
                if skip > 0 then
                    skip = skip - 1
                else
                    reply[#reply + 1] = items[i]
                    want = want - 1
                    if want == 0 then
                        return
                    end
                end
            end
        end
        index = index + chunk
    end
end
for _, p in ipairs(order) do
    if want == 0 then
        break
    end
    if p == 0 then
        from_list(waiting, true)
    else
        from_list(prefix .. 'waiting:' .. p, false)
    end
    for _, entry in ipairs(due_of[tostring(p)] or {}) do
        if want == 0 then
            break
        end
        if skip > 0 then
            skip = skip - 1
        else
            reply[#reply + 1] = entry
            want = want - 1
        end
    end
end
return reply
"""

_PEEK_SCHEDULED = _COMMON + """\
-- KEYS: scheduled    ARGV: prefix, limit, offset
-- Returns member, score (due, ms), ... of the members whose time has not come, the
-- soonest first. Reads only.
local _, now = clock()
return redis.call('ZRANGE', scheduled, '(' .. num(now), '+inf', 'BYSCORE', 'LIMIT',
                  tonumber(ARGV[3]), tonumber(ARGV[2]), 'WITHSCORES')
"""

_FIND = _COMMON + """\
-- KEYS: a list or zset of this queue    ARGV: prefix, 'list' | 'zset', start, count,
--       needle (the JSON a message of the id starts with: ["<id>")
-- Looks at *count* entries from *start*: returns {the next start (-1 at the end), the
-- server's clock (ms), entry, score, ...} of those whose message starts with the needle
-- (score 0 for a list). Reads only, a bounded number: a search takes many calls, and
-- other commands run between them.
local _, now = clock()
local start, count, needle = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local items
if ARGV[2] == 'zset' then
    items = redis.call('ZRANGE', KEYS[1], start, start + count - 1, 'WITHSCORES')
else
    items = redis.call('LRANGE', KEYS[1], start, start + count - 1)
end
local reply = {0, now}
local step = ARGV[2] == 'zset' and 2 or 1
local seen = 0
for i = 1, #items, step do
    seen = seen + 1
    local entry = items[i]
    if step == 2 then
        entry = string.sub(entry, 17)
    end
    local body = body_of(entry)
    local next = string.sub(body, #needle + 1, #needle + 1)
    if string.sub(body, 1, #needle) == needle and (next == ',' or next == ']') then
        reply[#reply + 1] = entry
        reply[#reply + 1] = step == 2 and items[i + 1] or '0'
    end
end
reply[1] = seen < count and -1 or start + count
return reply
"""

_ANNOUNCE = """\
-- KEYS: engines (the index), engine:<id>    ARGV: engine id, record, ttl (ms)
-- The record, expiring by itself (PX), and its expiry in the index, pruned here of
-- the engines that expired (readers only read) and expiring with its last member.
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIREAT', KEYS[1], redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')[2])
return 1
"""

_ENGINES = """\
-- KEYS: engines (the index)    ARGV: prefix
-- Returns engine id, record, ... of the live engines. Only reads: the members that
-- expired (announce prunes them) are left out by their score.
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local reply = {}
local live = redis.call('ZRANGE', KEYS[1], string.format('(%d', now), '+inf', 'BYSCORE')
for _, id in ipairs(live) do
    local record = redis.call('GET', ARGV[1] .. 'engine:' .. id)
    if record then
        reply[#reply + 1] = id
        reply[#reply + 1] = record
    end
end
return reply
"""

_ADD_OUTCOMES = """\
-- KEYS: outcomes:<minute>, outcomes (the index)
-- ARGV: minute, keep (s), outcome, count, ...
-- Adds to the minute's hash, which expires *keep* seconds after its last count; the
-- index (minute -> that expiry, ms) lets readers find the hashes without a scan.
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
for i = 3, #ARGV, 2 do
    redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]) * 1000, ARGV[1])
redis.call('PEXPIREAT', KEYS[2], redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')[2])
return 1
"""

_OUTCOMES = """\
-- KEYS: outcomes (the index)    ARGV: prefix, since (POSIX seconds)
-- Returns minute, {outcome, count, ...}, ... of the live buckets from *since* on.
-- Only reads: the minutes that expired (add_outcomes prunes them) are left out.
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local reply = {}
local live = redis.call('ZRANGE', KEYS[1], string.format('(%d', now), '+inf', 'BYSCORE')
for _, minute in ipairs(live) do
    if tonumber(minute) >= tonumber(ARGV[2]) then
        local counts = redis.call('HGETALL', ARGV[1] .. 'outcomes:' .. minute)
        if #counts > 0 then
            reply[#reply + 1] = minute
            reply[#reply + 1] = counts
        end
    end
end
return reply
"""


class _Raw(bytes):
    """A stored message that is not a JSON list, handed to the engine as stored.

    A fresh object each time (``bytes`` caches the empty and one-byte values):
    the queue finds the in-flight entry again by the identity of what
    ``dequeue`` returned.
    """

    __slots__ = ()


class RedisQueue:
    """A durable queue in Redis, shared by many engines on many machines.

    ``url`` is a redis-py URL (``redis://[[user]:password@]host:6379/0``,
    ``rediss://`` for TLS, ``unix:///path/redis.sock``); ``name`` names the
    queue: its keys all start with ``tempest:{name}:`` (see the module
    docstring). Delivery is **at-least-once**: a dequeued message moves
    atomically to this consumer's own in-flight list and stays there until
    the engine acks it (its outcome is final: success, failure or timeout).

    Leases
        Each queue object is one consumer (see :attr:`consumer`), leased for
        ``lease`` seconds (default 30) and renewed by ``heartbeat()``, which
        the engine calls every ``heartbeat_interval`` seconds (default a third
        of the lease), and by ``dequeue`` whenever the last renewal is more
        than a quarter lease old. When an engine dies, its lease runs out and
        the next heartbeat (or dequeue that finds the queue empty, or renews)
        of any engine pushes its in-flight messages back to the front of the
        queue. Lease times use the Redis server's clock.
    Poison
        A message that came back this way ``max_deliveries`` times (default 5)
        -- it keeps killing the engines that take it -- is moved to the
        ``rejected`` list with the reason ``TooManyDeliveries`` instead of
        being handed out again. ``rejected()`` lists it with the messages the
        engine rejected as bad input.
    Waiting
        ``dequeue(timeout=...)`` blocks in ``BLMOVE``: an idle engine wakes the
        moment a message is enqueued, without polling; a wake token wakes it
        for a prioritised message, or a delayed one due earlier than it knew.
    Scheduling
        ``schedule(m, delay=, at=, priority=)``, ``scheduled_count()``,
        ``fire()`` and ``last_fired()`` (see :mod:`tempest.queues.protocol`),
        on the server's clock. A waiting dequeue blocks no later than a fifth
        of a second before the next due time, then polls: a delayed message is
        taken within a few ms of its time.
    Retries and the failed store
        ``attempts()``, ``retry()``, ``fail()``, ``failed()``,
        ``failed_count()``, ``find_failed()``, ``retry_failed()``,
        ``retry_failed_all()``, ``delete_failed()`` and ``purge_failed()`` (see
        :mod:`tempest.queues.protocol`): the attempt count travels in the
        stored message, each step is one script, times are the server's.
    Results
        ``schedule(m, result_ttl=)``, ``result_ttl()``, ``store_result()`` and
        ``result()`` (see :mod:`tempest.queues.protocol`): the ttl travels in
        the stored message as the attempt count does, ``store_result`` is one
        script, and a waiting ``result`` blocks in ``BLMOVE`` on the task's
        wake list, woken the moment the record is stored (see "Results" in the
        module docstring).
    Engines and inspection
        ``announce()``, ``engines()``, ``forget_engine()``, ``add_outcomes()``,
        ``outcomes()``; ``peek()``, ``peek_scheduled()``, ``rejected(limit,
        offset)``, ``rejected_count()`` and ``find()`` (see
        :mod:`tempest.queues.protocol`): keys of their own, read by read-only
        scripts (only ``announce`` and ``add_outcomes`` prune them; see
        "Engines, outcomes and inspection" in the module docstring).
    Batches
        ``dequeue_many(n, timeout=...)`` takes up to *n* messages in one round
        trip (the engine asks for one per free worker): the first as
        ``dequeue`` would, then whatever else waits. Each is leased and settled
        on its own.
    Outages
        redis-py's own retries are off (a retried move could strand a message):
        a ``dequeue`` or ``heartbeat`` that meets a connection error raises it
        (``redis.ConnectionError``) and the engine logs it and retries with a
        backoff, reconnecting; an ``ack``, ``reject`` or ``requeue`` is kept and
        retried at the next heartbeat or dequeue, with a warning logged on the
        ``tempest.queues.redis`` logger. A restarted Redis loses nothing it had
        persisted (use ``appendonly yes``).

    Thread-safe: redis-py's connection pool gives each concurrent call a
    connection of its own (a waiting ``BLMOVE`` holds one), so workers ack while
    the engine's leader waits for a message. Two connections skip the pool, for
    speed: one for dequeues (one thread at a time; a concurrent dequeue uses the
    pool) and one for the thread sending acks, which sends those of every
    thread that acks meanwhile in the same round trip. Unless the URL sets
    them, connections get ``socket_connect_timeout=10`` and
    ``socket_timeout=15``. Fork-safe: a child process opens its own
    connections and is a new consumer.
    """

    name: str
    """The queue's name: its keys start with ``tempest:{name}:``."""

    prefix: str
    """``tempest:{name}:``, the start of every key of this queue."""

    lease: float
    """Seconds a consumer's messages stay leased without a heartbeat or dequeue."""

    max_deliveries: int
    """Deliveries without an outcome before a message is set aside as poison."""

    heartbeat_interval: float
    """Seconds between the engine's calls to ``heartbeat()``; a third of the lease."""

    consumer: str
    """This queue object's consumer id, ``host:pid:random``: its in-flight list is
    ``tempest:{name}:inflight:<consumer>``."""

    def __init__(self, url: str, name: str = "tempest", *,
                 lease: float = protocol.DEFAULT_LEASE,
                 max_deliveries: int = protocol.DEFAULT_MAX_DELIVERIES,
                 heartbeat_interval: float | None = None) -> None:
        if _DRIVER_MISSING:
            raise ConfigurationError(
                "RedisQueue needs the redis driver: pip install 'task-tempest[redis]'")
        if not isinstance(name, str) or not name or "{" in name or "}" in name:
            raise ConfigurationError(
                f"RedisQueue: name must be a non-empty str without braces (it is the "
                f"keys' hash tag), not {name!r}")
        self.name = name
        self.prefix = f"tempest:{{{name}}}:"
        self.lease, self.heartbeat_interval, self.max_deliveries = protocol.lease_options(
            "RedisQueue", lease, heartbeat_interval, max_deliveries)
        if not isinstance(url, str):
            raise ConfigurationError(f"RedisQueue: url must be a str, not {type(url).__name__}")
        try:
            # No connection yet: redis-py connects on first use. Retries off: see
            # "Outages" in the class docstring. URL query options win over these.
            client: Any = redis.Redis.from_url(
                url, socket_connect_timeout=_CONNECT_TIMEOUT, socket_timeout=_SOCKET_TIMEOUT,
                retry=Retry(NoBackoff(), 0))
        except ValueError as exc:
            # redis-py's message names the faulty part; the URL itself may hold a password.
            raise ConfigurationError(f"RedisQueue: the url cannot be parsed: {exc}") from None
        kwargs = client.connection_pool.connection_kwargs
        # Messages may be any bytes (an undecodable one is handed over raw):
        # replies stay bytes whatever the URL says.
        kwargs["decode_responses"] = False
        socket_timeout = kwargs.get("socket_timeout")
        self._max_wait = min(_MAX_WAIT, self.lease / 2,
                             socket_timeout / 2 if socket_timeout else math.inf)
        self._result_wait = min(_MAX_WAIT, socket_timeout / 2 if socket_timeout else math.inf)
        """Longest single BLMOVE of a ``result`` wait: well inside the socket timeout."""
        self._client = client
        self._waiting = self.prefix + "waiting"
        self._consumers = self.prefix + "consumers"
        self._deliveries = self.prefix + "deliveries"
        self._rejected = self.prefix + "rejected"
        self._scheduled = self.prefix + "scheduled"
        self._priorities = self.prefix + "priorities"
        self._sequence = self.prefix + "sequence"
        self._engines = self.prefix + "engines"
        self._outcomes = self.prefix + "outcomes"
        self._failed_keys = [self.prefix + "failed", self.prefix + "failed:by_time",
                             self.prefix + "failed:expires"]
        # Registered once: redis-py runs them by SHA and loads them again when a
        # restarted server has forgotten them.
        self._claim_script = client.register_script(_CLAIM)
        self._take_script = client.register_script(_TAKE)
        self._ack_take_script = client.register_script(_ACK_TAKE)
        self._store_script = client.register_script(_STORE)
        self._fire_script = client.register_script(_FIRE)
        self._count_script = client.register_script(_COUNT)
        self._settle_scripts = {"ack": client.register_script(_ACK),
                                "reject": client.register_script(_REJECT),
                                "requeue": client.register_script(_REQUEUE),
                                "retry": client.register_script(_RETRY),
                                "fail": client.register_script(_FAIL)}
        self._list_failed_script = client.register_script(_LIST_FAILED)
        self._find_failed_script = client.register_script(_FIND_FAILED)
        self._retry_failed_script = client.register_script(_RETRY_FAILED)
        self._delete_failed_script = client.register_script(_DELETE_FAILED)
        self._store_result_script = client.register_script(_STORE_RESULT)
        self._store_result_ack_script = client.register_script(_STORE_RESULT_ACK)
        self._peek_script = client.register_script(_PEEK)
        self._peek_scheduled_script = client.register_script(_PEEK_SCHEDULED)
        self._find_script = client.register_script(_FIND)
        self._announce_script = client.register_script(_ANNOUNCE)
        self._engines_script = client.register_script(_ENGINES)
        self._add_outcomes_script = client.register_script(_ADD_OUTCOMES)
        self._outcomes_script = client.register_script(_OUTCOMES)
        self._new_identity()

    def _new_identity(self) -> None:
        self._forks = protocol.forks()
        self.consumer = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._inflight = f"{self.prefix}inflight:{self.consumer}"
        self._leases = protocol.Leases()
        # Guards the bookkeeping below (a fresh one in a forked child: the
        # parent's might have been held by another thread at the fork).
        self._cond = threading.Condition()
        self._moving = 0
        """Dequeues between sending a move and holding its result: strays unknowable."""
        self._reconciling = False
        self._suspect = False
        """A move failed: this consumer's in-flight list may hold a stray."""
        self._settling: collections.Counter[bytes] = collections.Counter()
        self._deferred: list[tuple[str, bytes, tuple[Any, ...]]] = []
        """(action, in-flight entry, the script's other arguments) of settlements that met
        a connection error."""
        self._deferred_lock = threading.Lock()
        self._registered = False
        self._renewed_at = -math.inf
        """When (monotonic) this consumer's lease was last renewed, at the latest."""
        self._found_none = False
        """The last waiting dequeue found nothing (see _fetch)."""
        self._due_at = -math.inf
        """When (monotonic) the next delayed message is due, as the last script saw it:
        inf if none waits, -inf while prioritised (or due) messages are ready."""
        self._checked_at = -math.inf
        """When (monotonic) a script last looked for prioritised and due messages."""
        self._plain_until = -math.inf
        """Until when (monotonic) enqueue may be a bare LPUSH: the last store script,
        less than _RECHECK before, saw nothing scheduled or prioritised."""
        self._acks: list[bytes] = []
        """Acked entries waiting for the ack being sent (see ack)."""
        self._flushing = False
        # Dedicated connections, made on first use (see _mover); a forked child
        # must not use its parent's.
        self._mover_lock = threading.Lock()
        self._mover_client: Any = None
        self._acker: Any = None
        self._spares: list[Any] = []
        """Idle single-connection clients for the commands of any thread (see _borrow)."""

    # -- the queue protocol ---------------------------------------------------------

    def enqueue(self, message: Any) -> None:
        """Store *message* (as JSON) at the back of the queue; wakes a waiting dequeue.

        ``schedule(message)``: priority 0, ready now, after any delayed message
        whose time has come.

        While the last store script of this object, less than 50 ms before,
        saw nothing scheduled or prioritised, a bare ``LPUSH`` does the same
        in one command (see "Delayed and prioritised messages").
        """
        if time.monotonic() < self._plain_until:
            self._lpush(protocol.encode(message))
            return
        self._store(message, "now", 0, 0)

    def schedule(self, message: Any, *, delay: float | None = None,
                 at: float | None = None, priority: int = 0,
                 result_ttl: float | None = None) -> None:
        """Store *message* to become ready after *delay* seconds or at POSIX time *at*.

        Times are the Redis server's clock; a time that has come already means
        now. Among ready messages, higher *priority* first. One script, atomic:
        stored when this returns. Wakes a waiting dequeue when the message is
        ready with a priority, or due earlier than any other delayed one.

        *result_ttl* (seconds > 0): the message asks for its result, to be kept
        that long; stored with it as the ``\\xffr`` header (see "Results" in
        the module docstring) and read back by ``result_ttl(m)``. Ready now
        and of priority 0, it takes enqueue's bare ``LPUSH`` when enqueue would.
        """
        head = b"" if result_ttl is None else _result_head(result_ttl)
        if (delay is None and at is None and priority == 0 and head
                and time.monotonic() < self._plain_until):
            # Only its result header differs from a plain enqueue: the same
            # bare LPUSH (see enqueue) while nothing is scheduled or prioritised.
            self._lpush(head + _entry(message, 0))
            return
        if delay is not None:
            self._store(message, "delay", delay * 1000, priority, head)
        elif at is not None:
            self._store(message, "at", at * 1000, priority, head)
        else:
            self._store(message, "now", 0, priority, head)

    def scheduled_count(self) -> int:
        """Messages waiting for their time (on the server's clock)."""
        return int(self._counts()[1])

    def fire(self, schedule: str, slot: float, message: Any, *, priority: int = 0,
             keep: float) -> bool:
        """Store *message* for POSIX time *slot* unless that slot of *schedule* fired already.

        One script records the slot and stores the message, atomically: True
        if it did, False (storing nothing) if the slot is recorded already.
        Slots recorded more than *keep* seconds ago are forgotten then.
        """
        self._check_fork()
        self._plain_until = -math.inf  # enqueues look again: this one may be scheduled
        fired = self._fire_script(
            keys=[self._waiting, self._scheduled, self._priorities, self._sequence,
                  f"{self.prefix}fired:{schedule}", f"{self.prefix}slots:{schedule}"],
            args=[self.prefix, _entry(message, priority), repr(float(slot)),
                  repr(float(slot) * 1000), repr(float(keep) * 1000), _PROMOTE_LIMIT,
                  _PRUNE_LIMIT])
        return bool(int(fired))

    def last_fired(self, schedule: str) -> float | None:
        """The latest slot of *schedule* still remembered, or None."""
        latest = self._client.zrange(f"{self.prefix}slots:{schedule}", -1, -1)
        return float(latest[0]) if latest else None

    def dequeue(self, timeout: float | None = None) -> Any:
        """Lease the next message; wait up to *timeout* seconds for one; None if none.

        What the queue cannot decode is returned raw (bytes), for the engine
        to reject. A connection error propagates (the engine retries).
        """
        messages = self._fetch(1, timeout)
        return messages[0] if messages else None

    def dequeue_many(self, count: int, timeout: float | None = None) -> list[Any]:
        """Lease up to *count* messages in order; wait up to *timeout* seconds for the first.

        One round trip takes the batch (at most ``1000``): the first message as
        ``dequeue(timeout=)`` would take it, then whatever else waits right
        now, up to *count*. An empty list if nothing came within *timeout*
        (at once for a *count* below 1).
        Each message is leased, counted and settled on its own, as if
        ``dequeue`` had returned it. A connection error propagates (the engine
        retries).
        """
        count = protocol.whole_count("RedisQueue.dequeue_many", count)
        if count < 1:
            return []
        return self._fetch(min(count, _BATCH_LIMIT), timeout)

    def ack(self, message: Any) -> None:
        """The message's outcome is final: remove it from this consumer's in-flight list.

        Acks from several threads share round trips: while one thread sends
        acks, the others only add theirs to the next batch, which that thread
        sends before it returns. So an ``ack`` may return a round trip before
        its removal reaches Redis; a crash meanwhile runs the message again,
        as a crash just before the ack would.
        """
        self._ack_entries([self._take(message, "ack")])

    def _ack_entries(self, entries: list[bytes]) -> None:
        """Ack the taken *entries* as ``ack`` does: in the next batch of acks."""
        if entries:
            with self._cond:
                self._acks.extend(entries)
            self._flush_acks()

    def ack_and_dequeue(self, messages: list[Any], count: int) -> list[Any]:
        """``ack`` every message of *messages*, then ``dequeue_many(count)`` without
        waiting, in one script (*count* 0: the acks alone, in one round trip).

        The engine calls it as a worker that has just finished a message takes
        its next ones, with the acks other workers handed it meanwhile: one
        round trip instead of several. Atomic in Redis: the acks and the
        leases are stored together. With this consumer's lease not renewed a
        moment ago (``_FRESH``), or settlements deferred by an outage, it
        acks, then dequeues, as two calls would. A connection error defers
        the acks (kept, retried at the next heartbeat or dequeue, as ``ack``
        does) and returns no message: what Redis may have moved for a reply
        that never came is given back by the next dequeue.
        """
        count = protocol.whole_count("RedisQueue.ack_and_dequeue", count)
        messages = protocol.settling("RedisQueue.ack_and_dequeue", messages)
        entries: list[bytes] = []
        try:
            for message in messages:
                entries.append(self._take(message, "ack"))
        except BaseException:
            self._ack_entries(entries)  # the ones before the message it does not hold
            raise
        if count < 1 or self._deferred or not self._fresh():
            self._ack_entries(entries)
            return self.dequeue_many(count)
        self._start_move()
        failed = True
        try:
            with self._mover() as client:
                sent = time.monotonic()
                reply = _run_script(
                    client, self._ack_take_script,
                    [self._waiting, self._inflight, self._consumers, self._scheduled,
                     self._priorities, self._deliveries],
                    [self.prefix, self.consumer, min(count, _BATCH_LIMIT), _PROMOTE_LIMIT,
                     *entries])
            taken = bool(int(reply[0]))
            if taken:
                # Nothing taken: nothing was waiting a moment ago, so the next
                # waiting dequeue may go straight to BLMOVE (see _fetch).
                self._found_none = len(reply) == 2
                self._note_hint(int(reply[1]), sent)
            held = self._hold(list(reply[2:]))  # before the move ends (see _reconcile)
            failed = False
        except Exception as exc:
            self._defer([("ack", entry, ()) for entry in entries], exc)  # kept, retried
            if not isinstance(exc, _CONNECTION_ERRORS):
                raise  # not an outage: the engine logs it
            return []
        finally:
            self._end_move(failed)
            with self._cond:
                self._release(entries)
        if not taken:  # the lease ran out (the ack is done): the claim renews it, and takes
            return self.dequeue_many(count)
        return held

    def reject(self, message: Any, reason: str) -> None:
        """Move the message (raw ones too) to the ``rejected`` list with *reason*."""
        self._settle(message, "reject", " ".join(reason.splitlines()))

    def requeue(self, message: Any) -> None:
        """Give a leased message back now, unrun, to be taken next; no delivery is counted."""
        self._settle(message, "requeue")

    # -- retries and the failed store ---------------------------------------------------

    def attempts(self, message: Any) -> int:
        """Failed attempts stored with *message*, which this queue object handed out.

        0 on its first run. Read from the in-flight entry the dequeue brought
        back: no round trip. ValueError if *message* is not held here.
        """
        return _header(self._peek(message, "attempts"))[0]

    def retry(self, message: Any, *, delay: float, failed_at: float) -> None:
        """Settle *message* and store it again, ready in *delay* seconds, one attempt more.

        One script, atomic: the in-flight entry goes and *message* (encoded
        as given) goes to ``scheduled``, due *delay* seconds from now on the
        server's clock, its priority kept and its first failure time set to
        *failed_at* unless it had one. A connection error defers it, as for
        ``ack``: the message stays leased until a heartbeat or dequeue retries.
        """
        entry = self._peek(message, "retry")
        attempts, first, priority, _ = _header(entry)
        # The result header (if any) is kept byte for byte, outermost: the retried
        # attempt stores the result the first one would have.
        again = _result_part(entry) + _entry(message, priority, attempts + 1,
                                             float(failed_at) if first is None else first)
        self._plain_until = -math.inf  # enqueues look again: it is scheduled or ranked
        self._settle(message, "retry", again, repr(float(delay) * 1000))

    def fail(self, message: Any, record: dict[str, Any], *, keep: int, ttl: float) -> int:
        """Settle *message* into the failed store; return how many old entries were dropped.

        One script, atomic: the in-flight entry goes, the entry of
        ``record["task_id"]`` is stored (replacing one with that id) with
        ``first_failed_at``, ``priority`` and ``expires_at`` added, then the
        entries expired on the server's clock and, beyond *keep*, those that
        failed longest ago are dropped (1000 at most per call). A connection
        error defers it, as for ``ack``, and counts 0 dropped. The message
        entry kept for ``retry_failed`` has no result header: the message,
        stored again, no longer asks for its result.
        """
        _, first, priority, _ = _header(self._peek(message, "fail"))
        missing = [key for key in _RECORD_FIELDS if key not in record]
        if missing:
            raise ValueError(f"RedisQueue.fail: the record lacks {', '.join(missing)}")
        last = float(record["last_failed_at"])
        stored = {key: record[key] for key in _RECORD_FIELDS}
        stored.update(args=list(record["args"]), last_failed_at=last,
                      first_failed_at=last if first is None else first, priority=priority,
                      expires_at=last + float(ttl))
        task_id = str(record["task_id"])
        again = _entry([task_id, record["task"], *stored["args"]], priority)
        value = json.dumps({key: stored[key] for key in protocol.FAILED_FIELDS},
                           separators=(",", ":")).encode() + b"\n" + again
        dropped = self._settle(message, "fail", task_id, value, repr(last),
                               repr(stored["expires_at"]), int(keep))
        return max(int(dropped or 0), 0)

    def failed(self, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """Entries of the failed store (not expired), the latest ``last_failed_at`` first."""
        for argument, value in (("limit", limit), ("offset", offset)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"RedisQueue.failed: {argument} must be an int >= 0, "
                                 f"not {value!r}")
        if not limit:
            return []
        values = self._list_failed_script(keys=self._failed_keys,
                                          args=[self.prefix, limit, offset])
        return [_record(value) for value in values if value]

    def failed_count(self) -> int:
        """Entries in the failed store (not expired, on the server's clock)."""
        return int(self._find_failed_script(keys=self._failed_keys[::2],
                                            args=[self.prefix, ""]))

    def find_failed(self, task_id: str) -> dict[str, Any] | None:
        """The entry of *task_id*, or None (also once it expired)."""
        if not task_id:
            return None
        value = self._find_failed_script(keys=self._failed_keys[::2],
                                         args=[self.prefix, task_id])
        return _record(value) if value else None

    def retry_failed(self, task_id: str) -> bool:
        """Move the entry of *task_id* back into the queue, ready now, attempts reset.

        One script: the entry goes and ``[task_id, task, *args]`` is stored
        with its priority, atomically. False if there is no such entry.
        """
        if not task_id:
            return False
        self._plain_until = -math.inf  # enqueues look again: it may have a priority
        moved, _ = self._retry_failed_script(
            keys=self._retry_failed_keys(), args=[self.prefix, task_id, 1, _PROMOTE_LIMIT])
        return bool(int(moved))

    def retry_failed_all(self) -> int:
        """Move every entry back into the queue, the oldest failure first; return how many.

        One script per 1000 entries; entries stored meanwhile may or may not be
        included.
        """
        left = int(self._client.zcard(self._failed_keys[1]))
        self._plain_until = -math.inf  # enqueues look again: some may have a priority
        total = 0
        while left > 0:
            batch = min(left, _PRUNE_LIMIT)
            moved, seen = self._retry_failed_script(
                keys=self._retry_failed_keys(), args=[self.prefix, "", batch, _PROMOTE_LIMIT])
            total += int(moved)
            left -= batch
            if int(seen) < batch:
                break
        return total

    def delete_failed(self, task_id: str) -> bool:
        """Forget the entry of *task_id*; False if there was none."""
        if not task_id:
            return False
        return bool(int(self._delete_failed_script(keys=self._failed_keys,
                                                   args=[self.prefix, task_id])))

    def purge_failed(self) -> int:
        """Forget every entry of the failed store; return how many there were."""
        return int(self._delete_failed_script(keys=self._failed_keys, args=[self.prefix, ""]))

    # -- results --------------------------------------------------------------------

    def result_ttl(self, message: Any) -> float | None:
        """Seconds to keep *message*'s result, as ``schedule`` stored it; None: none asked.

        *message* is one this queue object handed out and has not settled.
        Read from the in-flight entry the dequeue brought back (its ``\\xffr``
        header): no round trip. ValueError if *message* is not held here.
        """
        return _split_result(self._peek(message, "result_ttl"))[0]

    def store_result(self, task_id: str, record: dict[str, Any], *, ttl: float) -> None:
        """Store (replace) the result *record* of *task_id*, kept *ttl* seconds; wake waiters.

        One script, atomic: the record's JSON, ``expires_at`` (the server's
        clock + *ttl*, POSIX seconds) added, replaces the one element of the
        task's result list, which expires after *ttl* (``PEXPIRE``); and
        that wakes every ``result`` waiting for it, in every process.
        *record* must be a JSON-serializable dict (TypeError or ValueError
        otherwise, storing nothing); an ``expires_at`` in it is replaced. A
        connection error propagates: the caller has not settled the message
        yet, so nothing is lost (see "Where a message can be lost or run
        twice").
        """
        args = _result_args("store_result", task_id, record, ttl)
        client = self._borrow()
        try:
            _run_script(client, self._store_result_script, [self._result_key(task_id)], args)
        finally:
            self._lend_back(client)

    def store_result_and_ack(self, message: Any, task_id: str, record: dict[str, Any], *,
                             ttl: float) -> None:
        """``store_result(task_id, record, ttl=ttl)``, then ``ack(message)``, in one script.

        Atomic in Redis: the record is stored and the message leaves the
        in-flight list together, or neither happens, so no outcome is ever
        acked before its result is stored (see "Where a message can be lost or
        run twice"). The engine uses it for a success whose result is kept:
        one round trip for both. Raises as ``store_result`` does, and
        ValueError for a message this queue object does not hold, storing
        nothing. On any error the message stays leased here, as after a
        failed ``store_result``; it is not deferred as an ack is (a deferred
        ack might go without its result). A reply lost after the script ran
        leaves the message acked in Redis and still leased here: nothing runs
        twice for it.
        """
        args = _result_args("store_result_and_ack", task_id, record, ttl)
        entry = self._take(message, "store_result_and_ack")
        try:
            client = self._borrow()
            try:
                _run_script(client, self._store_result_ack_script,
                            [self._result_key(task_id), self._inflight, self._waiting,
                             self._deliveries], [*args, entry])
            finally:
                self._lend_back(client)
        except BaseException:
            with self._cond:
                # Leased again before it stops being settled, under one lock: a
                # reconciliation never sees the entry unknown (see _reconcile).
                self._leases.add(message, entry)
                self._release([entry])
            raise
        with self._cond:
            self._release([entry])

    def result(self, task_id: str, timeout: float | None = None) -> dict[str, Any] | None:
        """The result record of *task_id* once stored and not expired; None if none came.

        Waits up to *timeout* seconds (None: no limit; 0 or less: looks once,
        ``LINDEX``). A wait is ``BLMOVE`` of the task's result list onto
        itself, in slices of at most 5 s: it returns the record as soon as it
        is there, stored before the wait or during it, anywhere; one round
        trip, never a poll. Many threads may wait at once, each on a
        connection of the pool. The record is returned as JSON gives it back,
        ``expires_at`` included. A connection error propagates.
        """
        if not isinstance(task_id, str) or not task_id:
            return None
        key = self._result_key(task_id)
        client = self._borrow()  # a wait holds a connection of its own
        try:
            if timeout is not None and timeout <= 0:
                value = _run(client, "LINDEX", key, 0)
                return None if value is None else _result_record(value)
            deadline = None if timeout is None else time.monotonic() + float(timeout)
            while True:
                wait = self._result_wait
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return None
                    wait = min(wait, remaining)
                # The element stays in the list (moved onto itself), for every waiter.
                value = _run(client, "BLMOVE", key, key, "RIGHT", "LEFT", max(wait, _MIN_WAIT))
                if value is not None:
                    return _result_record(value)
        finally:
            self._lend_back(client)

    # -- connections of the callers' commands -------------------------------------------

    def _borrow(self) -> Any:
        """A single-connection client for the calling thread alone, until ``_lend_back``.

        For the commands on the path of a call (the bare ``LPUSH``, a result's
        ``BLMOVE``, ``store_result``'s script), which any thread may send:
        they skip redis-py's client layer (see _command). An idle one is
        reused (``list.pop`` and ``append`` are atomic, so no two threads ever
        hold the same one), checked as the pool checks its own first; else a
        new one holds a connection of the pool.
        """
        self._check_fork()
        try:
            client = self._spares.pop()
        except IndexError:
            client = self._single_connection()
        try:
            return _checked(client)
        except BaseException:
            self._lend_back(client)  # disconnected: it connects again when next used
            raise

    def _lend_back(self, client: Any) -> None:
        """Keep *client*, which ``_borrow`` lent, for the next command (a broken connection
        was closed by the command and connects anew), or close it beyond ``_SPARES``."""
        if len(self._spares) < _SPARES:
            self._spares.append(client)
        else:
            client.close()

    def _lpush(self, entry: bytes | str) -> None:
        """The bare ``LPUSH`` of *entry* onto ``waiting`` (see enqueue)."""
        client = self._borrow()
        try:
            _run(client, "LPUSH", self._waiting, entry)
        finally:
            self._lend_back(client)

    def _result_key(self, task_id: str) -> str:
        """The key of *task_id*'s result list."""
        return f"{self.prefix}result:{task_id}"

    def _retry_failed_keys(self) -> list[str]:
        return [self._waiting, self._scheduled, self._priorities, self._sequence,
                *self._failed_keys]

    def _peek(self, message: Any, action: str) -> bytes:
        """*message*'s in-flight entry, still leased; ValueError if it is not held."""
        self._check_fork()
        entry: bytes = self._leases.get(message, f"RedisQueue.{action}")  # it stays leased
        return entry

    def heartbeat(self) -> None:
        """Renew this consumer's lease and recover what dead consumers held.

        Also retries settlements that met a connection error, and gives back
        in-flight entries this consumer does not know of (a dequeue's lost
        reply). A connection error propagates (the engine logs it and beats
        again at the next interval).
        """
        self._check_fork()
        while True:
            recovered, _ = self._run_claim(self._client, take=0)
            if recovered < _SWEEP_LIMIT:
                break
        if self._acks:
            self._flush_acks()
        if self._deferred:
            self._settle_deferred()
        self._give_back_strays()

    def rejected(self, limit: int | None = None, offset: int = 0) -> list[tuple[Any, str]]:
        """The rejected messages of this queue, oldest first, as (message or raw, reason):
        all of them, or *limit* (None: no limit) from *offset* (one ``LRANGE``)."""
        limit, offset = protocol.page_or_all("RedisQueue.rejected", limit, offset)
        if limit == 0:
            return []
        out = []
        last = -1 if limit is None else offset + limit - 1
        for entry in self._client.lrange(self._rejected, offset, last):
            reason, _, body = bytes(entry).partition(b"\n")
            out.append((protocol.decode(body), reason.decode("utf-8", "replace")))
        return out

    def rejected_count(self) -> int:
        """How many messages ``rejected()`` lists (``LLEN``)."""
        return int(self._client.llen(self._rejected))

    # -- inspection (read-only: see "Engines, outcomes and inspection") -------------

    def peek(self, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """Ready messages, in the order the takes would hand them out, left in place:
        ``{"message", "priority", "attempts"}`` each, *limit* from *offset*.

        One script per 1000 messages (each reads only); wake tokens are skipped.
        """
        limit, offset = protocol.page("RedisQueue.peek", limit, offset)
        self._check_fork()
        entries: list[bytes] = []
        while len(entries) < limit:
            want = min(limit - len(entries), _BATCH_LIMIT)
            got = self._peek_script(
                keys=[self._waiting, self._scheduled, self._priorities],
                args=[self.prefix, want, offset + len(entries), _PROMOTE_LIMIT])
            entries += got
            if len(got) < want:
                break
        return [_listed(entry) for entry in entries]

    def peek_scheduled(self, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """Messages waiting for their time (the server's clock), the soonest first, with
        ``"at"``: *limit* from *offset*."""
        limit, offset = protocol.page("RedisQueue.peek_scheduled", limit, offset)
        if not limit:
            return []
        self._check_fork()
        reply = self._peek_scheduled_script(keys=[self._scheduled],
                                            args=[self.prefix, limit, offset])
        return [_listed(bytes(member)[16:], at=float(due) / 1000)
                for member, due in zip(reply[::2], reply[1::2], strict=True)]

    def find(self, task_id: str) -> dict[str, Any] | None:
        """Where the message of *task_id* is now (``leased``, ``waiting`` or
        ``scheduled``), or None.

        Looks through ``scheduled``, the ready lists and the in-flight lists, in
        the order messages travel (so one moving on meanwhile is met again
        further on), 1000 entries per script: other commands run in between.
        """
        task_id = protocol.task_id_of("RedisQueue.find", task_id)
        self._check_fork()
        needle = protocol.task_prefix(task_id).encode()
        found: dict[str, dict[str, Any]] = {}
        for entry, due, now in self._search(self._scheduled, "zset", needle):
            status = "scheduled" if due > now else "waiting"
            found.setdefault(status, _listed(entry, at=due / 1000 if due > now else None,
                                             status=status))
        lists = [f"{self.prefix}waiting:{p.decode()}"
                 for p in self._client.zrange(self._priorities, 0, -1)]
        for key in [self._waiting, *lists]:
            for entry, _, _ in self._search(key, "list", needle):
                found.setdefault("waiting", _listed(entry, status="waiting"))
        for consumer in self._client.zrange(self._consumers, 0, -1):
            key = f"{self.prefix}inflight:{consumer.decode()}"
            for entry, _, _ in self._search(key, "list", needle):
                found.setdefault("leased", _listed(entry, status="leased"))
        for status in ("leased", "waiting", "scheduled"):
            if status in found and _is_of(found[status]["message"], task_id):
                return found[status]
        return None

    def _search(self, key: str, kind: str, needle: bytes
                ) -> Iterator[tuple[bytes, float, float]]:
        """(entry, score, the server's clock in ms) of the entries of *key* whose message
        starts with *needle*, 1000 entries per script."""
        start = 0
        while start >= 0:
            reply = self._find_script(keys=[key],
                                      args=[self.prefix, kind, start, _BATCH_LIMIT, needle])
            start, now = int(reply[0]), float(reply[1])
            for entry, score in zip(reply[2::2], reply[3::2], strict=True):
                yield bytes(entry), float(score), now

    # -- engines and outcomes ---------------------------------------------------------

    def announce(self, engine_id: str, record: dict[str, Any], ttl: float) -> None:
        """Store or replace *engine_id*'s record, expiring *ttl* seconds from now (the
        server's clock): a key ``engine:<id>`` with ``PX`` and its place in the index
        ``engines``, in one script that prunes the index of the expired engines."""
        engine_id, text, seconds = protocol.announcement(
            "RedisQueue.announce", engine_id, record, ttl)
        self._check_fork()
        self._announce_script(keys=[self._engines, f"{self.prefix}engine:{engine_id}"],
                              args=[engine_id, text,
                                    max(1, math.ceil(min(seconds, _TTL_MAX) * 1000))])

    def engines(self) -> list[dict[str, Any]]:
        """The records of the engines announced and not expired, by engine id, from a
        script that only reads (``announce`` prunes the index)."""
        self._check_fork()
        reply = self._engines_script(keys=[self._engines], args=[self.prefix])
        records = sorted(zip(
            (bytes(i).decode() for i in reply[::2]), reply[1::2], strict=True))
        return [json.loads(text) for _, text in records]

    def forget_engine(self, engine_id: str) -> None:
        """Drop *engine_id*'s record now."""
        protocol.engine_id_of("RedisQueue.forget_engine", engine_id)
        self._check_fork()
        pipe = self._client.pipeline(transaction=True)
        pipe.delete(f"{self.prefix}engine:{engine_id}")
        pipe.zrem(self._engines, engine_id)
        pipe.execute()

    def add_outcomes(self, minute: int, counts: dict[str, int]) -> None:
        """Add *counts* to the hash ``outcomes:<minute>`` (``HINCRBY``), which expires
        65 minutes after its last count (``EXPIRE``), in one script."""
        checked = protocol.outcome_counts("RedisQueue.add_outcomes", minute, counts)
        if not checked:
            return
        self._check_fork()
        self._add_outcomes_script(
            keys=[f"{self.prefix}outcomes:{minute}", self._outcomes],
            args=[minute, _OUTCOMES_KEPT, *itertools.chain.from_iterable(checked.items())])

    def outcomes(self, since: int) -> dict[int, dict[str, int]]:
        """The buckets of the minutes from *since* on: ``{minute: {outcome: count}}``."""
        start = protocol.since_minute("RedisQueue.outcomes", since)
        self._check_fork()
        reply = self._outcomes_script(keys=[self._outcomes], args=[self.prefix, repr(start)])
        buckets: dict[int, dict[str, int]] = {}
        for minute, counts in zip(reply[::2], reply[1::2], strict=True):
            buckets[int(minute)] = {bytes(k).decode(): int(v)
                                    for k, v in zip(counts[::2], counts[1::2], strict=True)}
        return dict(sorted(buckets.items()))

    def __len__(self) -> int:
        """Messages ready (any priority; delayed ones whose time came) and not taken."""
        return int(self._counts()[0])

    def _counts(self) -> list[int]:
        """[ready messages not taken, messages whose time has not come]."""
        self._check_fork()
        reply = self._count_script(
            keys=[self._waiting, self._scheduled, self._priorities], args=[self.prefix])
        return [int(value) for value in reply]

    def _store(self, message: Any, kind: str, value: float, priority: int,
               head: bytes = b"") -> None:
        """Store *message* by the store script; *head*: its result header, if any."""
        self._check_fork()
        self._plain_until = -math.inf  # a thread's enqueue meanwhile runs the script too
        entry = head + _entry(message, priority)
        client = self._borrow()
        try:
            sent = time.monotonic()
            only_waiting = _run_script(
                client, self._store_script,
                [self._waiting, self._scheduled, self._priorities, self._sequence],
                [self.prefix, entry, kind, repr(float(value)), _PROMOTE_LIMIT])
        finally:
            self._lend_back(client)
        if only_waiting == 1:
            self._plain_until = sent + _RECHECK

    def close(self) -> None:
        """Close every connection; settlements still deferred are tried once first.

        The queue stays usable: a later call connects again. A ``dequeue``
        waiting in another thread ends with a connection error.
        """
        if self._deferred and protocol.forks() == self._forks:
            try:
                self._settle_deferred()
            except _CONNECTION_ERRORS as exc:
                _log.warning("RedisQueue %r: %d settlement(s) still deferred at close (%s); "
                             "their messages return when the lease of consumer %s runs out",
                             self.name, len(self._deferred), exc, self.consumer)
        self._client.connection_pool.disconnect()

    def __repr__(self) -> str:
        return (f"<RedisQueue name={self.name!r} "
                f"consumer={self.consumer!r}>")  # never the URL: it may hold a password

    # -- taking messages --------------------------------------------------------------

    def _fetch(self, count: int, timeout: float | None) -> list[Any]:
        """Lease up to *count* messages; wait up to *timeout* seconds for the first.

        With the lease renewed a moment ago (``_FRESH``), no claim script: a
        bare LMOVE takes one message, the take script (which checks the lease
        in Redis and takes nothing once it ran out) several. Otherwise the
        claim script renews the lease, recovers dead consumers' messages and
        takes. A waiting dequeue that follows one that found nothing, with the
        lease still fresh, goes straight to BLMOVE: one round trip per wait
        while the engine idles. So does one that follows a BLMOVE whose message
        was the last one waiting (``LLEN`` sent with it says so): a message
        that comes alone, as a synchronous call's does, costs the engine no
        take and no claim before its next wait.
        """
        self._check_fork()
        if self._deferred:
            self._settle_deferred()
        wait_for = timeout if timeout is not None and timeout > 0 else 0.0
        waits = wait_for > 0
        self._start_move()
        failed = True
        try:
            with self._mover() as client:
                bodies: list[bytes] = []
                fresh = self._fresh()
                now = time.monotonic()
                if not (fresh and waits and self._found_none and now < self._due_at):
                    if (fresh and count == 1 and now < self._due_at
                            and now - self._checked_at < _RECHECK):
                        body = _run(client, "LMOVE", self._waiting, self._inflight, "RIGHT",
                                    "LEFT")
                        if body == _TOKEN:
                            # Something else than 'waiting' is ready, or due earlier.
                            bodies = self._take_ready(client, count, drop=True)
                        else:
                            bodies = [] if body is None else [body]
                    elif fresh:
                        bodies = self._take_ready(client, count)
                    if not bodies:
                        bodies = self._claim(client, take=count)
                emptied = False
                if not bodies and waits:
                    bodies, emptied = self._wait(client, time.monotonic() + wait_for, count)
                # A hint for the next dequeue, shared by threads: any path is correct.
                self._found_none = waits and (not bodies or emptied)
            messages = self._hold(bodies)
            failed = False
        finally:
            self._end_move(failed)
        return messages

    @contextmanager
    def _mover(self) -> Iterator[Any]:
        """The client to move messages with: a connection of its own for dequeues.

        It skips the pool's checkout and checks, which cost as much CPU as the
        command itself, on the path every message takes one at a time (the
        engine dequeues in one thread at a time). A dequeue in another thread
        meanwhile (perhaps waiting in BLMOVE) uses the pool instead.
        """
        if not self._mover_lock.acquire(blocking=False):
            yield self._client
            return
        try:
            if self._mover_client is None:
                self._mover_client = self._single_connection()
            yield _checked(self._mover_client)
        finally:
            self._mover_lock.release()

    def _single_connection(self) -> Any:
        """A client holding one connection of the pool (connected now; reconnects)."""
        return redis.Redis(connection_pool=self._client.connection_pool,
                           single_connection_client=True)

    def _take_ready(self, client: Any, count: int, *, drop: bool = False) -> list[bytes]:
        """Run the take script (promotes due messages, takes by priority).

        [] if nothing is ready, or this consumer's lease ran out.
        """
        sent = time.monotonic()
        reply = _run_script(
            client, self._take_script,
            [self._waiting, self._inflight, self._consumers, self._scheduled,
             self._priorities],
            [self.prefix, self.consumer, count, int(drop), _PROMOTE_LIMIT])
        if not int(reply[0]):
            return []
        self._note_hint(int(reply[1]), sent)
        return list(reply[2:])

    def _note_hint(self, hint: int, sent: float) -> None:
        """Note what a script running after *sent* (monotonic) saw beside ``waiting``."""
        self._checked_at = sent
        if hint == -2:
            self._due_at = math.inf
        elif hint < 0:
            self._due_at = -math.inf
        else:
            self._due_at = sent + hint / 1000

    def _run_claim(self, client: Any, *, take: int,
                   drop: bool = False) -> tuple[int, list[bytes]]:
        """Run the claim script: (dead consumers recovered, messages taken)."""
        with self._cond:
            # Only a registration seen before this claim was sent can have run
            # out: the engine's first heartbeat and first dequeue race, and the
            # one whose reply comes second may be the one that registered.
            registered = self._registered
        sent = time.monotonic()
        reply = _run_script(
            client, self._claim_script,
            [self._waiting, self._inflight, self._consumers, self._deliveries,
             self._rejected, self._scheduled, self._priorities],
            [self.prefix, self.consumer, round(self.lease * 1000), self.max_deliveries,
             protocol.POISON_REASON, take, _SWEEP_LIMIT, int(drop), _PROMOTE_LIMIT])
        # Renewed no earlier than *sent*: Redis ran the script after it was sent.
        self._renewed_at = max(self._renewed_at, sent)
        self._note_registration(int(reply[0]), registered)
        self._note_hint(int(reply[2]), sent)
        return int(reply[1]), list(reply[3:])

    def _claim(self, client: Any, *, take: int, drop: bool = False) -> list[bytes]:
        _, bodies = self._run_claim(client, take=take, drop=drop)
        return bodies

    def _fresh(self) -> bool:
        """Whether this consumer's lease was renewed within the last ``_FRESH`` of a lease."""
        return time.monotonic() - self._renewed_at < self.lease * _FRESH

    def _wait(self, client: Any, deadline: float, count: int) -> tuple[list[bytes], bool]:
        """BLMOVE in slices until a message comes or *deadline* (monotonic) passes.

        Each slice is at most half a lease, and the lease was renewed less
        than a quarter lease before it (``_FRESH``: by the claim that found
        nothing, or a recent one): this consumer cannot be taken for dead while
        it waits, so what BLMOVE moves into its in-flight list is always
        recoverable. Between slices the lease is renewed once it is no longer
        fresh. Returns the message BLMOVE moved and up to *count* - 1 more,
        taken by the renewal that follows it; and whether ``waiting`` was left
        empty by that BLMOVE (then the next wait may go straight to BLMOVE).
        """
        while True:
            now = time.monotonic()
            remaining = deadline - now
            if remaining <= 0:
                return [], False
            due_in = self._due_at - now
            if due_in <= _PRECISE:
                # The last stretch before a delayed message's time: poll, to
                # take it within a few ms of its time.
                time.sleep(min(remaining, max(due_in, 0.001), _POLL))
                bodies = self._take_ready(client, count) if self._fresh() else []
                if not bodies:
                    bodies = self._claim(client, take=count)
                if bodies:
                    return bodies, False
                continue
            wait = max(min(remaining, self._max_wait, due_in - _PRECISE), _MIN_WAIT)
            left = 1
            connection = client.connection
            if connection is None:  # the pool's client: no hint
                body: bytes | None = client.execute_command(
                    "BLMOVE", self._waiting, self._inflight, "RIGHT", "LEFT", wait)
            else:
                # LLEN runs once BLMOVE returns, in the same round trip: what is
                # left behind the message it moved.
                body, left = _commands(
                    connection, ("BLMOVE", self._waiting, self._inflight, "RIGHT", "LEFT", wait),
                    ("LLEN", self._waiting))
            if body == _TOKEN:
                # Woken: a prioritised message is ready, or a delayed one is due
                # earlier than known. The claim drops the token and looks.
                bodies = self._claim(client, take=count, drop=True)
                if bodies:
                    return bodies, False
                continue
            if body is not None:
                if self._fresh():
                    # Renewed under a quarter lease ago, the lease runs for three
                    # quarters of one more: the consumer is registered and the
                    # message recoverable, with no round trip between the move
                    # and the task. The rest of a batch is the next dequeue's.
                    return [body], left == 0
                # Renew at once: had the lease run out anyway (a stall longer than
                # half a lease), this registers the consumer again, so the
                # message just moved cannot be stranded. The same script takes
                # the rest of a batch.
                return [body, *self._claim(client, take=count - 1)], False
            if not self._fresh():
                bodies = self._claim(client, take=count)
                if bodies:
                    return bodies, False

    def _hold(self, bodies: list[bytes]) -> list[Any]:
        """Lease each of *bodies* to the message object handed out for it."""
        held = []
        for entry in bodies:
            body = _body(entry)
            message = protocol.decode(body)
            if message is body:
                message = _Raw(body)
            held.append((message, bytes(entry)))
        # Under the lock: a reconciliation never sees the entries without their leases.
        with self._cond:
            return [self._leases.add(message, entry) for message, entry in held]

    def _note_registration(self, added: int, registered: bool) -> None:
        """*added*: the claim registered this consumer anew; *registered*: it was before."""
        with self._cond:
            lost = added and registered
            self._registered = True
        if lost:
            _log.warning(
                "RedisQueue %r: the lease of consumer %s had run out (no heartbeat for "
                "%ss): the messages it held were given back and may run twice",
                self.name, self.consumer, self.lease)

    # -- strays: in-flight entries this consumer does not know of --------------------------

    def _start_move(self) -> None:
        """Count a dequeue in; first give back strays if a move failed before."""
        with self._cond:
            while True:
                if self._reconciling:
                    self._cond.wait()
                    continue
                if self._suspect and self._moving == 0:
                    self._reconciling = True
                    break
                self._moving += 1
                return
        try:
            self._reconcile()
        except BaseException:
            with self._cond:
                self._reconciling = False
                self._cond.notify_all()
            raise
        with self._cond:
            self._reconciling = False
            self._moving += 1
            self._cond.notify_all()

    def _end_move(self, failed: bool) -> None:
        with self._cond:
            self._moving -= 1
            if failed:
                # Redis may have moved a message whose reply never came back.
                self._suspect = True
            self._cond.notify_all()

    def _give_back_strays(self) -> None:
        """Reconcile unless a dequeue is in the middle of a move (then: next time)."""
        with self._cond:
            if self._reconciling or self._moving:
                return
            self._reconciling = True
        try:
            self._reconcile()
        finally:
            with self._cond:
                self._reconciling = False
                self._cond.notify_all()

    def _reconcile(self) -> None:
        """Give back each in-flight entry this object holds no lease for.

        Runs only while no dequeue is between request and reply (``_moving``
        is 0 and none can start), so every entry Redis moved for this consumer
        is known by now unless its reply was lost. Settlements go on meanwhile:
        what they hold is in ``_settling`` or ``_deferred``, and an entry they
        remove after the snapshot is simply no longer found.
        """
        with self._cond:
            known = collections.Counter(self._leases.keys())
            known.update(self._settling)
            known.update(entry for _, entry, _ in self._deferred)
        entries = self._client.lrange(self._inflight, 0, -1)
        strays = []
        for entry in map(bytes, entries):
            if known[entry] > 0:
                known[entry] -= 1
            else:
                strays.append(entry)
        given = sum(int(self._settle_scripts["requeue"](
            keys=[self._inflight, self._waiting, self._priorities], args=[self.prefix, entry]))
            for entry in strays)
        with self._cond:
            self._suspect = False
        if given:
            _log.warning("RedisQueue %r: gave back %d message(s) that consumer %s took "
                         "without receiving them (a lost reply)", self.name, given,
                         self.consumer)

    # -- settling ----------------------------------------------------------------------

    def _take(self, message: Any, action: str) -> bytes:
        """*message*'s in-flight entry, moved from its lease to ``_settling``."""
        self._check_fork()
        with self._cond:
            entry: bytes = self._leases.settle(message, f"RedisQueue.{action}")
            self._settling[entry] += 1
        return entry

    def _release(self, entries: list[bytes]) -> None:
        """Forget *entries* as being settled; call with ``_cond`` held."""
        for entry in entries:
            self._settling[entry] -= 1
            if self._settling[entry] <= 0:
                del self._settling[entry]

    def _defer(self, operations: list[tuple[str, bytes, tuple[Any, ...]]],
               exc: Exception) -> None:
        # Kept: the entries stay in flight (leased) until a heartbeat or dequeue
        # settles them, or this consumer dies and they are recovered. Never lost;
        # at worst run twice. Added before the caller releases them, so a
        # reconciliation always knows them.
        with self._cond:
            self._deferred.extend(operations)
        actions = ", ".join(sorted({action for action, _, _ in operations}))
        _log.warning("RedisQueue %r: %s of %d message(s) deferred (%s: %s): retried at "
                     "the next heartbeat or dequeue", self.name, actions, len(operations),
                     type(exc).__name__, exc)

    def _flush_acks(self) -> None:
        """Send the acks waiting in ``_acks``, batch after batch, unless a thread is at it.

        The thread sending looks for more under the lock before it stops, so an
        ack added meanwhile is always sent, by it or by its own caller.
        """
        with self._cond:
            if self._flushing:
                return
            self._flushing = True
        failure: Exception | None = None
        try:
            while True:
                with self._cond:
                    batch, self._acks = self._acks, []
                    if not batch:
                        self._flushing = False
                        break
                try:
                    # Only the thread sending acks uses this connection of its own.
                    if self._acker is None:
                        self._acker = self._single_connection()
                    _run_script(_checked(self._acker), self._settle_scripts["ack"],
                                [self._inflight, self._waiting, self._deliveries], batch)
                except Exception as exc:  # noqa: BLE001 - kept and retried, whatever it is
                    self._defer([("ack", entry, ()) for entry in batch], exc)
                    if failure is None and not isinstance(exc, _CONNECTION_ERRORS):
                        failure = exc
                finally:
                    with self._cond:
                        self._release(batch)
        except BaseException:
            with self._cond:
                self._flushing = False
            raise
        if failure is not None:
            raise failure  # not an outage: the engine logs it

    def _settle(self, message: Any, action: str, *extra: Any) -> Any:
        """Settle *message* by the script of *action*; its reply, None if deferred."""
        entry = self._take(message, action)
        operation = (action, entry, extra)
        try:
            return self._run_settle(operation)
        except Exception as exc:
            self._defer([operation], exc)  # kept and retried, whatever it is
            if not isinstance(exc, _CONNECTION_ERRORS):
                raise  # not an outage: the engine logs it
            return None
        finally:
            with self._cond:
                self._release([entry])

    def _run_settle(self, operation: tuple[str, bytes, tuple[Any, ...]]) -> Any:
        action, entry, extra = operation
        if action == "ack":
            return self._settle_scripts["ack"](
                keys=[self._inflight, self._waiting, self._deliveries], args=[entry])
        keys = [self._inflight, self._waiting]
        if action == "requeue":
            keys.append(self._priorities)
        else:
            keys.append(self._deliveries)
        if action == "reject":
            keys.append(self._rejected)
        elif action == "retry":
            keys += [self._scheduled, self._priorities, self._sequence]
            extra = (*extra, _PROMOTE_LIMIT)
        elif action == "fail":
            keys += self._failed_keys
            extra = (*extra, _PRUNE_LIMIT)
        return self._settle_scripts[action](keys=keys, args=[self.prefix, entry, *extra])

    def _settle_deferred(self) -> None:
        """Retry deferred settlements in order; stop at (and raise) the first error."""
        if not self._deferred_lock.acquire(blocking=False):
            return  # another thread is at it
        try:
            with self._cond:
                pending = list(self._deferred)
            for operation in pending:
                self._run_settle(operation)
                with self._cond:
                    self._deferred.remove(operation)
            if pending:
                _log.info("RedisQueue %r: %d deferred settlement(s) done", self.name,
                          len(pending))
        finally:
            self._deferred_lock.release()

    def _check_fork(self) -> None:
        if protocol.forks() != self._forks:
            # A forked child must not hold its parent's leases nor share its
            # in-flight list: it becomes a consumer of its own. (redis-py gives
            # the child fresh connections itself.)
            self._new_identity()


def _entry(message: Any, priority: int, attempts: int = 0,
           first_failed_at: float | None = None) -> bytes:
    """The stored entry of *message*: its JSON, after ``\\xffp<priority>\\n`` unless 0,
    all after ``\\xffa<attempts>,<first_failed_at>\\n`` unless *attempts* is 0."""
    entry = protocol.encode(message).encode()
    if priority:
        entry = b"%s%d\n%s" % (_MARK, priority, entry)
    if attempts:
        entry = b"%s%d,%s\n%s" % (_FAILED_MARK, attempts, repr(first_failed_at).encode(),
                                  entry)
    return entry


def _listed(entry: bytes, *, at: float | None = None, status: str | None = None
            ) -> dict[str, Any]:
    """A stored *entry* as inspection lists it: its message as ``dequeue`` hands it out,
    its priority and attempts from its headers."""
    attempts, _, priority, body = _header(bytes(entry))
    message = protocol.decode(body)
    if message is body:
        message = _Raw(body)
    return protocol.inspected(message, priority, attempts, at, status)


def _is_of(message: Any, task_id: str) -> bool:
    """Whether *message* is a message of *task_id*."""
    return isinstance(message, list) and bool(message) and message[0] == task_id


def _ttl_seconds(action: str, argument: str, value: object) -> float:
    """*value* as a number of seconds > 0 (finite); ValueError naming *action*, *argument*."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not 0 < value < math.inf:
        raise ValueError(f"RedisQueue.{action}: {argument} must be a number of seconds > 0, "
                         f"not {value!r}")
    return float(value)


_COMPACT = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
"""``json.dumps(..., separators=(",", ":"), allow_nan=False)``, its encoder made once."""


def _result_args(action: str, task_id: object, record: object, ttl: object) -> list[Any]:
    """The store-result script's ARGV for *record*; ValueError or TypeError naming
    *action* for a bad *task_id*, *record* (a dict, JSON-serializable) or *ttl*."""
    fields = protocol.result_fields(f"RedisQueue.{action}", task_id, record)
    seconds = _ttl_seconds(action, "ttl", ttl)
    body = _COMPACT.encode(fields)
    return [body[:-1], "," if fields else "", repr(seconds), max(1, math.floor(seconds * 1000))]


def _result_head(result_ttl: object) -> bytes:
    """The result header ``\\xffr<ttl ms>\\n`` for *result_ttl* seconds.

    The ms are the exact decimal shift of the seconds' ``repr`` (``0.3`` ->
    ``300``, ``1e-05`` -> ``0.01``), so reading them back gives the same float.
    """
    return _result_head_of(_ttl_seconds("schedule", "result_ttl", result_ttl))


@functools.lru_cache(maxsize=256)
def _result_head_of(seconds: float) -> bytes:
    """_result_head of a checked ttl, cached: every call of a caller asks for the same."""
    ms = format(decimal.Decimal(repr(seconds)).scaleb(3), "f")
    return b"%s%s\n" % (_RESULT_MARK, ms.encode("ascii"))


def _result_part(entry: bytes) -> bytes:
    """The result header at the start of *entry* (newline included), or b"" if none."""
    if entry.startswith(_RESULT_MARK):
        newline = entry.find(b"\n", 2)
        if newline >= 0:
            return entry[:newline + 1]
    return b""


def _split_result(entry: bytes) -> tuple[float | None, bytes]:
    """(the result ttl in seconds, or None, and the rest) of a stored *entry*.

    A result header that does not parse counts as none (and is skipped, as
    the scripts skip it).
    """
    head = _result_part(entry)
    if not head:
        return None, entry
    return _result_ttl_of(head), entry[len(head):]


@functools.lru_cache(maxsize=256)
def _result_ttl_of(head: bytes) -> float | None:
    """The ttl (seconds) a result header ``\\xffr<ms>\\n`` holds, or None if it does not
    parse; cached: the messages of a caller all carry the same."""
    try:
        seconds = float(decimal.Decimal(head[2:-1].decode("ascii")).scaleb(-3))
    except (ArithmeticError, ValueError):  # decimal.InvalidOperation, UnicodeDecodeError
        return None
    return seconds if 0 < seconds < math.inf else None


def _header(entry: bytes) -> tuple[int, float | None, int, bytes]:
    """(failed attempts, first failure time, priority, the message's JSON or raw bytes)
    of a stored *entry*, past its result header if any. A header that does not parse
    counts as none."""
    attempts, first, priority = 0, None, 0
    if entry.startswith(_RESULT_MARK):
        entry = _split_result(entry)[1]
    if entry.startswith(_FAILED_MARK):
        newline = entry.find(b"\n", 2)
        if newline >= 0:
            count, _, at = entry[2:newline].partition(b",")
            try:
                attempts, first = int(count), float(at)
            except ValueError:
                attempts, first = 0, None
            entry = entry[newline + 1:]
    if entry.startswith(_MARK):
        newline = entry.find(b"\n", 2)
        if newline >= 0:
            # Only what _entry writes, as the scripts' split_priority reads it.
            if _PRIORITY.fullmatch(entry, 2, newline):
                priority = int(entry[2:newline])
            entry = entry[newline + 1:]
    return attempts, first, priority, entry


def _body(entry: bytes) -> bytes:
    """The message's JSON (or raw bytes) in a stored *entry*."""
    if entry.startswith(_MARKS):
        return _header(entry)[3]
    return entry


def _record(value: bytes) -> dict[str, Any]:
    """A failed-store entry from its stored value, ``<entry JSON>\\n<message entry>``."""
    record: dict[str, Any] = json.loads(value.partition(b"\n")[0])
    return record


def _result_record(value: bytes) -> dict[str, Any]:
    """A result record from the element of its list."""
    record: dict[str, Any] = json.loads(value)
    return record


def _checked(client: Any) -> Any:
    """*client* (a single-connection one), its connection checked as the pool checks its own.

    A connection that the server closed (a restart) is readable, or raises:
    connect anew instead of failing the command. Nothing was sent on the old
    one, so nothing can run twice for it. Raises if Redis cannot be reached.
    """
    connection = client.connection
    connection.connect()  # a no-op when connected
    sock = getattr(connection, "_sock", None)
    try:
        if type(sock) is socket.socket:
            # A plain TCP or Unix socket (not TLS, whose records may be pending
            # without any reply): readable between commands means data nobody
            # asked for, or EOF. One poll, where can_read costs several calls.
            # No reply is ever left half read in the parser: every command here
            # reads its replies in full or closes the connection (_command).
            poller = select.poll()
            poller.register(sock, select.POLLIN | select.POLLPRI)
            stale = bool(poller.poll(0))
        else:
            stale = connection.can_read()
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        stale = True
    if stale:
        connection.disconnect()
        connection.connect()
    return client


def _command(connection: Any, *args: Any) -> Any:
    """Send one command on *connection* (used by the calling thread alone meanwhile) and
    return its reply as Redis sent it (bytes, int, list, None).

    redis-py's ``execute_command`` costs several times the CPU of the round trip
    itself (the pool's checkout and release, the retry wrapper, its metrics
    hooks); a connection's own ``send_packed_command`` and ``read_response``
    are all that a command of the message path needs, and replies stay raw
    (the queue asks for no decoding). An error reply raises its
    ``redis.ResponseError``, the connection still in step; any other error
    closes the connection, as redis-py does (a reply may be left unread),
    and the next command connects anew. Nothing is retried.
    """
    try:
        connection.send_packed_command(connection.pack_command(*args), check_health=False)
        return connection.read_response()
    except redis.ResponseError:
        raise
    except BaseException:
        connection.disconnect()
        raise


def _commands(connection: Any, *commands: tuple[Any, ...]) -> list[Any]:
    """*commands* sent together on *connection* (one round trip), their replies in order.

    Redis runs them one after the other, each once the one before it is done
    (a blocking command first: once it returns). Errors as in _command; an
    error reply is raised after every reply is read.
    """
    try:
        connection.send_packed_command(connection.pack_commands(commands), check_health=False)
        replies: list[Any] = []
        error: Exception | None = None
        for _ in commands:
            try:
                replies.append(connection.read_response())
            except redis.ResponseError as exc:
                error = error or exc
                replies.append(None)
    except BaseException:
        connection.disconnect()
        raise
    if error is not None:
        raise error
    return replies


def _run(client: Any, *args: Any) -> Any:
    """Command *args* by *client*: by _command on a single-connection client, else by
    redis-py (the pool); the reply raw."""
    connection = client.connection
    if connection is None:
        return client.execute_command(*args)
    return _command(connection, *args)


def _run_script(client: Any, script: Any, keys: list[Any], args: list[Any]) -> Any:
    """*script* (registered by ``register_script``) run by *client* as ``script(keys=,
    args=, client=)`` would: by ``EVALSHA`` on _command for a single-connection client.

    A server that does not know the script (restarted, or ``SCRIPT FLUSH``) ran
    nothing: it is loaded and run again, as redis-py does.
    """
    connection = client.connection
    if connection is None or type(script) is not _Script:
        return script(keys=keys, args=args, client=client)
    try:
        return _command(connection, "EVALSHA", script.sha, len(keys), *keys, *args)
    except NoScriptError:
        _command(connection, "SCRIPT", "LOAD", script.script)
        return _command(connection, "EVALSHA", script.sha, len(keys), *keys, *args)
