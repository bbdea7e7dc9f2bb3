"""Periodic tasks: ``every`` and ``cron`` schedules, and the thread that fires them.

::

    from tempest import Engine, cron, every

    class Ops(Engine):
        class configure:
            queue = PostgresQueue(dsn)
            periodic = [cron("0 3 * * *", Report, "daily", timezone="Europe/Berlin"),
                        every(30, Ping)]

Every running engine that declares ``periodic`` takes part: there is no
"beat" process to keep alive. Each engine's scheduler thread fires a slot when
its clock reaches it, through the queue's ``fire``, which records the pair
(schedule, slot) and stores the message in one atomic step, or does nothing
because another engine did it first. So each slot fires exactly once across
every engine sharing the queue, on one machine or many, whatever their clocks
say (within :data:`KEEP_MIN`), and the firing's message becomes ready at the
slot's time on the queue's clock.

Where a firing can be lost or happen twice
------------------------------------------
- Twice: never, while the queue remembers the slot (``keep``: at least
  :data:`KEEP_MIN`, and twice the schedule's period). A message fired once
  *runs* at least once, like any message: on a durable queue an engine killed
  while running it leaves it to be delivered again, with the same task id.
- Lost: a slot that no engine reaches while running is not fired (the
  machines were all down, or every engine stopped): like cron, missed slots
  are skipped. An engine that starts logs how many slots were missed since the
  last firing it can see. A slot whose firing fails (the queue is down) is
  retried until it is :data:`CATCH_UP` seconds old, then logged as missed.
  An engine whose scheduler falls behind (a suspended machine) fires the
  slots it passed, oldest first, up to :data:`CATCH_UP` seconds back.
- An engine killed between ``fire`` returning and logging it loses only the
  ``periodic fired`` line: the message is stored.
"""

from __future__ import annotations

import datetime
import json
import math
import threading
import time
import zoneinfo
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from tempest.exceptions import ConfigurationError
from tempest.queues import protocol

if TYPE_CHECKING:
    from tempest.logs import Logs
    from tempest.task import Task

__all__ = ["CATCH_UP", "KEEP_MIN", "START_GRACE", "Schedule", "cron", "every"]

KEEP_MIN = 3600.0
"""Seconds a queue remembers a fired slot at the least (see ``Schedule.keep``)."""

CATCH_UP = 300.0
"""Seconds after its time that a slot may still be fired (retries, a late scheduler)."""

START_GRACE = 1.0
"""A slot at most this many seconds old when the engine starts is still fired."""

MIN_EVERY = 1.0
"""The shortest period of ``every``, in seconds."""

_MAX_SLEEP = 60.0
"""Longest sleep of the scheduler thread between looks at the clock."""

_RETRY_MIN, _RETRY_MAX = 0.1, 5.0
"""Backoff between attempts to fire a slot while the queue fails."""

_COUNT_LIMIT = 10_000
"""Missed slots counted at most at start (a daily schedule idle for years: "10000+")."""


class Schedule:
    """A periodic task: what to submit, under which name, at which slots.

    Made by :func:`every` and :func:`cron`; the engine's ``periodic`` option
    takes a list of them. ``name`` identifies the schedule in the queue and in
    the task ids of its firings (``<name>@<slot in UTC>``).
    """

    name: str
    """The schedule's name: unique within an engine, shared by every engine."""

    task_name: str
    """The name of the task its firings run."""

    args: list[Any]
    """The firings' arguments (as JSON gives them back)."""

    priority: int | None
    """The firings' priority; None: the task's ``priority`` option (0 for a name)."""

    def __init__(self, task: type[Task] | str, args: tuple[Any, ...], priority: int | None,
                 name: str | None, default_name: str) -> None:
        # tempest.task imports tempest.config, which imports this module.
        from tempest.task import Task  # noqa: PLC0415

        if isinstance(task, type) and issubclass(task, Task) and task is not Task:
            self.task_name = task.task_name
            try:
                task.check_args(args)
            except TypeError as exc:
                raise ConfigurationError(
                    f"{self.task_name}.process{task._signature}: {exc}") from None
            default_priority = task.priority
        elif isinstance(task, str) and task:
            self.task_name = task
            default_priority = 0
        else:
            raise ConfigurationError(
                f"a periodic task is a Task subclass or a task name, not {task!r}")
        try:
            self.args = json.loads(json.dumps(list(args), allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(
                f"the arguments of periodic {self.task_name} must be JSON: {exc}") from None
        if priority is not None:
            try:
                priority = protocol.priority(priority)
            except (TypeError, ValueError) as exc:
                raise ConfigurationError(str(exc)) from None
        self.priority = priority if priority is not None else default_priority or None
        if name is None:
            name = f"{self.task_name}[{default_name}]"
        if not isinstance(name, str) or not name or any(c.isspace() for c in name) \
                or "@" in name:
            raise ConfigurationError(
                f"a schedule's name must be a non-empty str without spaces or '@' (it "
                f"starts the task ids of its firings), not {name!r}")
        self.name = name

    def after(self, moment: float) -> float:
        """The first slot later than POSIX time *moment*, in whole milliseconds."""
        raise NotImplementedError

    @property
    def keep(self) -> float:
        """Seconds the queue remembers a fired slot: KEEP_MIN, or twice the period."""
        return max(KEEP_MIN, 2 * self.period)

    @property
    def period(self) -> float:
        """Seconds between two slots (for cron, the gap after the next slot)."""
        raise NotImplementedError

    def slots(self, start: float, end: float) -> Iterator[float]:
        """The slots after *start*, up to and including *end*."""
        slot = self.after(start)
        while slot <= end:
            yield slot
            slot = self.after(slot)

    def task_id(self, slot: float) -> str:
        """The task id of the firing for *slot*: ``<name>@<slot in UTC>``."""
        return f"{self.name}@{stamp(slot)}"

    def message(self, slot: float) -> list[Any]:
        """The message the firing for *slot* enqueues."""
        return [self.task_id(slot), self.task_name, *self.args]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class _Every(Schedule):
    def __init__(self, seconds: float, task: type[Task] | str, args: tuple[Any, ...],
                 priority: int | None, name: str | None) -> None:
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) \
                or not MIN_EVERY <= seconds < math.inf:
            raise ConfigurationError(
                f"every() takes a number of seconds >= {MIN_EVERY:g}, not {seconds!r}")
        self.seconds = float(seconds)
        super().__init__(task, args, priority, name, f"every_{self.seconds:g}s")

    def after(self, moment: float) -> float:
        # Slots are multiples of the period since the Unix epoch: every engine
        # computes the same ones without asking anyone.
        slot = round((math.floor(moment / self.seconds) + 1) * self.seconds, 3)
        return slot if slot > moment else round(slot + self.seconds, 3)

    @property
    def period(self) -> float:
        return self.seconds


class _Cron(Schedule):
    def __init__(self, expression: str, task: type[Task] | str, args: tuple[Any, ...], *,
                 timezone: str, priority: int | None, name: str | None) -> None:
        try:
            from cronsim import CronSim, CronSimError  # noqa: PLC0415 - an optional extra
        except ImportError:
            raise ConfigurationError(
                "cron() needs the cronsim library: pip install 'task-tempest[cron]'") from None
        if not isinstance(expression, str):
            raise ConfigurationError(f"a cron expression is a str, not {expression!r}")
        if not isinstance(timezone, str):
            raise ConfigurationError(f"timezone must be an IANA name (a str), not {timezone!r}")
        try:
            self.zone = zoneinfo.ZoneInfo(timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
            raise ConfigurationError(
                f"unknown timezone {timezone!r} ({exc}); use an IANA name such as "
                f"'Europe/Berlin' or 'UTC'") from None
        self._cronsim = CronSim
        try:
            CronSim(expression, datetime.datetime.now(self.zone))
        except CronSimError as exc:
            raise ConfigurationError(f"bad cron expression {expression!r}: {exc}") from None
        self.expression = expression
        self.timezone = timezone
        super().__init__(task, args, priority, name, "_".join(expression.split()))
        first = self.after(time.time())
        self._period = self.after(first) - first

    def after(self, moment: float) -> float:
        # cronsim walks wall-clock time in the zone, daylight saving time included.
        start = datetime.datetime.fromtimestamp(moment, self.zone)
        return round(next(self._cronsim(self.expression, start)).timestamp(), 3)

    @property
    def period(self) -> float:
        return self._period


def every(seconds: float, task: type[Task] | str, *args: Any, priority: int | None = None,
          name: str | None = None) -> Schedule:
    """Run *task* with *args* every *seconds* (at least 1).

    Slots are the multiples of *seconds* since the Unix epoch (every 30 s: at
    :00 and :30 of each minute), so all engines agree on them. *name*
    defaults to ``<task>[every_<seconds>s]``; *priority* to the task's own.
    """
    return _Every(seconds, task, args, priority, name)


def cron(expression: str, task: type[Task] | str, *args: Any, timezone: str = "UTC",
         priority: int | None = None, name: str | None = None) -> Schedule:
    """Run *task* with *args* at the times a cron *expression* names, in *timezone*.

    Five fields (minute hour day month weekday) or six (seconds first), as the
    cronsim library reads them, with daylight saving time as Debian's cron
    handles it: a time of day that does not exist that day (clocks go forward)
    fires at the first moment after the gap; one that happens twice (clocks go
    back) fires once; expressions with a step or ``*`` in the hour fire in both
    passes of the repeated hour.
    *timezone* is an IANA name (default ``"UTC"``). *name* defaults to
    ``<task>[<expression with _ for spaces>]``. Needs the ``cron`` extra.
    """
    return _Cron(expression, task, args, timezone=timezone, priority=priority, name=name)


def stamp(slot: float) -> str:
    """*slot* as in task ids: UTC, ``20261206T030000Z`` (milliseconds when not whole)."""
    moment = datetime.datetime.fromtimestamp(slot, datetime.timezone.utc)
    if moment.microsecond:
        return moment.strftime("%Y%m%dT%H%M%S.") + f"{moment.microsecond // 1000:03d}Z"
    return moment.strftime("%Y%m%dT%H%M%SZ")


def check(value: Any) -> tuple[Schedule, ...]:
    """The ``periodic`` option: a list of schedules with distinct names."""
    if value is None:
        return ()
    if isinstance(value, Schedule) or not isinstance(value, Iterable) \
            or isinstance(value, (str, bytes)):
        raise ConfigurationError(
            f"must be a list of every(...) and cron(...) schedules, not {value!r}")
    schedules = tuple(value)
    names: set[str] = set()
    for schedule in schedules:
        if not isinstance(schedule, Schedule):
            raise ConfigurationError(
                f"must hold every(...) and cron(...) schedules, not {schedule!r}")
        if schedule.name in names:
            raise ConfigurationError(
                f"two schedules are named {schedule.name!r}; give one of them "
                f"another name (name='...')")
        names.add(schedule.name)
    return schedules


def missing_methods(queue: Any) -> list[str]:
    """The methods periodic tasks need that *queue* lacks."""
    return [m for m in ("fire", "last_fired") if not callable(getattr(queue, m, None))]


class Scheduler:
    """The thread of one running engine that fires its schedules' slots.

    It starts when the engine has started and ends when a stop is requested
    (*stop* is set): a stopping engine fires nothing more.
    """

    def __init__(self, schedules: tuple[Schedule, ...], queue: Any, logs: Logs,
                 stop: threading.Event, engine: str) -> None:
        self.schedules = schedules
        self.queue = queue
        self.logs = logs
        self.stop = stop
        self.fired = 0
        """Slots this engine fired (not those it found fired by another)."""
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"tempest-periodic:{engine}")

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def join(self, timeout: float) -> None:
        """Wait up to *timeout* seconds for the thread to end (after *stop* is set)."""
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        started = time.time()
        due = {}
        for schedule in self.schedules:
            due[schedule] = schedule.after(started - START_GRACE)
            self._report_missed(schedule, due[schedule])
        while not self.stop.is_set():
            now = time.time()
            for schedule in self.schedules:
                while due[schedule] <= now and self._fire(schedule, due[schedule]):
                    due[schedule] = schedule.after(due[schedule])
            pause = min(due.values()) - time.time()
            self.stop.wait(min(max(pause, 0.0), _MAX_SLEEP))

    def _fire(self, schedule: Schedule, slot: float) -> bool:
        """Fire *slot*, retrying while the queue fails; False to be called again later."""
        task_id = schedule.task_id(slot)
        attempt = 0
        while not self.stop.is_set():
            late = time.time() - slot
            if late > CATCH_UP:
                self.logs.main.error("periodic slot missed", schedule=schedule.name,
                                     slot=stamp(slot), task_id=task_id, late=round(late, 3),
                                     attempts=attempt)
                return True
            try:
                fired = self.queue.fire(schedule.name, slot, schedule.message(slot),
                                        priority=schedule.priority or 0, keep=schedule.keep)
            except Exception as exc:  # noqa: BLE001 - the queue's outage is retried
                attempt += 1
                delay = min(_RETRY_MIN * 2 ** (attempt - 1), _RETRY_MAX)
                self.logs.main.error("periodic fire failed", schedule=schedule.name,
                                     task_id=task_id, error=f"{type(exc).__name__}: {exc}",
                                     attempt=attempt, retry_in=delay)
                self.stop.wait(delay)
                continue
            if fired:
                self.fired += 1
                self.logs.main.info("periodic fired", schedule=schedule.name,
                                    task_id=task_id, task=schedule.task_name,
                                    late=round(time.time() - slot, 6))
            else:
                self.logs.main.debug("periodic slot taken", schedule=schedule.name,
                                     task_id=task_id)
            return True
        return False

    def _report_missed(self, schedule: Schedule, first: float) -> None:
        """At start: log the slots between the last one fired and *first*."""
        try:
            last = self.queue.last_fired(schedule.name)
        except Exception as exc:  # noqa: BLE001 - a report only
            self.logs.main.error("periodic last slot unknown", schedule=schedule.name,
                                 error=f"{type(exc).__name__}: {exc}")
            return
        if last is None:
            return
        missed, slot = 0, schedule.after(last)
        while slot < first and missed <= _COUNT_LIMIT:
            missed += 1
            slot = schedule.after(slot)
        if missed > 0:
            self.logs.always.warning(
                "periodic slots missed", schedule=schedule.name,
                missed=missed if missed <= _COUNT_LIMIT else f"{_COUNT_LIMIT}+",
                last_fired=stamp(last), next=stamp(first),
                hint="no engine ran then; missed slots are skipped, like cron")
