"""The engine record: a running engine tells its queue that it lives, and what it does.

Where the queue has the engine registry methods
(:data:`tempest.queues.protocol.ENGINE_METHODS`), a running engine stores a
record of itself every ``announce_every`` seconds
(``announce(engine_id, record, ttl)``, ttl three times the period), so that
anyone reading the queue (``engines()``: the dashboard, a script) sees every
engine alive on it, on any machine. A record not renewed expires: an engine
killed with ``kill -9`` disappears within the ttl. An engine that finishes
(a stop, a burst drained, a fatal error) removes its record at once
(``forget_engine``).

With each record it adds its outcome counts since the last time to the
queue's per-minute buckets (``add_outcomes``), shared by every engine on the
queue: the throughput chart. A crash loses at most the counts of the last
period; a count whose ``add_outcomes`` failed is added with the next one.

The announcer runs in a thread of its own, never in the control loop: a
slow or dead server delays neither signals nor the watchdog. It announces at
once when a stop is requested (the record then says ``"stopping": true``)
and goes on through the drain, until the engine has finished. Failures are
logged as warnings and retried at the next beat; they never stop the engine.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

import tempest
from tempest.periodic import Schedule
from tempest.tally import OUTCOMES

if TYPE_CHECKING:
    from tempest.runtime import Runtime

__all__ = ["RUNNING_MAX", "Announcer", "new_engine_id"]

RUNNING_MAX = 100
"""Running tasks listed in a record at most (the oldest)."""

TTL_FACTOR = 3
"""A record expires this many periods after it was stored."""


def new_engine_id(name: str) -> str:
    """``<hostname>:<pid>:<name>:<8 hex>``: unique per run, readable in a list."""
    return f"{socket.gethostname()}:{os.getpid()}:{name}:{secrets.token_hex(4)}"


def minute(moment: float) -> int:
    """The POSIX minute of *moment*: the start of its bucket in ``add_outcomes``."""
    return int(moment // 60) * 60


def schedule_entry(schedule: Schedule, now: float | None) -> dict[str, Any]:
    """One ``periodic`` item of the record; *now* None: the engine fires nothing more."""
    entry: dict[str, Any] = {"name": schedule.name, "task": schedule.task_name}
    expression = getattr(schedule, "expression", None)
    if expression is not None:
        entry["cron"] = expression
        entry["timezone"] = getattr(schedule, "timezone", "UTC")
    else:
        entry["every"] = schedule.period
    entry["next_at"] = None if now is None else schedule.after(now)
    return entry


class Announcer:
    """The thread of one running engine that keeps its record in the queue."""

    def __init__(self, runtime: Runtime, every: float) -> None:
        self.runtime = runtime
        self.queue = runtime.queue
        self.every = every
        self.ttl = TTL_FACTOR * every
        self.engine_id = runtime.engine_id
        self._added = dict.fromkeys(OUTCOMES, 0)
        """The counts add_outcomes has stored so far (the deltas are counted from here)."""
        self._failures: dict[str, int] = {}
        self._wake = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"tempest-announce:{runtime.name}")

    def start(self) -> None:
        """Start the thread: the first record is stored at once."""
        self._thread.start()

    def wake(self) -> None:
        """Announce now (a stop was requested: the record says so)."""
        self._wake.set()

    def finish(self, timeout: float) -> None:
        """Add the last counts and forget the record; wait up to *timeout* seconds."""
        self._done.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._done.is_set():
            self._call("announce", self.queue.announce, self.engine_id, self.record(),
                       self.ttl)
            self._add_outcomes()
            self._wake.wait(self.every)
            self._wake.clear()
        self._add_outcomes()
        self._call("forget_engine", self.queue.forget_engine, self.engine_id)

    def _add_outcomes(self) -> None:
        totals = self.runtime.tallies.totals()
        deltas = {key: totals[key] - self._added[key] for key in OUTCOMES}
        counts = {key: count for key, count in deltas.items() if count}
        if counts and self._call("add_outcomes", self.queue.add_outcomes,
                                 minute(time.time()), counts):
            for key, count in counts.items():
                self._added[key] += count

    def _call(self, what: str, method: Any, *args: Any) -> bool:
        """Call a registry method; log a failure (a warning) and its recovery."""
        try:
            method(*args)
        except Exception as exc:  # noqa: BLE001 - retried at the next beat, never fatal
            failures = self._failures[what] = self._failures.get(what, 0) + 1
            self.runtime.logs.main.warning(
                f"{what} failed", engine_id=self.engine_id,
                error=f"{type(exc).__name__}: {exc}", attempt=failures,
                retry_in=None if self._done.is_set() else self.every)
            return False
        failures = self._failures.pop(what, 0)
        if failures:
            self.runtime.logs.main.info(f"{what} recovered", attempts=failures)
        return True

    def record(self) -> dict[str, Any]:
        """The engine's record as it stands now (JSON: str, numbers, bools, lists)."""
        runtime = self.runtime
        counts = runtime.counters()
        now = time.time()
        stopping = runtime.stopping
        schedules = runtime.options["periodic"]
        return {
            "engine_id": self.engine_id,
            "name": runtime.name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "threads": runtime.threads,
            "coroutines": runtime.coroutines.limit,
            "guarantee": runtime.guarantee,
            "version": tempest.__version__,
            "started_at": runtime.started_wall,
            "announced_at": now,
            "uptime": counts["uptime"],
            **{key: counts[key] for key in ("processed", *OUTCOMES, "abandoned")},
            "busy": counts["running"],
            "running": runtime.running_tasks(RUNNING_MAX),
            "periodic": [schedule_entry(s, None if stopping else now) for s in schedules],
            "stopping": stopping,
        }
