"""MemoryQueue: a thread-safe in-process queue, with delayed and prioritised messages."""

from __future__ import annotations

import collections
import heapq
import itertools
import json
import math
import operator
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, NoReturn

from tempest.queues import protocol
from tempest.queues._fifo import Fifo
from tempest.results import MemoryResults

__all__ = ["MemoryQueue"]


class _Wake:
    """The token ``schedule`` puts in the plain queue to wake a waiting ``dequeue``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<wake>"


_WAKE = _Wake()


def _not_none(where: str) -> NoReturn:
    """Refuse None as a message: ``dequeue`` returning None means "empty", so a stored
    None would be dropped unseen (and, taken in a batch, counted as running for ever)."""
    raise TypeError(f"MemoryQueue.{where}: a message cannot be None (dequeue returns None "
                    f"for an empty queue); enqueue a list [task_id, task_name, *args]")


class _Ranked(list):  # type: ignore[type-arg]
    """A message of a priority other than 0, one that failed before, or one that asks
    for its result, as stored and as ``dequeue`` hands it out.

    A list like any other message; ``requeue``, ``retry`` and ``fail`` read its
    priority, failed attempts, first failure time and result ttl back from it.
    """

    __slots__ = ("attempts", "first_failed_at", "priority", "result_ttl")
    priority: int
    attempts: int
    first_failed_at: float | None
    result_ttl: float | None


class MemoryQueue:
    """A thread-safe queue living in this process.

    Fast and dependency-free, for tests, scripts and work that may be lost
    with the process: delivery is at-most-once (it has no ``ack``), and
    delayed messages are gone with the process too. A waiting
    ``dequeue(timeout=...)`` wakes the moment a message is enqueued, or the
    moment a delayed one's time comes, and holds no lock that ``enqueue``
    would need.

    ``schedule(message, delay=, at=, priority=)`` stores a message that becomes
    ready later (times are this machine's ``time.time()``), or with a priority:
    among ready messages, higher priority first, then in the order they became
    ready. ``requeue`` puts a message back behind the others of its priority.

    Messages the engine rejects (bad input) are kept aside: ``rejected()``
    lists them with their reasons. ``retry`` stores a failed message again,
    delayed, its attempt count kept with it; ``fail`` puts a finally failed one
    in the failed store (``failed()``, ``retry_failed()``, ...), gone with the
    process like everything else here. ``store_result`` keeps a task's result
    (as JSON text) and wakes every ``result()`` waiting for it at once.

    Engine records (``announce``, ``engines``, ...) and outcome counts
    (``add_outcomes``, ``outcomes``) are kept here too, for the engines of
    this process; ``peek``, ``peek_scheduled`` and ``find`` look at the
    messages without taking any (see :mod:`tempest.queues.protocol`). With no
    ``ack``, nothing is ever leased: ``find`` finds messages waiting or
    scheduled.
    """

    def __init__(self) -> None:
        # Plain mode (nothing delayed or prioritised, the common case): every
        # message goes through _plain, a Fifo -- put() never blocks and takes no
        # lock, get() with a timeout sleeps on a lock of its own without polling
        # (see _fifo for why not queue.SimpleQueue). Ranked mode (_ranked True, switched under
        # _lock): ready messages are ordered in the heap _ready by (-priority,
        # ready time, seq), delayed ones wait in _scheduled by (due, seq); _plain
        # still takes enqueues that raced with the switch and the _WAKE tokens,
        # and each dequeue moves what it holds into _ready first.
        self._plain = Fifo()
        self._lock = threading.Lock()
        self._ranked = False
        self._ready: list[tuple[int, float, int, Any]] = []
        self._scheduled: list[tuple[float, int, int, Any]] = []
        self._seq = itertools.count()
        self._tokens = 0  # _WAKE tokens in _plain, so that len() leaves them out
        self._fired: dict[str, dict[float, float]] = {}
        self._rejected: list[tuple[Any, str]] = []
        self._rejected_lock = threading.Lock()
        # The failed store: task id -> entry, the one that failed longest ago first.
        self._failed: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        self._results = MemoryResults()
        # Engine records (engine id -> (record JSON, monotonic expiry)) and outcome
        # buckets (POSIX minute -> outcome -> count), under _watch_lock.
        self._watch_lock = threading.Lock()
        self._engines: dict[str, tuple[str, float]] = {}
        self._outcomes: dict[int, dict[str, int]] = {}

    # -- storing ---------------------------------------------------------------------

    def enqueue(self, message: Any) -> None:
        """Append *message*: ready now, priority 0. None is no message: TypeError."""
        if message is None:
            _not_none("enqueue")
        if self._ranked:
            with self._lock:
                if self._ranked:  # still: not switched back meanwhile
                    self._push_ready(0, time.time(), message)
                    # A dequeue blocked in _plain.get() (until the next delayed
                    # message's time) learns of it from the token.
                    self._tokens += 1
                    self._plain.put(_WAKE)
                    return
        self._plain.put(message)

    def schedule(self, message: Any, *, delay: float | None = None, at: float | None = None,
                 priority: int = 0, result_ttl: float | None = None) -> None:
        """Store *message* to become ready after *delay* seconds or at POSIX time *at*;
        with *result_ttl*, its result is kept that many seconds (see ``store_result``)."""
        if message is None:
            _not_none("schedule")
        if result_ttl is not None:
            message = _ranked(message, priority)
            message.result_ttl = result_ttl
        now = time.time()
        due = now + delay if delay is not None else at if at is not None else now
        with self._lock:
            self._store(message, due, priority, now)

    def fire(self, schedule: str, slot: float, message: Any, *, priority: int = 0,
             keep: float) -> bool:
        """Store *message* for time *slot* unless that slot of *schedule* fired already."""
        now = time.time()
        with self._lock:
            fired = self._fired.setdefault(schedule, {})
            for old in [s for s, recorded in fired.items() if recorded < now - keep]:
                del fired[old]
            if slot in fired:
                return False
            fired[slot] = now
            self._store(message, slot, priority, now)
            return True

    def last_fired(self, schedule: str) -> float | None:
        """The latest slot of *schedule* still remembered, or None."""
        with self._lock:
            fired = self._fired.get(schedule)
            return max(fired) if fired else None

    def _store(self, message: Any, due: float, priority: int, now: float) -> None:
        """Under _lock: store *message*, ready at *due*, and wake a waiter if it must look."""
        if due <= now and priority == 0 and not self._ranked:
            self._plain.put(message)
            return
        if not self._ranked:
            self._ranked = True
            self._absorb_plain(-math.inf)  # ready before anything ranked: first in line
        if due <= now:
            self._push_ready(priority, now, message)
        else:
            earliest = self._scheduled[0][0] if self._scheduled else None
            heapq.heappush(self._scheduled, (due, next(self._seq), priority, message))
            if earliest is not None and earliest <= due:
                return  # a waiter already waits no longer than the earlier one's time
        # A dequeue blocked in _plain.get() learns of the ranked message (or of
        # an earlier time to wake at) from the token.
        self._tokens += 1
        self._plain.put(_WAKE)

    def _absorb_plain(self, ready_at: float) -> None:
        """Under _lock: move what _plain holds into _ready (priority 0), tokens aside."""
        while True:
            try:
                item = self._plain.get_nowait()
            except queue.Empty:
                return
            if item is _WAKE:
                self._tokens -= 1
            else:
                self._push_ready(0, ready_at, item)

    def _push_ready(self, priority: int, ready_at: float, message: Any) -> None:
        heapq.heappush(self._ready, (-priority, ready_at, next(self._seq), message))

    # -- taking ----------------------------------------------------------------------

    def dequeue(self, timeout: float | None = None) -> Any:
        """Take the next ready message, waiting up to *timeout* seconds; None if none."""
        wait = timeout if timeout is not None and timeout > 0 else 0.0
        deadline = time.monotonic() + wait if wait else 0.0
        if not self._ranked:
            try:
                message = self._plain.get(wait) if wait else self._plain.get_nowait()
            except queue.Empty:
                return None
            if message is not _WAKE and not self._ranked:
                return message
            self._took(message)
        return self._dequeue_ranked(deadline)

    def dequeue_many(self, count: int, timeout: float | None = None) -> list[Any]:
        """Take up to *count* messages, waiting up to *timeout* seconds for the first."""
        first = self.dequeue(timeout)
        if first is None:
            return []
        messages = [first]
        get = self._plain.get_nowait
        while len(messages) < count:
            if self._ranked:
                message = self._dequeue_ranked(0.0)
                if message is None:
                    break
            else:
                try:
                    message = get()
                except queue.Empty:
                    break
                if message is _WAKE or self._ranked:
                    self._took(message)
                    continue
            messages.append(message)
        return messages

    def _took(self, item: Any) -> None:
        """Account for *item*, taken from _plain on the plain path: a token, or a message
        that must now take its turn among the ranked ones."""
        with self._lock:
            if item is _WAKE:
                self._tokens -= 1
            elif self._ranked:
                self._push_ready(0, time.time(), item)
            else:  # switched back meanwhile: it is next
                self._push_ready(0, -math.inf, item)
                self._ranked = True

    def _dequeue_ranked(self, deadline: float) -> Any:
        """dequeue(), once ranked: look, then wait for a token or the next delayed time."""
        while True:
            message, due = self._take_ranked()
            if message is not None:
                return message
            wait = deadline - time.monotonic()
            if wait <= 0:
                return None
            if due is not None:
                wait = min(wait, due - time.time())
                if wait <= 0:
                    continue  # due already: take it
            try:
                item = self._plain.get(timeout=wait)
            except queue.Empty:
                continue  # the deadline, or a delayed message's time: look again
            self._took(item)

    def _take_ranked(self) -> tuple[Any, float | None]:
        """The next ready message (None if none) and the next delayed one's time."""
        now = time.time()
        with self._lock:
            self._absorb_plain(now)  # arrived before this look: ready now, in order
            scheduled = self._scheduled
            while scheduled and scheduled[0][0] <= now:
                due, _, priority, message = heapq.heappop(scheduled)
                self._push_ready(priority, due, message)
            if self._ready:
                neg_priority, _, _, message = heapq.heappop(self._ready)
                if neg_priority and type(message) is not _Ranked:
                    message = _ranked(message, -neg_priority)
                return message, None
            if not scheduled:
                self._ranked = False  # back to the plain queue alone
                return None, None
            return None, scheduled[0][0]

    # -- settling --------------------------------------------------------------------

    def requeue(self, message: Any) -> None:
        """Give back a message that was dequeued but not run: behind those of its priority."""
        priority = getattr(message, "priority", 0)
        if priority == 0:
            self.enqueue(message)  # a _Ranked message keeps its attempts, as stored
            return
        with self._lock:
            self._store(message, time.time(), priority, time.time())

    def reject(self, message: Any, reason: str) -> None:
        """Keep a message the engine could not run, with the reason."""
        with self._rejected_lock:
            self._rejected.append((message, reason))

    def rejected(self, limit: int | None = None, offset: int = 0) -> list[tuple[Any, str]]:
        """The rejected messages so far, oldest first, as (message, reason): all of them,
        or *limit* (None: no limit) from *offset*."""
        limit, offset = protocol.page_or_all("MemoryQueue.rejected", limit, offset)
        with self._rejected_lock:
            end = None if limit is None else offset + limit
            return self._rejected[offset:end]

    def rejected_count(self) -> int:
        """How many messages ``rejected()`` lists."""
        with self._rejected_lock:
            return len(self._rejected)

    # -- inspection (read-only) --------------------------------------------------------

    def peek(self, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """Ready messages, in the order ``dequeue`` would take them, left in place:
        ``{"message", "priority", "attempts"}`` each, *limit* from *offset*."""
        limit, offset = protocol.page("MemoryQueue.peek", limit, offset)
        now, ranked, plain, ready, scheduled = self._copies()
        messages = (item for item in plain if item is not _WAKE)
        if not ranked:
            page = [(0, message) for message in itertools.islice(
                messages, offset, offset + limit)]
        else:
            first = heapq.nsmallest(offset + limit, _ready_keyed(
                now, messages, ready, scheduled), key=_KEY)
            page = [(priority, message) for _, priority, message in first[offset:]]
        return [_listed(priority, message) for priority, message in page]

    def peek_scheduled(self, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """Messages waiting for their time, the soonest first, with ``"at"``: *limit*
        from *offset*."""
        limit, offset = protocol.page("MemoryQueue.peek_scheduled", limit, offset)
        with self._lock:  # a copy only: the selection below must not hold up dequeues
            now, scheduled = time.time(), self._scheduled.copy()
        later = heapq.nsmallest(offset + limit, (entry for entry in scheduled
                                                 if entry[0] > now), key=_DUE_KEY)
        return [_listed(priority, message, at=due)
                for due, _, priority, message in later[offset:]]

    def find(self, task_id: str) -> dict[str, Any] | None:
        """Where the message of *task_id* is: waiting or scheduled (a MemoryQueue leases
        nothing); None if it is in neither."""
        task_id = protocol.task_id_of("MemoryQueue.find", task_id)
        now, _, plain, ready, scheduled = self._copies()
        # A _WAKE token is no message of any id: the filter drops it.
        waiting = [entry for entry in _ready_keyed(now, plain, ready, scheduled)
                   if _is_of(entry[2], task_id)]
        if waiting:
            _, priority, message = min(waiting, key=_KEY)
            return _listed(priority, message, status="waiting")
        later = [entry for entry in scheduled if entry[0] > now and _is_of(entry[3], task_id)]
        if later:
            due, _, priority, message = min(later, key=_DUE_KEY)
            return _listed(priority, message, at=due, status="scheduled")
        return None

    def _copies(self) -> tuple[float, bool, list[Any], list[tuple[int, float, int, Any]],
                               list[tuple[float, int, int, Any]]]:
        """(now, ranked, _plain's items, _ready, _scheduled), copied in one hold of _lock.

        Only copies (C loops over the lists, a few milliseconds for 100,000
        messages): ordering and selecting them happens after the lock is released,
        so that inspecting a long queue never holds up the dequeues that need it.
        """
        with self._lock:
            return (time.time(), self._ranked, self._plain.snapshot(), self._ready.copy(),
                    self._scheduled.copy())

    # -- engines and outcomes ----------------------------------------------------------

    def announce(self, engine_id: str, record: dict[str, Any], ttl: float) -> None:
        """Store or replace *engine_id*'s record, expiring *ttl* seconds from now."""
        engine_id, text, seconds = protocol.announcement(
            "MemoryQueue.announce", engine_id, record, ttl)
        now = time.monotonic()
        with self._watch_lock:
            self._forget_expired(now)
            self._engines[engine_id] = (text, now + seconds)

    def engines(self) -> list[dict[str, Any]]:
        """The records of the engines announced and not expired, by engine id (only
        read: ``announce`` drops the expired ones)."""
        now = time.monotonic()
        with self._watch_lock:
            live = [(key, text) for key, (text, until) in self._engines.items() if until > now]
        return [json.loads(text) for _, text in sorted(live)]

    def forget_engine(self, engine_id: str) -> None:
        """Drop *engine_id*'s record now."""
        protocol.engine_id_of("MemoryQueue.forget_engine", engine_id)
        with self._watch_lock:
            self._engines.pop(engine_id, None)

    def _forget_expired(self, now: float) -> None:
        """Under _watch_lock: drop the expired engine records."""
        for key in [key for key, (_, until) in self._engines.items() if until <= now]:
            del self._engines[key]

    def add_outcomes(self, minute: int, counts: dict[str, int]) -> None:
        """Add *counts* to the bucket of POSIX *minute*; buckets are kept two hours."""
        checked = protocol.outcome_counts("MemoryQueue.add_outcomes", minute, counts)
        oldest = time.time() - _OUTCOMES_KEPT
        with self._watch_lock:
            for old in [m for m in self._outcomes if m < oldest]:
                del self._outcomes[old]
            if checked:
                bucket = self._outcomes.setdefault(minute, {})
                for outcome, count in checked.items():
                    bucket[outcome] = bucket.get(outcome, 0) + count

    def outcomes(self, since: int) -> dict[int, dict[str, int]]:
        """The buckets of the minutes from *since* on: ``{minute: {outcome: count}}``."""
        start = protocol.since_minute("MemoryQueue.outcomes", since)
        with self._watch_lock:
            return {minute: dict(bucket) for minute, bucket in sorted(self._outcomes.items())
                    if minute >= start}

    # -- retries and the failed store ----------------------------------------------------

    def attempts(self, message: Any) -> int:
        """Failed attempts stored with *message* (0: its first run)."""
        return getattr(message, "attempts", 0)

    def retry(self, message: Any, *, delay: float, failed_at: float) -> None:
        """Store *message* again, ready in *delay* seconds, with one failed attempt more."""
        again = _ranked(message, getattr(message, "priority", 0))
        again.attempts = self.attempts(message) + 1
        again.first_failed_at = getattr(message, "first_failed_at", None) or failed_at
        now = time.time()
        with self._lock:
            self._store(again, now + delay, again.priority, now)

    def fail(self, message: Any, record: dict[str, Any], *, keep: int, ttl: float) -> int:
        """Put *message*'s final failure in the failed store; return how many entries the
        bounds (*keep* entries, *ttl* seconds) dropped."""
        entry = dict(record)
        entry["first_failed_at"] = (getattr(message, "first_failed_at", None)
                                    or record["last_failed_at"])
        entry["priority"] = getattr(message, "priority", 0)
        entry["expires_at"] = record["last_failed_at"] + ttl
        now = time.time()
        with self._lock:
            failed = self._failed
            failed.pop(entry["task_id"], None)
            failed[entry["task_id"]] = entry
            dropped = 0
            while failed and (len(failed) > keep
                              or next(iter(failed.values()))["expires_at"] <= now):
                failed.popitem(last=False)
                dropped += 1
            return dropped

    def failed(self, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """Entries of the failed store, the latest failure first."""
        now = time.time()
        with self._lock:
            live = [dict(e) for e in reversed(self._failed.values()) if e["expires_at"] > now]
        return live[offset:offset + limit]

    def failed_count(self) -> int:
        """Entries in the failed store."""
        now = time.time()
        with self._lock:
            return sum(1 for e in self._failed.values() if e["expires_at"] > now)

    def find_failed(self, task_id: str) -> dict[str, Any] | None:
        """The entry of *task_id*, or None."""
        with self._lock:
            entry = self._failed.get(task_id)
            return dict(entry) if entry is not None and entry["expires_at"] > time.time() \
                else None

    def retry_failed(self, task_id: str) -> bool:
        """Move the entry of *task_id* back into the queue, ready now, attempts reset."""
        with self._lock:
            entry = self._failed.get(task_id)
            if entry is None or entry["expires_at"] <= time.time():
                return False
            del self._failed[task_id]
            now = time.time()
            self._store([entry["task_id"], entry["task"], *entry["args"]], now,
                        entry["priority"], now)
            return True

    def retry_failed_all(self) -> int:
        """Move every entry back into the queue; return how many."""
        with self._lock:
            ids = list(self._failed)
        return sum(self.retry_failed(task_id) for task_id in ids)

    def delete_failed(self, task_id: str) -> bool:
        """Forget the entry of *task_id*; False if there was none."""
        with self._lock:
            entry = self._failed.pop(task_id, None)
            return entry is not None and entry["expires_at"] > time.time()

    def purge_failed(self) -> int:
        """Forget every entry; return how many."""
        now = time.time()
        with self._lock:
            count = sum(1 for e in self._failed.values() if e["expires_at"] > now)
            self._failed.clear()
            return count

    # -- results ---------------------------------------------------------------------

    def result_ttl(self, message: Any) -> float | None:
        """Seconds to keep *message*'s result, as ``schedule`` stored it; None: none asked."""
        return getattr(message, "result_ttl", None)

    def store_result(self, task_id: str, record: dict[str, Any], *, ttl: float) -> None:
        """Keep *record* as *task_id*'s result for *ttl* seconds; wakes its waiters at once."""
        self._results.store(task_id, record, ttl=ttl)

    def result(self, task_id: str, timeout: float | None = None) -> dict[str, Any] | None:
        """*task_id*'s result record, waiting up to *timeout* seconds (None: no limit)."""
        return self._results.get(task_id, timeout)

    # -- counting --------------------------------------------------------------------

    def __len__(self) -> int:
        """Messages ready to be taken."""
        with self._lock:
            return (self._plain.qsize() - self._tokens + len(self._ready)
                    + self._due(time.time()))

    def scheduled_count(self) -> int:
        """Messages waiting for their time."""
        with self._lock:
            return len(self._scheduled) - self._due(time.time())

    def _due(self, now: float) -> int:
        """Under _lock: delayed messages whose time has come (not yet moved to _ready).

        Walks only the heap's entries due by *now* (their parents are due too),
        so a count costs nothing for many messages far in the future.
        """
        heap, count, stack = self._scheduled, 0, [0] if self._scheduled else []
        while stack:
            index = stack.pop()
            if index < len(heap) and heap[index][0] <= now:
                count += 1
                stack += (2 * index + 1, 2 * index + 2)
        return count

    def __repr__(self) -> str:
        return f"<MemoryQueue waiting={len(self)}>"


_OUTCOMES_KEPT = 7200.0
"""Seconds an outcome bucket is kept (the protocol promises one hour at least)."""


def _ready_keyed(now: float, plain: Iterable[Any], ready: list[tuple[int, float, int, Any]],
                 scheduled: list[tuple[float, int, int, Any]]
                 ) -> Iterator[tuple[tuple[int, float, int, int], int, Any]]:
    """(key, priority, message) of every ready message in copies taken at *now*, in no
    particular order: sorted by key, they come in the order the takes would hand them
    out (see _take_ranked)."""
    # The next take moves what _plain holds in at *now*, then the due delayed
    # messages at their time, each after what _ready holds (a later seq).
    for neg, ready_at, seq, message in ready:
        yield (neg, ready_at, 0, seq), -neg, message
    for index, message in enumerate(plain):
        yield (0, now, 1, index), 0, message
    for due, seq, priority, message in scheduled:
        if due <= now:
            yield (-priority, due, 2, seq), priority, message


_KEY = operator.itemgetter(0)
"""The take order of _ready_keyed's entries (keys are unique: messages are never compared)."""

_DUE_KEY = operator.itemgetter(0, 1)
"""The order of _scheduled's entries: by due time, then as they were stored."""


def _listed(priority: int, message: Any, *, at: float | None = None,
            status: str | None = None) -> dict[str, Any]:
    """A stored message as inspection lists it: a list copy, as ``dequeue`` gives it."""
    return protocol.inspected(list(message) if isinstance(message, list) else message,
                              priority, getattr(message, "attempts", 0), at, status)


def _is_of(message: Any, task_id: str) -> bool:
    """Whether *message* is a message of *task_id*."""
    return isinstance(message, (list, tuple)) and bool(message) and message[0] == task_id


def _ranked(message: Any, priority: int) -> _Ranked:
    """A copy of *message* that carries *priority* and, from *message*, its attempts."""
    ranked = _Ranked(message)
    ranked.priority = priority
    ranked.attempts = getattr(message, "attempts", 0)
    ranked.first_failed_at = getattr(message, "first_failed_at", None)
    ranked.result_ttl = getattr(message, "result_ttl", None)
    return ranked
