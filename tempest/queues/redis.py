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

==================================  ======  ==================================================
key                                 type    holds
==================================  ======  ==================================================
``tempest:{NAME}:waiting``          list    messages waiting: ``LPUSH``-ed by producers, taken
                                            from the other end (FIFO)
``tempest:{NAME}:inflight:<id>``    list    what consumer ``<id>`` took and has not settled
``tempest:{NAME}:consumers``        zset    consumer id -> the end of its lease, in ms on the
                                            Redis server's clock
``tempest:{NAME}:deliveries``       hash    sha1 of a message -> deliveries that ended without
                                            an outcome (only messages that were recovered)
``tempest:{NAME}:rejected``         list    ``<reason>\\n<message>`` for each rejected message
==================================  ======  ==================================================

A message is stored as its compact JSON (``["id","Task",1,2]``), so any client
can enqueue with ``LPUSH tempest:{NAME}:waiting '<json>'``; what is not a JSON
list is handed to the engine raw (bytes), for it to reject.

A message carries no ``available_at`` or ``priority`` (see
:mod:`tempest.queues.protocol`): delayed and prioritised messages would come
as new keys beside these (a zset of messages by due time, moved to
``waiting`` when due; a waiting list per priority), leaving these as they are.

How a message travels
---------------------
``dequeue`` ``LMOVE``-s the oldest waiting message onto this consumer's
in-flight list, atomically. Unless this consumer's lease was renewed within
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
When nothing waits, ``BLMOVE`` waits for the first message as in ``dequeue``,
and the renewal that follows it takes up to *n* - 1 more in the same script:
two round trips for a batch that had to be waited for. Each message of a batch
is then an in-flight entry like any other: leased, recovered, counted and
settled on its own.

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
* Between ``BLMOVE`` handing a message over and the lease renewal that follows
  it, a consumer whose lease had run out during the wait (a stall longer than
  half a lease) is not registered: dying in those microseconds would strand
  the message in an in-flight list no one recovers. (The rest of a batch is
  moved after that renewal, in the same script: only the first is exposed.)
  ``dequeue``'s bare ``LMOVE`` has the same exposure after a stall of most of
  a lease between its freshness check and the move; ``dequeue_many``'s
  script checks the lease where it moves, so a batch never lands in the list
  of a consumer whose lease ran out.
* The messages of a batch wait in the engine for their workers (a moment:
  only workers already free get one) and are leased meanwhile. An engine dying
  then loses none: they are in its in-flight list and return with the rest.
  A stopping engine requeues those it did not start.
* Redis itself must keep what it acknowledged: with ``appendonly yes`` and
  ``appendfsync always`` a crash of Redis loses nothing; with ``everysec``, up
  to a second of writes: enqueues are lost, and messages moved or acked in that
  second run again. Without persistence a restart loses every message.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import secrets
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

_CONNECTION_ERRORS: tuple[type[Exception], ...] = ()
if not _DRIVER_MISSING:
    _CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError)

# -- Lua scripts ---------------------------------------------------------------------------
# Each runs atomically in Redis. They name the in-flight lists of other
# consumers without declaring them in KEYS; the hash tag keeps them in the
# declared keys' slot.

_CLAIM = """\
-- KEYS: waiting, inflight, consumers, deliveries, rejected
-- ARGV: consumer, lease (ms), max_deliveries, poison reason, inflight prefix,
--       messages to take (0 or more), sweep limit
-- Returns {registered anew (0/1), dead consumers recovered, messages taken...}.
local waiting, inflight, consumers, deliveries, rejected =
    KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
-- Renew first: this consumer is never among the dead it recovers below.
local added = redis.call('ZADD', consumers, now + tonumber(ARGV[2]), ARGV[1])
local max_deliveries = tonumber(ARGV[3])
local dead = redis.call('ZRANGE', consumers, '-inf', now, 'BYSCORE', 'LIMIT', 0,
                        tonumber(ARGV[7]))
for _, consumer in ipairs(dead) do
    local list = ARGV[5] .. consumer
    -- The newest entry is at the left: popping from there and pushing each onto
    -- the taking end leaves the oldest to be taken first.
    local body = redis.call('LPOP', list)
    while body do
        local field = redis.sha1hex(body)
        if redis.call('HINCRBY', deliveries, field, 1) >= max_deliveries then
            redis.call('HDEL', deliveries, field)
            redis.call('RPUSH', rejected, ARGV[4] .. '\\n' .. body)
        else
            redis.call('RPUSH', waiting, body)
        end
        body = redis.call('LPOP', list)
    end
    redis.call('ZREM', consumers, consumer)
end
local reply = {added, #dead}
for _ = 1, tonumber(ARGV[6]) do
    local body = redis.call('LMOVE', waiting, inflight, 'RIGHT', 'LEFT')
    if not body then
        break
    end
    reply[#reply + 1] = body
end
return reply
"""

_TAKE = """\
-- KEYS: waiting, inflight, consumers    ARGV: consumer, messages to take
-- Returns the messages taken, oldest first: none unless this consumer's lease
-- is still running (then the caller runs _CLAIM, which renews it).
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local leased_until = redis.call('ZSCORE', KEYS[3], ARGV[1])
if not leased_until or tonumber(leased_until) <= now then
    return {}
end
local taken = {}
for _ = 1, tonumber(ARGV[2]) do
    local body = redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT')
    if not body then
        break
    end
    taken[#taken + 1] = body
end
return taken
"""

_ACK = """\
-- KEYS: inflight, waiting, deliveries    ARGV: messages (one or many acks at once)
-- A message no longer in flight here: this consumer's lease ran out and it was
-- recovered. If it still waits, no one has run it again yet: remove it there.
local counted = redis.call('EXISTS', KEYS[3]) == 1
local settled = 0
for _, body in ipairs(ARGV) do
    if redis.call('LREM', KEYS[1], 1, body) == 1
            or redis.call('LREM', KEYS[2], -1, body) == 1 then
        settled = settled + 1
        if counted then
            redis.call('HDEL', KEYS[3], redis.sha1hex(body))
        end
    end
end
return settled
"""

_REJECT = """\
-- KEYS: inflight, waiting, deliveries, rejected    ARGV: message, reason
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0
        and redis.call('LREM', KEYS[2], -1, ARGV[1]) == 0 then
    return 0  -- another consumer holds it now, and will settle it itself
end
redis.call('HDEL', KEYS[3], redis.sha1hex(ARGV[1]))
redis.call('RPUSH', KEYS[4], ARGV[2] .. '\\n' .. ARGV[1])
return 1
"""

_REQUEUE = """\
-- KEYS: inflight, waiting    ARGV: message
-- Only what is still in flight here goes back: never a second copy.
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
    redis.call('RPUSH', KEYS[2], ARGV[1])
    return 1
end
return 0
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
        moment a message is enqueued, without polling.
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
        self._client = client
        self._waiting = self.prefix + "waiting"
        self._consumers = self.prefix + "consumers"
        self._deliveries = self.prefix + "deliveries"
        self._rejected = self.prefix + "rejected"
        # Registered once: redis-py runs them by SHA and loads them again when a
        # restarted server has forgotten them.
        self._claim_script = client.register_script(_CLAIM)
        self._take_script = client.register_script(_TAKE)
        self._settle_scripts = {"ack": client.register_script(_ACK),
                                "reject": client.register_script(_REJECT),
                                "requeue": client.register_script(_REQUEUE)}
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
        self._deferred: list[tuple[str, bytes, str]] = []
        """(action, in-flight entry, reason) of settlements that met a connection error."""
        self._deferred_lock = threading.Lock()
        self._registered = False
        self._renewed_at = -math.inf
        """When (monotonic) this consumer's lease was last renewed, at the latest."""
        self._found_none = False
        """The last waiting dequeue found nothing (see _fetch)."""
        self._acks: list[bytes] = []
        """Acked entries waiting for the ack being sent (see ack)."""
        self._flushing = False
        # Dedicated connections, made on first use (see _mover); a forked child
        # must not use its parent's.
        self._mover_lock = threading.Lock()
        self._mover_client: Any = None
        self._acker: Any = None

    # -- the queue protocol ---------------------------------------------------------

    def enqueue(self, message: Any) -> None:
        """Store *message* (as JSON) at the back of the queue; wakes a waiting dequeue."""
        self._client.lpush(self._waiting, protocol.encode(message))

    def dequeue(self, timeout: float | None = None) -> Any:
        """Lease the next message; wait up to *timeout* seconds for one; None if none.

        What the queue cannot decode is returned raw (bytes), for the engine
        to reject. A connection error propagates (the engine retries).
        """
        messages = self._fetch(1, timeout)
        return messages[0] if messages else None

    def dequeue_many(self, count: int, timeout: float | None = None) -> list[Any]:
        """Lease up to *count* messages, oldest first; wait up to *timeout* seconds for the first.

        One round trip takes the batch (at most ``1000``): the first message as
        ``dequeue(timeout=)`` would take it, then whatever else waits right
        now, up to *count*. An empty list if nothing came within *timeout*
        (at once for a *count* below 1).
        Each message is leased, counted and settled on its own, as if
        ``dequeue`` had returned it. A connection error propagates (the engine
        retries).
        """
        if isinstance(count, bool) or not isinstance(count, int):
            raise TypeError(f"RedisQueue.dequeue_many: count must be an int, not {count!r}")
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
        entry = self._take(message, "ack")
        with self._cond:
            self._acks.append(entry)
        self._flush_acks()

    def reject(self, message: Any, reason: str) -> None:
        """Move the message (raw ones too) to the ``rejected`` list with *reason*."""
        self._settle(message, "reject", reason)

    def requeue(self, message: Any) -> None:
        """Give a leased message back now, unrun, to be taken next; no delivery is counted."""
        self._settle(message, "requeue")

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

    def rejected(self) -> list[tuple[Any, str]]:
        """The rejected messages of this queue, oldest first, as (message or raw, reason)."""
        out = []
        for entry in self._client.lrange(self._rejected, 0, -1):
            reason, _, body = bytes(entry).partition(b"\n")
            out.append((protocol.decode(body), reason.decode("utf-8", "replace")))
        return out

    def __len__(self) -> int:
        """Messages waiting: not taken by any consumer."""
        return int(self._client.llen(self._waiting))

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
        while the engine idles.
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
                if not (fresh and waits and self._found_none):
                    if fresh and count == 1:
                        body = client.lmove(self._waiting, self._inflight, "RIGHT", "LEFT")
                        bodies = [] if body is None else [body]
                    elif fresh:
                        bodies = self._take_script(
                            client=client,
                            keys=[self._waiting, self._inflight, self._consumers],
                            args=[self.consumer, count])
                    if not bodies:
                        bodies = self._claim(client, take=count)
                if not bodies and waits:
                    bodies = self._wait(client, time.monotonic() + wait_for, count)
                # A hint for the next dequeue, shared by threads: any path is correct.
                self._found_none = waits and not bodies
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

    def _run_claim(self, client: Any, *, take: int) -> tuple[int, list[bytes]]:
        """Run the claim script: (dead consumers recovered, messages taken)."""
        with self._cond:
            # Only a registration seen before this claim was sent can have run
            # out: the engine's first heartbeat and first dequeue race, and the
            # one whose reply comes second may be the one that registered.
            registered = self._registered
        sent = time.monotonic()
        reply = self._claim_script(
            client=client,
            keys=[self._waiting, self._inflight, self._consumers, self._deliveries,
                  self._rejected],
            args=[self.consumer, round(self.lease * 1000), self.max_deliveries,
                  protocol.POISON_REASON, f"{self.prefix}inflight:", take, _SWEEP_LIMIT])
        # Renewed no earlier than *sent*: Redis ran the script after it was sent.
        self._renewed_at = max(self._renewed_at, sent)
        self._note_registration(int(reply[0]), registered)
        return int(reply[1]), list(reply[2:])

    def _claim(self, client: Any, *, take: int) -> list[bytes]:
        _, bodies = self._run_claim(client, take=take)
        return bodies

    def _fresh(self) -> bool:
        """Whether this consumer's lease was renewed within the last ``_FRESH`` of a lease."""
        return time.monotonic() - self._renewed_at < self.lease * _FRESH

    def _wait(self, client: Any, deadline: float, count: int) -> list[bytes]:
        """BLMOVE in slices until a message comes or *deadline* (monotonic) passes.

        Each slice is at most half a lease, and the lease was renewed less
        than a quarter lease before it (``_FRESH``: by the claim that found
        nothing, or a recent one): this consumer cannot be taken for dead while
        it waits, so what BLMOVE moves into its in-flight list is always
        recoverable. Between slices the lease is renewed once it is no longer
        fresh. Returns the message BLMOVE moved and up to *count* - 1 more,
        taken by the renewal that follows it.
        """
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            wait = max(min(remaining, self._max_wait), _MIN_WAIT)
            body: bytes | None = client.blmove(
                self._waiting, self._inflight, wait, "RIGHT", "LEFT")
            if body is not None:
                # Renew at once: had the lease run out anyway (a stall longer than
                # half a lease), this registers the consumer again, so the
                # message just moved cannot be stranded. The same script takes
                # the rest of a batch.
                return [body, *self._claim(client, take=count - 1)]
            if not self._fresh():
                bodies = self._claim(client, take=count)
                if bodies:
                    return bodies

    def _hold(self, bodies: list[bytes]) -> list[Any]:
        """Lease each of *bodies* to the message object handed out for it."""
        held = []
        for body in bodies:
            message = protocol.decode(body)
            if message is body:
                message = _Raw(body)
            held.append((message, bytes(body)))
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
            keys=[self._inflight, self._waiting], args=[entry])) for entry in strays)
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

    def _defer(self, operations: list[tuple[str, bytes, str]], exc: Exception) -> None:
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
                    self._settle_scripts["ack"](
                        client=_checked(self._acker),
                        keys=[self._inflight, self._waiting, self._deliveries], args=batch)
                except Exception as exc:  # noqa: BLE001 - kept and retried, whatever it is
                    self._defer([("ack", entry, "") for entry in batch], exc)
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

    def _settle(self, message: Any, action: str, reason: str = "") -> None:
        entry = self._take(message, action)
        operation = (action, entry, " ".join(reason.splitlines()))
        try:
            self._run_settle(operation)
        except Exception as exc:
            self._defer([operation], exc)  # kept and retried, whatever it is
            if not isinstance(exc, _CONNECTION_ERRORS):
                raise  # not an outage: the engine logs it
        finally:
            with self._cond:
                self._release([entry])

    def _run_settle(self, operation: tuple[str, bytes, str]) -> None:
        action, entry, reason = operation
        keys = [self._inflight, self._waiting]
        args: list[Any] = [entry]
        if action != "requeue":
            keys.append(self._deliveries)
        if action == "reject":
            keys.append(self._rejected)
            args.append(reason)
        self._settle_scripts[action](keys=keys, args=args)

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


def _checked(client: Any) -> Any:
    """*client* (a single-connection one), its connection checked as the pool checks its own.

    A connection that the server closed (a restart) is readable, or raises:
    connect anew instead of failing the command. Nothing was sent on the old
    one, so nothing can run twice for it. Raises if Redis cannot be reached.
    """
    connection = client.connection
    connection.connect()  # a no-op when connected
    try:
        stale = connection.can_read()
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        stale = True
    if stale:
        connection.disconnect()
        connection.connect()
    return client
