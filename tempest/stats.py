"""The periodic ``stats`` line: what happened since the previous line.

Every ``report_every`` seconds the control loop writes one ``stats`` line to
the main log: the counters of ``stats()`` (totals since the start), then, for
the interval since the previous line (or the start):

=====================  ==================================================================
field                  what
=====================  ==================================================================
``interval``           seconds the figures below cover
``<outcome>_per_s``    outcomes in the interval / its length, for each of ``succeeded``,
                       ``failed``, ``timed_out``, ``rejected``, ``retried`` and
                       ``processed`` (every attempt that ended)
``duration_min``       seconds the shortest attempt that ended in the interval ran
                       (None: none ended); ``duration_avg`` their mean,
                       ``duration_max`` the longest
``busy_min``           the fewest worker threads running a task, sampled every
                       :data:`SAMPLE_EVERY` seconds and at the line; ``busy_avg``
                       their mean, ``busy_max`` the most
``rss``                the process's resident memory now, bytes (None without /proc)
``open_files``         file descriptors the process has open now (None without /proc)
=====================  ==================================================================
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from tempest.tally import OUTCOMES

if TYPE_CHECKING:
    from tempest.runtime import Runtime

__all__ = ["SAMPLE_EVERY", "StatsLine", "open_files", "rss"]

SAMPLE_EVERY = 0.5
"""Seconds between two samples of the busy threads."""


def rss() -> int | None:
    """The process's resident set size in bytes, or None where /proc is missing."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def open_files() -> int | None:
    """How many file descriptors the process has open, or None where /proc is missing."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the one listdir itself opened
    except OSError:
        return None


class StatsLine:
    """The interval figures of the ``stats`` line, for one run (control loop only)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._since = time.monotonic()
        self._before = runtime.tallies.totals()
        runtime.tallies.take_extremes()  # the first interval starts now
        self._busy: list[int] = []

    def sample(self) -> None:
        """Note how many worker threads run a task now."""
        self._busy.append(self.runtime.busy_threads())

    def fields(self) -> dict[str, Any]:
        """The figures since the previous call (or the start); starts the next interval."""
        self.sample()
        now = time.monotonic()
        elapsed = max(now - self._since, 1e-9)
        totals = self.runtime.tallies.totals()
        before, self._before, self._since = self._before, totals, now
        fields: dict[str, Any] = {"interval": round(elapsed, 3)}
        for key in (*OUTCOMES, "processed"):
            fields[f"{key}_per_s"] = round((totals[key] - before[key]) / elapsed, 3)
        ended = totals["processed"] - before["processed"]
        extremes = self.runtime.tallies.take_extremes()
        if ended:
            mean = (totals["observed_sum"] - before["observed_sum"]) / ended
            low, high = extremes if extremes is not None else (mean, mean)
            # An attempt ending as the interval closed may miss the extremes, not the mean.
            fields.update(duration_min=round(min(low, mean), 6), duration_avg=round(mean, 6),
                          duration_max=round(max(high, mean), 6))
        else:
            fields.update(duration_min=None, duration_avg=None, duration_max=None)
        busy, self._busy = self._busy, []
        fields.update(busy_min=min(busy), busy_avg=round(sum(busy) / len(busy), 2),
                      busy_max=max(busy), rss=rss(), open_files=open_files())
        return fields
