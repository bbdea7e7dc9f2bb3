"""The queue protocol, in one place: what each method buys.

A queue is any object with ``enqueue`` and ``dequeue``. Everything else is
optional; the engine looks for each method and uses it when present.

====================  =============================================================
method                what it buys
====================  =============================================================
``enqueue(m)``        store message *m*, a list ``[task_id, task_name, *args]``
``dequeue()``         one message (list or tuple), or None when empty; a durable
                      queue returns what it cannot decode raw (str or bytes), and
                      the engine rejects it as bad input
``dequeue(timeout)``  wait up to *timeout* seconds for a message instead of
                      returning None at once: an idle engine wakes the moment work
                      arrives, without polling
``dequeue_many(n)``   ``dequeue_many(n, timeout=)``: up to *n* messages, a list
                      (empty when none came within *timeout*), waiting only for
                      the first. The engine asks for one per worker that is free
                      right now, so one round trip serves several workers (more
                      only with the engine's ``prefetch``, which needs it). Only
                      used where ``dequeue`` takes a timeout
``ack(m)``            *m*'s outcome is final (success, failure or timeout): delete
                      it. A queue with ack *leases* what it hands out and gives a
                      message whose lease ran out to another consumer: the engine
                      announces at-least-once delivery
``ack_and_dequeue``   ``ack_and_dequeue(ms, n)``: ``ack`` each message of the list
                      *ms*, then ``dequeue_many(n)`` without waiting (``n`` 0:
                      none), stored together in one round trip: a worker that
                      has just finished a message takes its next ones, with the
                      acks other workers handed it meanwhile (the engine asks
                      only when the call can go at once). Raises like ``ack``
                      for a message it does not hold, taking nothing (the ones
                      before it are acked)
``reject(m, why)``    *m* cannot be run (malformed, unknown task, poison): keep it
                      aside, listed by ``rejected()``, instead of dropping it
``requeue(m)``        give *m* back now, unrun (the engine stopped before running it,
                      or interrupted it at the end of a drain)
``heartbeat()``       renew the leases of what this queue object holds, and recover
                      what dead consumers held; the engine calls it every
                      ``heartbeat_interval`` seconds (an attribute, default 10)
``__len__()``         messages waiting (not leased), shown in ``stats()``
``close()``           release connections; the engine never calls it (the queue may
                      be shared and outlive a run): the application does
====================  =============================================================

Scheduling (all four, or none: the engine looks for ``schedule``):

==========================  =======================================================
method                      what it buys
==========================  =======================================================
``schedule(m, *, delay=,    store *m* to become ready ``delay`` seconds from now on
at=, priority=)``           the queue's clock, or at POSIX time ``at`` (neither: now;
                            a time in the past: now); among ready messages, higher
                            ``priority`` first. ``submit(delay=, at=, priority=)``
                            needs it
``scheduled_count()``       messages waiting for their time (not ready yet):
                            ``stats()["scheduled"]``
``fire(schedule, slot, m,   store *m* to become ready at POSIX time *slot* unless
*, priority=, keep=)``      slot *slot* of *schedule* was fired already; True if it
                            stored it. Periodic tasks (``periodic``) need it
``last_fired(schedule)``    the latest slot of *schedule* still remembered, or None
==========================  =======================================================

Retries and the failed store (all of them, or none: the engine looks for
``retry`` and ``fail``):

===============================  ==================================================
method                           what it buys
===============================  ==================================================
``attempts(m)``                  how many failed attempts are stored with *m*, a
                                 message this queue object handed out (0: its first
                                 run). ``Task.attempt`` is one more
``retry(m, *, delay,``           settle *m* and store it again to run in *delay*
``failed_at)``                   seconds, one failed attempt more. Task option
                                 ``retries > 0`` needs it
``fail(m, record, *, keep,       settle *m* and put it in the failed store;
ttl)``                           returns how many old entries the bounds dropped
``failed(limit, offset)``        entries of the failed store, latest failure first
``failed_count()``               entries in the failed store
``find_failed(task_id)``         one entry, or None
``retry_failed(task_id)``        the entry back into the queue, ready now, attempts
                                 reset: True, or False if there is no such entry
``retry_failed_all()``           every entry back: how many
``delete_failed(task_id)``       forget the entry: True, or False if there was none
``purge_failed()``               forget every entry: how many
===============================  ==================================================

Results (all of them, or none: the engine looks for all three, and for
``schedule``):

==================================  ===============================================
method                              what it buys
==================================  ===============================================
``schedule(m, ..., result_ttl=)``   store *m* asking for its result, kept
                                    *result_ttl* seconds (None: no result)
``result_ttl(m)``                   what ``schedule`` stored with *m* (a message this
                                    queue object handed out): seconds, or None
``store_result(task_id, record,``   keep *record* as *task_id*'s result for *ttl*
``*, ttl)``                         seconds; wake whoever waits for it
``result(task_id, timeout)``        the record once stored, waiting up to *timeout*
                                    seconds (None: no limit; 0: look once); None
                                    if none came in time. ``Engine.result`` and
                                    ``Engine.call`` need these
``store_result_and_ack(m,``         optional: ``store_result`` then ``ack(m)`` in one
``task_id, record, *, ttl)``        atomic step (both or neither); the engine uses
                                    it for a success whose result is kept, instead
                                    of the two. On an error *m* stays leased, as
                                    after a failed ``store_result``
==================================  ===============================================

Engines and outcomes (all five, or none: ``ENGINE_METHODS``): what a dashboard
reads to show every engine on a shared queue and what they did, minute by
minute.

==================================  ===============================================
method                              what it buys
==================================  ===============================================
``announce(engine_id, record,``     store or replace the JSON-serializable dict
``ttl)``                            *record* of a live engine; it expires *ttl*
                                    seconds later unless announced again
``engines()``                       the unexpired records, as JSON gives them back,
                                    sorted by ``engine_id``
``forget_engine(engine_id)``        drop the record at once (an engine that stopped
                                    cleanly); nothing if there is none
``add_outcomes(minute, counts)``    add *counts* (``{outcome: n}``, outcomes from
                                    OUTCOMES) to the bucket of POSIX minute
                                    *minute* (``int(time // 60) * 60``), one bucket
                                    per queue, shared by every engine on it; kept
                                    an hour at least
``outcomes(since)``                 ``{minute: {outcome: n}}`` of the buckets with
                                    ``minute >= since``
==================================  ===============================================

Inspection (all five, or none: ``INSPECT_METHODS``): what a dashboard lists.
Read-only: nothing is leased, moved or counted as a delivery.

==================================  ===============================================
method                              what it buys
==================================  ===============================================
``peek(limit=100, offset=0)``       ready messages (not leased), in the order the
                                    queue would hand them out: dicts ``{"message",
                                    "priority", "attempts"}``, ``message`` as
                                    ``dequeue`` would give it
``peek_scheduled(limit=100,``       messages waiting for their time, the soonest
``offset=0)``                       first: the same dicts with ``"at"`` (POSIX
                                    seconds, the queue's clock)
``rejected(limit=None,``            the rejected messages, oldest first (newest
``offset=0)``                       last), as (message, reason); with no arguments,
                                    all of them, as ever
``rejected_count()``                how many ``rejected()`` lists
``find(task_id)``                   where a message with this id is now: ``{"status":
                                    "waiting" | "scheduled" | "leased", "message",
                                    "priority", "attempts"}`` (and ``"at"`` when
                                    scheduled), or None. Failed entries are found by
                                    ``find_failed``, results by ``result(id, 0)``
==================================  ===============================================

Bad arguments to these methods raise: TypeError for a wrong type (a limit
that is no int, a task id that is no str), ValueError for a wrong value (a
negative limit or offset, an unknown outcome, a ttl that is not > 0). A
message that does not decode is listed raw, as ``dequeue`` hands it out.
``find`` may scan the queue (it serves one search, never the hot path);
where several messages have the id, it gives the one furthest on its way:
leased, then waiting, then scheduled.

The engine passes ``ack``, ``reject`` and ``requeue`` the very object that
``dequeue`` returned. Durable queues use that identity to find the stored
row (see :class:`Leases`), so the message itself needs no hidden fields.

Leases and redelivery
---------------------
A reliable queue leases a message to the consumer that dequeued it for
``lease`` seconds (default 30), renewed by ``heartbeat()`` while the engine
lives, so a task may run far longer than the lease. When an engine dies
(``kill -9``, a lost machine), its heartbeats stop, its leases expire, and
its messages return to the queue within ``lease`` seconds. A message is
delivered again only then: at-least-once, and at most once per lease.

Poison messages
---------------
Each delivery is counted with the stored message. A message delivered more
than ``max_deliveries`` times (default 5) without an outcome -- it keeps
killing the engines that take it -- is rejected with the reason
``TooManyDeliveries`` instead of being handed out again.

Scheduling
----------
``schedule(message, *, delay=None, at=None, priority=0)``: at most one of
*delay* (seconds, a float >= 0, counted from now on the queue's clock) and *at*
(POSIX seconds, compared with the queue's clock: the machine's for
MemoryQueue and SQLiteQueue, the server's for Redis and PostgreSQL) is given;
neither means ready now. The engine checks the values before the call
(:func:`priority` gives the range), so a queue may trust them.

- A message is *ready* once its time has come. Only ready messages are
  dequeued: never one before its time. ``__len__`` counts ready messages,
  ``scheduled_count()`` the others.
- Among ready messages, higher priority first; at equal priority, in the
  order they became ready (their time, or when they were enqueued; ties in
  the order of the calls). ``enqueue(m)`` is ``schedule(m)``: priority 0,
  ready now.
- The schedule lives in the queue, never in an engine's memory: on a durable
  queue a delayed message survives every engine's death, and runs on
  whichever engine is free once its time comes.
- A waiting ``dequeue(timeout=)`` wakes when a message becomes ready: when
  one is stored ready, and when a delayed one's time comes (also one stored,
  while the dequeue waits, for a time earlier than any it knew of).
- A message given back (``requeue``) or redelivered after its lease keeps
  its priority and is ready at once.

``fire(schedule, slot, message, *, priority=0, keep)`` is how periodic tasks
fire exactly once across every engine sharing the queue: in one atomic step
it records the pair (*schedule*, *slot*) and stores *message* to become ready
at *slot* -- or, if the pair is recorded already, does nothing and returns
False. The pair is remembered for at least *keep* seconds after it was
recorded (long after the message ran and was acked, so a late engine cannot
fire the slot again). Slots are floats, compared exactly (engines pass them
rounded to whole milliseconds). ``last_fired(schedule)`` is the latest slot of
*schedule* still remembered, or None.

Retries and the failed store
----------------------------
``attempts(m)`` is read from what the queue stored with the message, never
from the message: a message comes back ``[task_id, task_name, *args]`` on
every attempt. The count grows only by ``retry``: a message redelivered after
its lease ran out (its engine died) or given back by ``requeue`` keeps the
count it had, so a crash is never counted as a failed attempt.

``retry(m, *, delay, failed_at)``, in one atomic step where the backend has
them: settles *m* (as ``ack`` does) and stores it again -- its priority
kept, ``attempts`` one higher, its first failure time set to *failed_at*
(POSIX seconds) unless it has one already -- to become ready *delay* seconds
from now (the queue's clock; ``delay`` >= 0). A crash at any point leaves
either the leased message (redelivered after its lease, same count) or the
retried one: never neither, never both.

``fail(m, record, *, keep, ttl)``, in one atomic step too: settles *m* and
stores an entry under ``record["task_id"]`` in the failed store (replacing
an entry with that id). *record* holds ``task_id``, ``task`` (the name),
``args`` (a list), ``attempts`` (the attempts made, this one included),
``error_type``, ``error`` (the message), ``traceback`` (text) and
``last_failed_at`` (POSIX seconds). The queue adds ``first_failed_at`` (the
*failed_at* of the message's first ``retry``, or ``last_failed_at`` if it
never had one), ``priority`` and ``expires_at`` (``last_failed_at + ttl``).
Then it drops the entries past their ``expires_at`` and, beyond *keep*
entries, the ones that failed longest ago; it returns how many it dropped.
An entry past its ``expires_at`` is never listed or counted, even before
it is dropped.

The engine passes *m* with its task id filled in (``m[0]``, where the
message had none), and the queue stores *m* as given: the retried message
and the failed entry keep the id that the attempt's log lines carry.

``failed(limit=100, offset=0)`` lists entries (dicts with the keys above),
the latest ``last_failed_at`` first. ``retry_failed(task_id)`` removes the
entry and stores ``[task_id, task, *args]`` again, ready now, with its
priority and ``attempts`` 0, in one atomic step: a crash leaves the entry or
the message. ``retry_failed_all()`` does that for every entry (entries
failing meanwhile may or may not be included) and returns how many.
``delete_failed(task_id)``, ``purge_failed()``: forget entries.

Results
-------
``schedule(m, ..., result_ttl=T)`` stores *T* (seconds > 0) with the message,
as its attempt count is stored: ``requeue``, redelivery after a lease and
``retry`` keep it; ``retry_failed`` stores the message again without it; a
message stored by ``enqueue`` or by another producer has none. The engine
asks for a result that way for ``Engine.call`` and for tasks with
``store_result = True``.

Once an outcome is final (a success; a failure or timeout with no retry
left), the worker calls ``store_result(task_id, record, ttl=T)`` and only
then settles the message (``ack`` or ``fail``): a crash in between runs the
task again, which stores its result again (replacing it), so a result is
never lost where the message is not. *record* is a JSON-serializable dict
with the keys ``task_id``, ``task``, ``state`` (``"succeeded"`` or
``"failed"``), ``value`` (the return value, None for a failure),
``error_type``, ``error``, ``traceback`` (None for a success), ``attempts``
and ``finished_at`` (POSIX seconds). The queue adds ``expires_at``
(the moment it stores the record, on its own clock, + *ttl*), replaces any record of that
id atomically, and wakes every waiter on it, in this process and others.
``result(task_id, timeout)`` returns the record as JSON gives it back,
never one past its ``expires_at``; it waits without polling once a second
(each built-in queue says how it is woken).
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

from tempest.exceptions import ConfigurationError

__all__ = [
    "DEFAULT_HEARTBEAT",
    "DEFAULT_LEASE",
    "DEFAULT_MAX_DELIVERIES",
    "ENGINE_METHODS",
    "FAILED_FIELDS",
    "FAILED_METHODS",
    "FailingQueue",
    "INSPECT_METHODS",
    "Leases",
    "OUTCOMES",
    "POISON_REASON",
    "PRIORITY_MAX",
    "PRIORITY_MIN",
    "Queue",
    "RESULT_FIELDS",
    "RESULT_METHODS",
    "RETRY_METHODS",
    "ReliableQueue",
    "ResultQueue",
    "SchedulingQueue",
    "announcement",
    "decode",
    "encode",
    "engine_id_of",
    "failed_entry",
    "forks",
    "inspected",
    "lease_options",
    "outcome_counts",
    "page",
    "page_or_all",
    "priority",
    "seconds",
    "since_minute",
    "task_id_of",
    "task_prefix",
]

DEFAULT_LEASE = 30.0
"""Seconds a dequeued message stays leased without a heartbeat."""

DEFAULT_HEARTBEAT = 10.0
"""Seconds between heartbeats (a third of the default lease)."""

DEFAULT_MAX_DELIVERIES = 5
"""Deliveries without an outcome before a message is set aside as poison."""

POISON_REASON = "TooManyDeliveries"
"""The reason a poison message is rejected with."""

PRIORITY_MIN, PRIORITY_MAX = -(2**31), 2**31 - 1
"""The priorities a message may have: PostgreSQL's ``integer``, SQLite's and Redis's too."""


_forks = 0


def _after_fork_in_child() -> None:
    global _forks
    _forks += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def forks() -> int:
    """How many forks this process is removed from its first ancestor.

    A queue object notes it when made; a different count later means it runs
    in a forked child, which must not use its parent's connections or leases.
    Compared on every call, where ``os.getpid()`` would cost a system call.
    Counted by ``os.register_at_fork``: forks made through ``os.fork`` (and
    ``multiprocessing``'s fork start method); a fork in C code that skips
    Python's at-fork hooks is not seen.
    """
    return _forks


@runtime_checkable
class Queue(Protocol):
    """What every queue has."""

    def enqueue(self, message: list[Any]) -> None:
        """Store *message*."""

    def dequeue(self) -> Any:
        """Return one message, or None when empty."""


@runtime_checkable
class ReliableQueue(Queue, Protocol):
    """A queue that leases messages until they are acked: at-least-once."""

    def ack(self, message: Any) -> None:
        """The message's outcome is final: forget it."""

    def reject(self, message: Any, reason: str) -> None:
        """Keep an unrunnable message aside."""

    def requeue(self, message: Any) -> None:
        """Give a leased message back now, unrun."""


@runtime_checkable
class SchedulingQueue(Queue, Protocol):
    """A queue that stores delayed and prioritised messages, and fires periodic slots once."""

    def schedule(self, message: list[Any], *, delay: float | None = None,
                 at: float | None = None, priority: int = 0) -> None:
        """Store *message* to become ready after *delay* seconds, or at POSIX time *at*."""

    def scheduled_count(self) -> int:
        """Messages waiting for their time."""

    def fire(self, schedule: str, slot: float, message: list[Any], *, priority: int = 0,
             keep: float) -> bool:
        """Store *message* for *slot* unless that slot of *schedule* fired already."""

    def last_fired(self, schedule: str) -> float | None:
        """The latest slot of *schedule* still remembered, or None."""


@runtime_checkable
class FailingQueue(Queue, Protocol):
    """A queue that retries messages later and keeps the ones that failed for good."""

    def attempts(self, message: Any) -> int:
        """Failed attempts stored with *message*, which this queue object handed out."""

    def retry(self, message: Any, *, delay: float, failed_at: float) -> None:
        """Settle *message* and store it again, ready in *delay* seconds, one attempt more."""

    def fail(self, message: Any, record: dict[str, Any], *, keep: int, ttl: float) -> int:
        """Settle *message* into the failed store; return how many old entries were dropped."""

    def failed(self, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """Entries of the failed store, latest failure first."""

    def failed_count(self) -> int:
        """Entries in the failed store."""

    def find_failed(self, task_id: str) -> dict[str, Any] | None:
        """The entry of *task_id*, or None."""

    def retry_failed(self, task_id: str) -> bool:
        """Move the entry of *task_id* back into the queue, ready now; False if none."""

    def retry_failed_all(self) -> int:
        """Move every entry back into the queue; return how many."""

    def delete_failed(self, task_id: str) -> bool:
        """Forget the entry of *task_id*; False if there was none."""

    def purge_failed(self) -> int:
        """Forget every entry; return how many."""


@runtime_checkable
class ResultQueue(Queue, Protocol):
    """A queue that keeps the results of the messages that ask for them."""

    def result_ttl(self, message: Any) -> float | None:
        """Seconds to keep *message*'s result, as stored with it; None: no result asked."""

    def store_result(self, task_id: str, record: dict[str, Any], *, ttl: float) -> None:
        """Keep *record* as *task_id*'s result for *ttl* seconds; wake its waiters."""

    def result(self, task_id: str, timeout: float | None = None) -> dict[str, Any] | None:
        """*task_id*'s result record, waiting up to *timeout* seconds; None if none came."""


RESULT_FIELDS = ("task_id", "task", "state", "value", "error_type", "error", "traceback",
                 "attempts", "finished_at", "expires_at")
"""The keys of a result record, as ``result()`` returns it."""

RESULT_METHODS = ("result_ttl", "store_result", "result", "schedule")
"""What a queue needs for results."""

FAILED_FIELDS = ("task_id", "task", "args", "attempts", "error_type", "error", "traceback",
                 "first_failed_at", "last_failed_at", "priority", "expires_at")
"""The keys of a failed-store entry, as ``failed()`` and ``find_failed()`` return it."""

RETRY_METHODS = ("attempts", "retry")
"""What a queue needs for retries."""

FAILED_METHODS = ("fail", "failed", "failed_count", "find_failed", "retry_failed",
                  "retry_failed_all", "delete_failed", "purge_failed")
"""What a queue needs for the failed store."""


ENGINE_METHODS = ("announce", "engines", "forget_engine", "add_outcomes", "outcomes")
"""What a queue needs to keep engine records and outcome counts (all or none)."""

INSPECT_METHODS = ("peek", "peek_scheduled", "rejected", "rejected_count", "find")
"""What a queue needs to be inspected: its messages listed and found (all or none)."""

OUTCOMES = ("succeeded", "failed", "timed_out", "rejected", "retried")
"""The outcomes ``add_outcomes`` counts."""


def page(where: str, limit: object, offset: object) -> tuple[int, int]:
    """(*limit*, *offset*) checked: ints >= 0. TypeError for what is no int,
    ValueError for a negative one; *where* (``Queue.method``) starts the message."""
    return _count(where, "limit", limit), _count(where, "offset", offset)


def page_or_all(where: str, limit: object, offset: object) -> tuple[int | None, int]:
    """``page``, with *limit* None (no limit) allowed: ``rejected(limit=None)``."""
    if limit is None:
        return None, _count(where, "offset", offset)
    return page(where, limit, offset)


def _count(where: str, argument: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{where}: {argument} must be an int, not {value!r}")
    if value < 0:
        raise ValueError(f"{where}: {argument} must be >= 0, not {value!r}")
    return value


def announcement(where: str, engine_id: object, record: object, ttl: object
                 ) -> tuple[str, str, float]:
    """(engine id, the record as JSON text, ttl in seconds) of ``announce``, checked."""
    engine_id = engine_id_of(where, engine_id)
    if not engine_id:
        raise ValueError(f"{where}: engine_id must not be empty")
    if not isinstance(record, dict):
        raise TypeError(f"{where}: record must be a dict, not {type(record).__name__}")
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl < math.inf:
        raise ValueError(f"{where}: ttl must be a number of seconds > 0, not {ttl!r}")
    return engine_id, json.dumps(record, separators=(",", ":"), allow_nan=False), float(ttl)


def settling(where: str, messages: object) -> list[Any]:
    """The *messages* of ``ack_and_dequeue``, checked: a non-empty list (TypeError
    otherwise, naming *where*)."""
    if not isinstance(messages, list) or not messages:
        raise TypeError(f"{where}: messages must be a non-empty list of messages, not "
                        f"{type(messages).__name__} {messages!r:.60}")
    return messages


def whole_count(where: str, count: object) -> int:
    """A *count* of messages, checked: an int, not a bool (TypeError otherwise)."""
    if isinstance(count, bool) or not isinstance(count, int):
        raise TypeError(f"{where}: count must be an int, not {count!r}")
    return count


def result_fields(where: str, task_id: object, record: object) -> dict[str, Any]:
    """The fields of a ``store_result`` *record* to store: every one but ``expires_at``
    (the queue sets it). ValueError for a *task_id* that is not a non-empty str,
    TypeError for a *record* that is not a dict; *where* names the method."""
    if not isinstance(task_id, str) or not task_id:
        raise ValueError(f"{where}: task_id must be a non-empty str, not {task_id!r}")
    if not isinstance(record, dict):
        raise TypeError(f"{where}: record must be a dict, not {type(record).__name__}")
    return {key: value for key, value in record.items() if key != "expires_at"}


def engine_id_of(where: str, engine_id: object) -> str:
    """*engine_id* of ``announce`` or ``forget_engine``, checked: a str (TypeError
    otherwise)."""
    if not isinstance(engine_id, str):
        raise TypeError(f"{where}: engine_id must be a str, not {engine_id!r}")
    return engine_id


def outcome_counts(where: str, minute: object, counts: object) -> dict[str, int]:
    """The counts of ``add_outcomes`` checked, those of 0 left out.

    *minute* must be an int, a whole POSIX minute (a multiple of 60); *counts*
    a dict of OUTCOMES to ints >= 0.
    """
    if isinstance(minute, bool) or not isinstance(minute, int):
        raise TypeError(f"{where}: minute must be an int, not {minute!r}")
    if minute % 60:
        raise ValueError(f"{where}: minute must be a whole POSIX minute "
                         f"(int(time // 60) * 60), not {minute!r}")
    if not isinstance(counts, dict):
        raise TypeError(f"{where}: counts must be a dict, not {type(counts).__name__}")
    checked: dict[str, int] = {}
    for outcome, count in counts.items():
        if outcome not in OUTCOMES:
            raise ValueError(f"{where}: {outcome!r} is no outcome; one of {', '.join(OUTCOMES)}")
        if _count(where, outcome, count):
            checked[outcome] = count
    return checked


def since_minute(where: str, since: object) -> float:
    """*since* of ``outcomes``, checked: a number of POSIX seconds."""
    if isinstance(since, bool) or not isinstance(since, (int, float)) or math.isnan(since):
        raise TypeError(f"{where}: since must be a number of POSIX seconds, not {since!r}")
    return float(since)


def task_id_of(where: str, task_id: object) -> str:
    """*task_id* of ``find``, checked: a str (TypeError otherwise)."""
    if not isinstance(task_id, str):
        raise TypeError(f"{where}: task_id must be a str, not {task_id!r}")
    return task_id


def task_prefix(task_id: str) -> str:
    """How the stored JSON of a message of *task_id* starts: ``["<id>"``, as ``encode``
    writes it (a message stored by another producer with spaces in it is not matched)."""
    return "[" + encode(task_id)


def inspected(message: Any, priority: int, attempts: int, at: float | None = None,
              status: str | None = None) -> dict[str, Any]:
    """A listed message, as ``peek`` (*at*: ``peek_scheduled``; *status*: ``find``) gives it."""
    entry: dict[str, Any] = {} if status is None else {"status": status}
    entry.update(message=message, priority=int(priority), attempts=int(attempts))
    if at is not None:
        entry["at"] = float(at)
    return entry


def failed_entry(row: tuple[Any, ...] | list[Any]) -> dict[str, Any]:
    """A failed-store entry (the keys of FAILED_FIELDS) from a SQL row of
    (task_id, body, task, attempts, error_type, error, traceback, first_failed_at,
    last_failed_at, priority, expires_at); ``args`` are read from the stored body."""
    (task_id, body, task, attempts, error_type, error, traceback, first_failed_at,
     last_failed_at, priority, expires_at) = row
    message = decode(body)
    return {"task_id": task_id, "task": task,
            "args": message[2:] if isinstance(message, list) else [],
            "attempts": attempts, "error_type": error_type, "error": error,
            "traceback": traceback, "first_failed_at": first_failed_at,
            "last_failed_at": last_failed_at, "priority": priority, "expires_at": expires_at}


def priority(value: object, argument: str = "priority") -> int:
    """*value* as a message priority; TypeError or ValueError naming *argument*."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{argument} must be an int, not {value!r}")
    if not PRIORITY_MIN <= value <= PRIORITY_MAX:
        raise ValueError(f"{argument} must be from {PRIORITY_MIN} to {PRIORITY_MAX} "
                         f"(a 32-bit integer), not {value!r}")
    return value


def encode(message: Any) -> str:
    """The stored form of *message*: compact JSON."""
    return json.dumps(message, separators=(",", ":"), allow_nan=False)


def decode(stored: str | bytes) -> Any:
    """The message from its stored form, or *stored* itself if it is not a JSON list.

    Returning what cannot be decoded raw lets the engine reject it as bad input
    (reason ``Undecodable``) instead of the queue dropping or crashing on it.
    JSON nested deeper than Python's recursion limit (``[[[...]]]``, 10,000
    levels) raises RecursionError in ``json.loads``: undecodable too.
    """
    try:
        message = json.loads(stored)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return stored
    return message if isinstance(message, list) else stored


class Leases:
    """The messages a queue object handed out and not yet settled, by identity.

    ``add`` remembers the stored row's key for the object ``dequeue`` returns;
    ``pop`` finds it again when the engine acks, rejects or requeues that same
    object. Holding the object keeps its ``id()`` from being reused meanwhile.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[int, tuple[Any, Any]] = {}

    def add(self, message: Any, key: Any) -> Any:
        """Remember *key* for *message*; return *message*."""
        with self._lock:
            self._held[id(message)] = (message, key)
        return message

    def pop(self, message: Any) -> Any:
        """The key of *message*, forgotten; KeyError if it is not held."""
        with self._lock:
            held, key = self._held.pop(id(message))
        if held is not message:  # pragma: no cover - ids are unique while held
            raise KeyError(message)
        return key

    def settle(self, message: Any, where: str) -> Any:
        """``pop``, for ack, reject or requeue: ValueError (naming *where*) if not held."""
        try:
            return self.pop(message)
        except KeyError:
            raise ValueError(
                f"{where}: {message!r:.80} is not a message this queue object dequeued, "
                f"or it was already acked, rejected or requeued") from None

    def get(self, message: Any, where: str) -> Any:
        """The key of *message*, kept held; ValueError (naming *where*) if it is not held."""
        with self._lock:
            held = self._held.get(id(message))
        if held is None or held[0] is not message:
            raise ValueError(
                f"{where}: {message!r:.80} is not a message this queue object dequeued, "
                f"or it was already acked, rejected, requeued, retried or failed")
        return held[1]

    def keys(self) -> list[Any]:
        """Keys of every message held."""
        with self._lock:
            return [key for _, key in self._held.values()]

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.keys())


def seconds(owner: str, option: str, value: object) -> float:
    """*value* as a number of seconds > 0; ConfigurationError naming *owner* and *option*."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not 0 < value < math.inf:
        raise ConfigurationError(
            f"{owner}: {option} must be a number of seconds > 0, not {value!r}")
    return float(value)


def lease_options(owner: str, lease: object, heartbeat_interval: object,
                  max_deliveries: object) -> tuple[float, float, int]:
    """A reliable queue's ``lease``, ``heartbeat_interval`` and ``max_deliveries``, checked.

    ``heartbeat_interval`` None means a third of the lease. *owner* (the
    queue's class name) starts each ConfigurationError message.
    """
    lease_s = seconds(owner, "lease", lease)
    interval = (lease_s / 3 if heartbeat_interval is None
                else seconds(owner, "heartbeat_interval", heartbeat_interval))
    if interval >= lease_s:
        raise ConfigurationError(
            f"{owner}: heartbeat_interval ({interval}) must be shorter than lease "
            f"({lease_s}), or leases run out between heartbeats")
    if isinstance(max_deliveries, bool) or not isinstance(max_deliveries, int) \
            or max_deliveries < 1:
        raise ConfigurationError(
            f"{owner}: max_deliveries must be an int >= 1, not {max_deliveries!r}")
    return lease_s, interval, max_deliveries
