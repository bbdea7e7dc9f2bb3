"""What each dashboard page shows, read from the engine class and its queue.

Every page is a *view*: a JSON-serialisable dict that the HTML template renders
on the first load and that the page's script fetches again (``/api/<page>``)
to refresh its live parts. Cells hold text only; the template escapes it and
the script writes it with ``textContent``, so nothing a task carries (its id,
name, arguments, error) is ever read as markup.

A view is made of:

- ``fields``: name -> text, the single values (``data-field`` elements);
- ``sections``: name -> ``{"rows", "empty", "unavailable", "error"}``, the tables
  (``data-section``); a row is a list of cells, a cell a str or a dict with
  ``text`` and ``href`` (a link within the dashboard), ``summary`` and ``pre``
  (folded text, a traceback) or ``actions`` (buttons that POST by task id);
- ``chart``: the outcomes per minute, as bars already laid out (overview only).

A queue method that is missing makes its section ``unavailable`` ("not
available for this queue"); one that raises makes it show the error instead
of failing the page. Nothing here changes the queue: the actions live in
:mod:`tempest.web.app`.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from tempest.engine import Engine
from tempest.periodic import Schedule

__all__ = [
    "NOT_AVAILABLE",
    "OUTCOMES",
    "PAGE_SIZE",
    "Page",
    "chart",
    "failed",
    "overview",
    "periodic",
    "queued",
    "rejected",
    "running",
    "scheduled",
    "task",
]

NOT_AVAILABLE = "not available for this queue"

PAGE_SIZE = 50
"""Rows on one page of a list, unless ``?limit=`` asks for another number (at most 500)."""

OUTCOMES = ("succeeded", "failed", "timed_out", "rejected", "retried")
"""The outcome counts of ``queue.outcomes()``, in the chart's stacking order."""

ARGS_WIDTH = 160
"""Characters of a message's arguments that a list shows (the task page shows them all)."""

CHART_MINUTES = 60
CHART_WIDTH, CHART_HEIGHT = 1200, 200


class Page:
    """Where a view is built: the engine class, the link prefix, paging, the clock."""

    def __init__(self, engine: type[Engine], *, root: str = "", offset: int = 0,
                 limit: int = PAGE_SIZE, actions: bool = True,
                 now: float | None = None) -> None:
        self.engine = engine
        self.queue: Any = engine._options["queue"]
        self.root = root
        self.offset = offset
        self.limit = limit
        self.actions = actions
        self.now = time.time() if now is None else now
        self.view: dict[str, Any] = {"fields": {}, "sections": {}}

    def has(self, *methods: str) -> bool:
        """Whether the queue has every one of *methods*."""
        return all(callable(getattr(self.queue, m, None)) for m in methods)

    def link(self, path: str) -> str:
        """*path* (from the dashboard's root) as a URL of this mount."""
        return f"{self.root}{path}"

    def task_link(self, task_id: Any) -> Any:
        """A cell: the task id, linked to its task page when it is one."""
        if isinstance(task_id, str) and task_id:
            return {"text": task_id, "href": self.link(f"/task/{quote(task_id, safe='')}")}
        return "" if task_id is None else _json(task_id)

    def section(self, name: str, empty: str, methods: tuple[str, ...],
                rows: Callable[[], list[list[Any]]]) -> dict[str, Any]:
        """Fill section *name* with *rows()*, where the queue has *methods*."""
        section: dict[str, Any] = {"rows": [], "empty": empty, "unavailable": None,
                                   "error": None}
        self.view["sections"][name] = section
        if not self.has(*methods):
            section["unavailable"] = f"{', '.join(m + '()' for m in methods)}: {NOT_AVAILABLE}"
        else:
            try:
                section["rows"] = rows()
            except Exception as exc:  # noqa: BLE001 - a flaky queue shows, never fails the page
                section["error"] = _error(exc)
        return section

    def count(self, field: str, method: str, default: str = "-") -> int | None:
        """Set *field* to ``queue.<method>()``; the number, or None where it has none."""
        fields = self.view["fields"]
        if not self.has(method):
            fields[field] = default
            fields[f"{field}_note"] = NOT_AVAILABLE
            return None
        try:
            value = getattr(self.queue, method)()
        except Exception as exc:  # noqa: BLE001 - shown in place of the count
            fields[field] = "error"
            fields[f"{field}_note"] = _error(exc)
            return None
        fields[field] = str(value)
        fields[f"{field}_note"] = ""
        return int(value)

    def pager(self, total: int | None, shown: int) -> None:
        """The paging links of a list of *total* rows (None: unknown), *shown* of them on
        this page; the range shown is a field, so that a refresh updates it too."""
        self.view["fields"]["range"] = (f"{self.offset + 1}\u2013{self.offset + shown}" if shown
                                        else "none")
        self.view["pager"] = {
            "offset": self.offset, "limit": self.limit, "total": total,
            "first": self.offset + 1,
            "previous": max(0, self.offset - self.limit) if self.offset else None,
            "next": (self.offset + self.limit
                     if total is None or self.offset + self.limit < total else None),
        }

    def engines(self) -> list[dict[str, Any]]:
        """The live engines' records (empty where the queue has no ``engines()``)."""
        if not hasattr(self, "_engines"):
            self._engines: list[dict[str, Any]] = []
            if self.has("engines"):
                self._engines = [r for r in self.queue.engines() if isinstance(r, dict)]
        return self._engines


# -- the pages ---------------------------------------------------------------------------


def overview(page: Page) -> dict[str, Any]:
    """Engines alive, queue depths, outcomes per minute over the last hour."""
    page.view["title"] = "Overview"
    page.count("ready", "__len__")
    page.count("scheduled", "scheduled_count")
    page.count("failed", "failed_count")
    page.count("rejected", "rejected_count")
    fields = page.view["fields"]

    def engine_rows() -> list[list[Any]]:
        return [[record.get("name", ""), record.get("host", ""), str(record.get("pid", "")),
                 str(record.get("threads", "")), _duration(record.get("uptime")),
                 str(record.get("processed", "")), str(record.get("busy", "")),
                 str(record.get("version", "")),
                 "stopping" if record.get("stopping") else "running",
                 _ago(page.now, record.get("announced_at"))]
                for record in page.engines()]

    engines = page.section("engines", "no engine is alive on this queue", ("engines",),
                           engine_rows)
    fields["engines"] = str(len(engines["rows"])) if engines["unavailable"] is None \
        and engines["error"] is None else "-"
    fields["engines_note"] = "" if engines["unavailable"] is None else NOT_AVAILABLE
    if engines["unavailable"] is None and engines["error"] is None:
        fields["running"] = str(sum(_int(r.get("busy")) for r in page.engines()))
        fields["running_note"] = ""
    else:
        fields["running"] = "-"
        fields["running_note"] = NOT_AVAILABLE if engines["error"] is None else "error"
    page.view["chart"] = _outcomes_chart(page)
    return page.view


def queued(page: Page) -> dict[str, Any]:
    """Ready messages, in the order the queue hands them out, a page at a time."""
    page.view["title"] = "Queued"
    total = page.count("total", "__len__")
    section = page.section("messages", "no message is waiting", ("peek",), lambda: [
        [*_message_cells(page, entry.get("message")), str(entry.get("priority", "")),
         str(entry.get("attempts", ""))]
        for entry in page.queue.peek(page.limit, page.offset)])
    page.pager(total, len(section["rows"]))
    return page.view


def scheduled(page: Page) -> dict[str, Any]:
    """Messages waiting for their time, the soonest first, a page at a time."""
    page.view["title"] = "Scheduled"
    total = page.count("total", "scheduled_count")
    section = page.section("messages", "no message is scheduled", ("peek_scheduled",), lambda: [
        [*_message_cells(page, entry.get("message")), _when(entry.get("at")),
         _until(page.now, entry.get("at")), str(entry.get("priority", "")),
         str(entry.get("attempts", ""))]
        for entry in page.queue.peek_scheduled(page.limit, page.offset)])
    page.pager(total, len(section["rows"]))
    return page.view


def running(page: Page) -> dict[str, Any]:
    """The tasks every live engine runs now, the longest-running first."""
    page.view["title"] = "Running"

    def rows() -> list[list[Any]]:
        found = [(item.get("started_at") or page.now, item, record)
                 for record in page.engines() for item in record.get("running") or ()
                 if isinstance(item, dict)]
        found.sort(key=lambda f: f[0])
        return [[page.task_link(item.get("task_id")), str(item.get("task", "")),
                 _engine_label(record), _when(started), _duration(page.now - started)]
                for started, item, record in found]

    section = page.section("running", "no task is running", ("engines",), rows)
    page.view["fields"]["total"] = str(len(section["rows"]))
    return page.view


def failed(page: Page) -> dict[str, Any]:
    """The failed store, the latest failure first, with its retry and delete buttons."""
    page.view["title"] = "Failed"
    total = page.count("total", "failed_count")

    def rows() -> list[list[Any]]:
        out = []
        for entry in page.queue.failed(page.limit, page.offset):
            task_id = entry.get("task_id")
            error = f"{entry.get('error_type', '')}: {entry.get('error', '')}".strip(": ")
            row = [page.task_link(task_id), str(entry.get("task", "")),
                   _short(_json(entry.get("args", [])), ARGS_WIDTH),
                   str(entry.get("attempts", "")), _when(entry.get("last_failed_at")),
                   {"summary": _short(error, ARGS_WIDTH),
                    "pre": str(entry.get("traceback") or "(no traceback)")}]
            if page.actions:
                row.append(_failed_actions(page, str(task_id), "failed"))
            out.append(row)
        return out

    section = page.section("failed", "no failed task", ("failed", "failed_count"), rows)
    page.pager(total, len(section["rows"]))
    return page.view


def rejected(page: Page) -> dict[str, Any]:
    """Messages the engines could not run, the latest first, a page at a time."""
    page.view["title"] = "Rejected"
    total = page.count("total", "rejected_count")

    def rows() -> list[list[Any]]:
        # The queue lists them oldest first: page from the end, newest first.
        count = total or 0
        end = max(0, count - page.offset)
        start = max(0, end - page.limit)
        entries = page.queue.rejected(end - start, start) if end > start else []
        return [[str(start + n + 1), *_message_cells(page, message), str(reason)]
                for n, (message, reason) in reversed(list(enumerate(entries)))]

    section = page.section("rejected", "no rejected message", ("rejected", "rejected_count"), rows)
    page.pager(total, len(section["rows"]))
    return page.view


def periodic(page: Page) -> dict[str, Any]:
    """The engine's periodic schedules: when each fired last and fires next."""
    page.view["title"] = "Periodic"
    schedules: tuple[Schedule, ...] = page.engine._options.get("periodic") or ()
    known = page.has("last_fired")

    def rows() -> list[list[Any]]:
        out = []
        for schedule in schedules:
            if known:
                try:
                    last = _when(page.queue.last_fired(schedule.name)) or "never"
                except Exception as exc:  # noqa: BLE001 - shown in its cell
                    last = _error(exc)
            else:
                last = NOT_AVAILABLE
            upcoming = schedule.after(page.now)
            out.append([schedule.name, schedule.task_name, _json(schedule.args),
                        _schedule_text(schedule), last,
                        f"{_when(upcoming)} (in {_duration(upcoming - page.now)})"])
        return out

    page.section("schedules", f"{page.engine.__name__} has no periodic schedules", (), rows)
    page.view["fields"]["total"] = str(len(schedules))
    return page.view


def task(page: Page, task_id: str, *, in_queue: bool = True) -> dict[str, Any]:
    """Everything the queue and the live engines know of one task id.

    The engines' records, the failed store and the kept result are looked up by
    id; ``queue.find()`` scans the queue (on Redis, PostgreSQL and SQLite), so
    *in_queue* False leaves it out: the view then has no ``queue`` section, and
    no ``status`` field unless one of the other three knows the task, so that a
    page refreshed from it keeps showing what the queue said last.
    """
    page.view["title"] = f"Task {task_id}"
    view = page.view
    view["task_id"] = task_id
    facts: list[list[Any]] = []
    states: list[str] = []

    def look(label: str, methods: tuple[str, ...], ask: Callable[[], None]) -> None:
        if not page.has(*methods):
            facts.append([label, NOT_AVAILABLE])
            return
        try:
            ask()
        except Exception as exc:  # noqa: BLE001 - one source failing leaves the others
            facts.append([label, _error(exc)])

    def ask_running() -> None:
        for record in page.engines():
            for item in record.get("running") or ():
                if isinstance(item, dict) and item.get("task_id") == task_id:
                    started = item.get("started_at") or page.now
                    states.append("running")
                    facts.append(["running", f"on {_engine_label(record)} since "
                                             f"{_when(started)} ({_duration(page.now - started)})"])
                    facts.append(["task", str(item.get("task", ""))])

    def queue_rows() -> list[list[Any]]:
        found = page.queue.find(task_id)
        if not found:
            return []
        states.append(str(found.get("status")))
        _task_id, name, args = _split(found.get("message"))
        return [["status", str(found.get("status"))
                 + (f", due {_when(found.get('at'))}" if found.get("at") else "")],
                ["task", name], ["arguments", args],
                ["priority", str(found.get("priority", ""))],
                ["attempts", str(found.get("attempts", ""))]]

    def ask_failed() -> None:
        entry = page.queue.find_failed(task_id)
        if entry:
            states.append("failed")
            view["failed"] = {
                "task": str(entry.get("task", "")),
                "arguments": _json(entry.get("args", [])),
                "attempts": str(entry.get("attempts", "")),
                "error": f"{entry.get('error_type', '')}: {entry.get('error', '')}",
                "first_failed": _when(entry.get("first_failed_at")),
                "last_failed": _when(entry.get("last_failed_at")),
                "expires": _when(entry.get("expires_at")),
                "traceback": str(entry.get("traceback") or "(no traceback)"),
                "actions": _failed_actions(page, task_id, "task") if page.actions else None,
            }

    def ask_result() -> None:
        record = page.queue.result(task_id, 0)
        if record:
            states.append(str(record.get("state", "finished")))
            value = record.get("value")
            facts.append(["result", f"{record.get('state')}, after {record.get('attempts')} "
                                    f"attempt(s), finished {_when(record.get('finished_at'))}"])
            if record.get("state") == "succeeded":
                facts.append(["value", _json(value)])
            else:
                facts.append(["error", f"{record.get('error_type')}: {record.get('error')}"])
            facts.append(["result kept until", _when(record.get("expires_at"))])

    look("engines", ("engines",), ask_running)
    if in_queue:
        page.section("queue", "not in the queue: not waiting, scheduled or leased",
                     ("find",), queue_rows)
        view["fields"]["queue_looked"] = _when(page.now)
    look("failed store", ("find_failed",), ask_failed)
    look("results", ("result",), ask_result)
    if in_queue or states:
        view["fields"]["status"] = ", ".join(dict.fromkeys(states)) or (
            "unknown: not running, not in the queue, not failed, no result kept")
    view["sections"]["facts"] = {"rows": facts, "empty": "not running on a live engine, no "
                                                         "result kept", "unavailable": None,
                                 "error": None}
    view.setdefault("failed", None)
    return view


# -- the chart ---------------------------------------------------------------------------


def chart(buckets: dict[int, dict[str, int]], now: float) -> dict[str, Any]:
    """Stacked bars, one a minute over the last hour, from ``outcomes()`` buckets.

    Laid out here, in SVG user units, so that the template and the script draw
    the same thing: each bar has ``x``, ``w``, a ``title`` (the counts) and
    ``segments`` (``y``, ``h``, ``outcome``), the oldest minute on the left.
    """
    this_minute = int(now // 60) * 60
    minutes = [this_minute - 60 * n for n in range(CHART_MINUTES - 1, -1, -1)]
    totals = [sum(_int(buckets.get(m, {}).get(o)) for o in OUTCOMES) for m in minutes]
    top = max([*totals, 1])
    plot_top, plot_bottom = 10, CHART_HEIGHT - 20
    scale = (plot_bottom - plot_top) / top
    step = CHART_WIDTH / CHART_MINUTES
    bars = []
    for n, minute in enumerate(minutes):
        counts = buckets.get(minute, {})
        y = float(plot_bottom)
        segments = []
        for outcome in OUTCOMES:
            height = _int(counts.get(outcome)) * scale
            if height > 0:
                y -= height
                segments.append({"y": round(y, 2), "h": round(height, 2), "outcome": outcome})
        label = datetime.datetime.fromtimestamp(minute, datetime.timezone.utc).strftime("%H:%M")
        detail = ", ".join(f"{_int(counts.get(o))} {o}" for o in OUTCOMES if counts.get(o))
        bars.append({"x": round(n * step + 1, 2), "w": round(step - 2, 2),
                     "segments": segments,
                     "title": f"{label} UTC: {detail or 'nothing'}"})
    labels = [{"x": round(n * step + 1, 2), "y": CHART_HEIGHT - 5,
               "text": datetime.datetime.fromtimestamp(
                   minutes[n], datetime.timezone.utc).strftime("%H:%M")}
              for n in range(0, CHART_MINUTES, 10)]
    return {"width": CHART_WIDTH, "height": CHART_HEIGHT, "bars": bars, "labels": labels,
            "max": top, "baseline": plot_bottom, "unavailable": None, "error": None,
            "totals": {o: sum(_int(b.get(o)) for m, b in buckets.items() if m in minutes)
                       for o in OUTCOMES}}


def _outcomes_chart(page: Page) -> dict[str, Any]:
    fields = page.view["fields"]
    fields["last_minute"] = fields["last_hour"] = fields["chart_max"] = "-"
    empty = chart({}, page.now)
    if not page.has("outcomes"):
        empty["unavailable"] = f"outcomes(): {NOT_AVAILABLE}"
        return empty
    since = int(page.now // 60) * 60 - 60 * (CHART_MINUTES - 1)
    try:
        buckets = {int(minute): counts for minute, counts in page.queue.outcomes(since).items()}
    except Exception as exc:  # noqa: BLE001 - the chart shows the error
        empty["error"] = _error(exc)
        return empty
    drawn = chart(buckets, page.now)
    previous = buckets.get(int(page.now // 60) * 60 - 60, {})
    done = sum(_int(previous.get(o)) for o in OUTCOMES)
    fields["last_minute"] = f"{done} ({done / 60:.2f}/s)"
    fields["last_hour"] = ", ".join(f"{n} {o.replace('_', ' ')}"
                                    for o, n in drawn["totals"].items() if n) or "nothing"
    fields["chart_max"] = str(drawn["max"])
    return drawn


# -- cells -------------------------------------------------------------------------------


def _failed_actions(page: Page, task_id: str, back: str) -> dict[str, Any]:
    return {"actions": [
        {"label": "Retry", "url": page.link("/failed/retry"), "kind": "retry",
         "fields": {"task_id": task_id, "back": back}},
        {"label": "Delete", "url": page.link("/failed/delete"), "kind": "delete",
         "fields": {"task_id": task_id, "back": back}},
    ]}


def _split(message: Any) -> tuple[Any, str, str]:
    """(task id, task name, arguments as JSON text) of a stored message."""
    if isinstance(message, (list, tuple)) and len(message) >= 2:
        return message[0], str(message[1]), _json(list(message[2:]))
    if isinstance(message, bytes):
        message = message.decode("utf-8", "replace")
    return None, "(undecodable)", _json(message) if not isinstance(message, str) else message


def _message_cells(page: Page, message: Any) -> list[Any]:
    task_id, name, args = _split(message)
    return [page.task_link(task_id), name, _short(args, ARGS_WIDTH)]


def _engine_label(record: dict[str, Any]) -> str:
    return f"{record.get('name', '')} ({record.get('host', '')}:{record.get('pid', '')})"


def _schedule_text(schedule: Schedule) -> str:
    seconds = getattr(schedule, "seconds", None)
    if seconds is not None:
        return f"every {_duration(seconds)}"
    return f"cron {getattr(schedule, 'expression', '?')} ({getattr(schedule, 'timezone', '')})"


def _json(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _error(exc: BaseException) -> str:
    return f"error: {type(exc).__name__}: {exc}"


def _when(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return ""
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%SZ")


def _duration(seconds: Any) -> str:
    """*seconds* as ``4s``, ``3m 05s``, ``2h 03m``, ``5d 04h``."""
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return ""
    whole = max(0, int(seconds))
    if whole < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours:02d}h"


def _ago(now: float, then: Any) -> str:
    if not isinstance(then, (int, float)):
        return ""
    return f"{_duration(now - then)} ago"


def _until(now: float, then: Any) -> str:
    if not isinstance(then, (int, float)):
        return ""
    return "due" if then <= now else f"in {_duration(then - now)}"
