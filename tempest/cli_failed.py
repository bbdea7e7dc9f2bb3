"""``tempest failed ...``: look at, re-run and forget the tasks in an engine's failed store.

::

    tempest failed list   MODULE:ENGINE [--json] [--limit N] [--offset N]
    tempest failed show   MODULE:ENGINE ID [--json]
    tempest failed retry  MODULE:ENGINE (ID... | --all)
    tempest failed delete MODULE:ENGINE (ID... | --all)

Each imports MODULE like ``tempest run`` does, but runs no engine: it talks to
the engine's queue (shared with the engines that run, on SQLite, Redis or
PostgreSQL). ``retry`` and ``delete`` act on every id they can and name, in
one line on stderr, the ids the store does not hold (exit code 6).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from typing import Any

from tempest.engine import Engine

__all__ = ["EXIT_NOT_FOUND", "add_parsers", "run"]

EXIT_NOT_FOUND = 6

ERROR_WIDTH = 60
"""Characters of the error message that ``list`` shows."""


def add_parsers(commands: Any, target: Any, epilog: str) -> None:
    """Add ``failed`` and its sub-commands to the ``tempest`` parser's *commands*."""
    failed = commands.add_parser(
        "failed", help="list, show, retry or delete the tasks in an engine's failed store",
        description="Look at, re-run and forget the tasks in an engine's failed store, "
                    "through the engine's queue (no engine runs).", epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = failed.add_subparsers(dest="action", metavar="ACTION", required=True)

    def action(name: str, text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = actions.add_parser(
            name, help=text, description=text, epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("target", metavar="MODULE:ENGINE", type=target,
                            help="the module to import and the Engine subclass in it")
        return parser

    listing = action("list", "the failed tasks, the latest failure first")
    listing.add_argument("--json", action="store_true", help="one JSON array, for scripts")
    listing.add_argument("--limit", type=_count, default=100, metavar="N",
                         help="at most N entries (default 100)")
    listing.add_argument("--offset", type=_count, default=0, metavar="N",
                         help="skip the first N entries")
    show = action("show", "one failed task, its arguments and its traceback")
    show.add_argument("task_id", metavar="ID")
    show.add_argument("--json", action="store_true", help="the entry as JSON")
    for name, text in (("retry", "run failed tasks again: enqueued now, same id, "
                                 "attempts counted from 1"),
                       ("delete", "forget failed tasks")):
        parser = action(name, text)
        parser.add_argument("task_ids", metavar="ID", nargs="*")
        parser.add_argument("--all", action="store_true", help="every entry of the store")


def _count(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, not {value!r}")
    return number


def run(engine: type[Engine], args: argparse.Namespace) -> tuple[int, str | None]:
    """Carry out ``failed <action>`` on *engine*; (exit code, one line for stderr or None)."""
    return _ACTIONS[args.action](engine, args)


def _list(engine: type[Engine], args: argparse.Namespace) -> tuple[int, str | None]:
    entries = engine.failed(limit=args.limit, offset=args.offset)
    _print(json.dumps(entries, indent=1) if args.json
           else _table(entries, args.offset, engine.failed_count()))
    return 0, None


def _show(engine: type[Engine], args: argparse.Namespace) -> tuple[int, str | None]:
    try:
        entry = engine.failed_task(args.task_id)
    except KeyError:
        return EXIT_NOT_FOUND, f"no failed task {args.task_id!r} in the failed store"
    _print(json.dumps(entry, indent=1) if args.json else _details(entry))
    return 0, None


def _act(engine: type[Engine], args: argparse.Namespace) -> tuple[int, str | None]:
    """``retry`` and ``delete``: each id given, or --all."""
    if args.all == bool(args.task_ids):
        return 2, f"failed {args.action}: give task ids or --all (not both)"
    retry = args.action == "retry"
    done = "retried" if retry else "deleted"
    if args.all:
        count = engine.retry_failed_all() if retry else engine.purge_failed()
        _print(f"{done} {count} failed task{'s' if count != 1 else ''}")
        return 0, None
    one = engine.retry_failed if retry else engine.delete_failed
    unknown = []
    for task_id in args.task_ids:
        try:
            one(task_id)
        except KeyError:
            unknown.append(task_id)
        else:
            _print(f"{done} {task_id}")
    if unknown:
        return EXIT_NOT_FOUND, f"not in the failed store: {', '.join(unknown)}"
    return 0, None


_ACTIONS = {"list": _list, "show": _show, "retry": _act, "delete": _act}


def _print(text: str) -> None:
    sys.stdout.write(text + "\n")


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%SZ")


def _short(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[:width - 1] + "…"


def _table(entries: list[dict[str, Any]], offset: int, total: int) -> str:
    """The entries as aligned columns, with a count line."""
    if not entries:
        return f"no failed tasks{' past the offset' if total and offset else ''} ({total} in all)"
    rows = [("TASK ID", "TASK", "ATTEMPTS", "LAST FAILED", "ERROR")]
    for e in entries:
        rows.append((e["task_id"], e["task"], str(e["attempts"]), _when(e["last_failed_at"]),
                     _short(f"{e['error_type']}: {e['error']}" if e["error"]
                            else e["error_type"], ERROR_WIDTH)))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join([*(cell.ljust(w) for cell, w in zip(row[:4], widths, strict=True)), row[4]])
             for row in rows]
    lines.append(f"{offset + 1}-{offset + len(entries)} of {total} failed tasks")
    return "\n".join(lines)


def _details(entry: dict[str, Any]) -> str:
    """One entry, field by field, its traceback last."""
    lines = [
        f"task id:      {entry['task_id']}",
        f"task:         {entry['task']}",
        f"arguments:    {json.dumps(entry['args'])}",
        f"attempts:     {entry['attempts']}",
        f"priority:     {entry['priority']}",
        f"error:        {entry['error_type']}: {entry['error']}",
        f"first failed: {_when(entry['first_failed_at'])}",
        f"last failed:  {_when(entry['last_failed_at'])}",
        f"expires:      {_when(entry['expires_at'])}",
        "",
        entry["traceback"].rstrip() or "(no traceback)",
    ]
    return "\n".join(lines)
