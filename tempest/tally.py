"""Outcome counts per task, kept per thread so that counting needs no lock of its own.

Every thread that ends a task's attempt (a worker, a coroutine task's settler,
the supervisor or the event loop for a timeout) counts it in a :class:`Tally`
of its own, created the first time it counts. Only that thread writes it, so
an increment is a few list operations under the GIL; a reader (``stats()``,
the stats line, the engine record, a metrics scrape) sums every tally of the
run. A reader may see one thread's latest count a moment late: never a count
lost, never a count twice. (The runtime counts a settled message inside the
lock section in which it already lowers its running count, and ``stats()``
sums under that lock, so that it sees both change together.)

Per task name a tally holds one row: a count per outcome, the sum of the
attempts' durations and a duration histogram (Prometheus buckets, not
cumulative). It also holds the shortest and longest duration since the stats
line last looked (:meth:`Tallies.take_extremes`).
"""

from __future__ import annotations

import bisect
import threading
from typing import Any

__all__ = [
    "BOUNDS",
    "BUCKET",
    "FAILED",
    "FIRST_BOUND",
    "OUTCOMES",
    "REJECTED",
    "RETRIED",
    "ROW",
    "SUCCEEDED",
    "SUM",
    "TIMED_OUT",
    "Tallies",
    "Tally",
    "bucket",
]

OUTCOMES = ("succeeded", "failed", "timed_out", "rejected", "retried")
"""The outcomes counted, in the order of a row's first cells."""

SUCCEEDED, FAILED, TIMED_OUT, REJECTED, RETRIED = range(len(OUTCOMES))

BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
"""Upper bounds (seconds) of the duration histogram's buckets; one more for the rest."""

SUM = len(OUTCOMES)
"""The row's cell holding the sum of durations (seconds)."""

BUCKET = SUM + 1
"""The row's first histogram cell: attempts with duration <= BOUNDS[0]."""

ROW = BUCKET + len(BOUNDS) + 1

FIRST_BOUND = BOUNDS[0]
"""The first bucket's bound: most attempts of short tasks fall in it."""


def bucket(duration: float) -> int:
    """The histogram bucket of *duration*: an index from 0 (``<= BOUNDS[0]``) to
    ``len(BOUNDS)`` (longer than every bound)."""
    return bisect.bisect_left(BOUNDS, duration)


class Tally:
    """One thread's counts: written by that thread only."""

    __slots__ = ("high", "low", "tasks")

    def __init__(self) -> None:
        self.tasks: dict[str, list[Any]] = {}
        self.low = float("inf")
        """The shortest duration since the stats line last took it."""
        self.high = 0.0
        """The longest duration since the stats line last took it."""

    def add(self, name: str) -> list[Any]:
        """A new row of zeros for task *name*."""
        row = self.tasks[name] = [0] * SUM + [0.0] + [0] * (ROW - BUCKET)
        return row

    def count(self, name: str, outcome: int, duration: float | None) -> None:
        """Count one *outcome* (an index into OUTCOMES) of task *name*; *duration*
        (seconds) for an attempt that ran, None for a rejected message."""
        row = self.tasks.get(name)
        if row is None:
            row = self.add(name)
        row[outcome] += 1
        if duration is not None:
            row[SUM] += duration
            if duration <= FIRST_BOUND:  # most attempts, where counting must cost least
                row[BUCKET] += 1
            else:
                row[BUCKET + bucket(duration)] += 1
            # Compared, not min()/max(): a builtin call per task costs more.
            if duration < self.low:  # noqa: PLR1730
                self.low = duration
            if duration > self.high:  # noqa: PLR1730
                self.high = duration


class Tallies:
    """The tallies of one run: one per thread that counts, summed when read."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()  # only to add a tally: once per thread
        self._all: list[Tally] = []

    def mine(self) -> Tally:
        """The calling thread's tally (made on its first count)."""
        try:
            return self._local.tally  # type: ignore[no-any-return]
        except AttributeError:
            tally = self._local.tally = Tally()
            with self._lock:
                self._all.append(tally)
            return tally

    def rows(self) -> dict[str, list[Any]]:
        """Every task's row, summed over the threads (fresh lists: the caller's)."""
        with self._lock:
            tallies = list(self._all)
        summed: dict[str, list[Any]] = {}
        for tally in tallies:
            # A copy in one step (C code, the GIL held): the owner may add a task meanwhile.
            for name, row in tally.tasks.copy().items():
                total = summed.get(name)
                if total is None:
                    summed[name] = list(row)
                else:
                    for cell, value in enumerate(row):
                        total[cell] += value
        return summed

    def totals(self) -> dict[str, Any]:
        """The counts per outcome over every task, with ``processed`` (every outcome but
        ``rejected``), ``observed_sum`` (seconds, over the attempts that ran)."""
        counts = [0] * SUM
        seconds = 0.0
        for row in self.rows().values():
            for cell in range(SUM):
                counts[cell] += row[cell]
            seconds += row[SUM]
        totals: dict[str, Any] = dict(zip(OUTCOMES, counts, strict=True))
        totals["processed"] = sum(counts) - counts[REJECTED]
        totals["observed_sum"] = seconds
        return totals

    def take_extremes(self) -> tuple[float, float] | None:
        """The shortest and longest duration since the last call; None if no attempt
        ended meanwhile. An attempt ending just as this runs may count in the next
        interval's instead (its owner compares with the values being reset)."""
        with self._lock:
            tallies = list(self._all)
        low, high = float("inf"), 0.0
        for tally in tallies:
            low, high = min(low, tally.low), max(high, tally.high)
            tally.low, tally.high = float("inf"), 0.0
        return None if low == float("inf") else (low, high)
