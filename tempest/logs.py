"""The main log and the task log.

Each engine writes two files in its ``log_dir``: ``<name>.log`` (the main log:
start-up, one line per outcome, stats, stop) and ``<name>.task.log`` (what the
tasks themselves logged, every line, traceback lines included, starting with
the task id so that ``grep <task_id>`` tells one task's story).

Lines are rendered in the thread that logs them and handed to one writer
thread per file, which does the I/O in batches. Rendering in the caller keeps
the line's content exact (its timestamp, the exception being handled); moving
the I/O out of the worker threads keeps a slow disk, or many threads logging
at once, from serialising the pool on a file lock.

Records that code running inside a task sends to the standard ``logging``
module land in the task log too. tempest does this by wrapping the log record
factory (``logging.setLogRecordFactory``) while an engine runs, *not* by adding
a handler to the root logger: the root logger's level and handlers, each
logger's propagation and ``logging.lastResort`` all stay exactly as the
application set them, and loggers with ``propagate = False`` are captured too.
Only records that pass their logger's level are created, hence captured.
"""

from __future__ import annotations

import contextvars
import json
import logging
import math
import os
import queue
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from tempest.messages import shown

__all__ = ["LogFile", "Logs", "current_task", "task_scope"]

_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING,
           "ERROR": logging.ERROR}

_NAMES = {number: name.lower() for name, number in _LEVELS.items()}

_CLOSE = object()
_REOPEN = object()


class LogFile:
    """An append-only text file written by a thread of its own.

    ``write`` only queues the line; ``reopen`` makes the writer close and
    reopen the path (after logrotate renamed the file); ``flush`` waits until
    every line queued before it is on disk.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.errors = 0
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._file = self._open()
        self._closed = False
        self._thread = threading.Thread(
            target=self._write_loop, name=f"tempest-log:{path.name}", daemon=True
        )
        self._thread.start()

    def _open(self) -> Any:
        return open(self.path, "a", encoding="utf-8", errors="backslashreplace")

    def write(self, text: str) -> None:
        """Queue *text* (one or more whole lines, newline-terminated)."""
        # After close() the writer is gone: a late line (from a thread that
        # outlived the engine) is dropped rather than queued forever.
        if not self._closed:
            self._queue.put(text)

    def reopen(self) -> None:
        """Reopen the file by its path once the lines queued so far are written."""
        self._queue.put(_REOPEN)

    def flush(self, timeout: float | None = 5.0) -> bool:
        """Wait until every line queued so far is written; False on timeout."""
        if self._closed:
            return True
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def close(self, timeout: float | None = 5.0) -> None:
        """Write what is queued, close the file and end the writer thread."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_CLOSE)
        self._thread.join(timeout)

    def _write_loop(self) -> None:
        get_nowait = self._queue.get_nowait
        while True:
            item = self._queue.get()
            # Let lines gather for a moment: under load one write (and one
            # GIL hand-off to this thread) then carries many lines, not one.
            time.sleep(BATCH_DELAY)
            batch: list[str] = []
            while True:
                if isinstance(item, str):
                    batch.append(item)
                else:
                    self._write(batch)
                    batch = []
                    if item is _CLOSE:
                        self._file.close()
                        return
                    if item is _REOPEN:
                        self._reopen()
                    elif isinstance(item, threading.Event):
                        item.set()
                try:
                    item = get_nowait()
                except queue.Empty:
                    break
            self._write(batch)

    def _write(self, batch: list[str]) -> None:
        if not batch:
            return
        try:
            self._file.write("".join(batch))
            self._file.flush()
        except (OSError, ValueError) as exc:  # disk full, file closed under us
            self.errors += 1
            if self.errors == 1:
                print(f"tempest: cannot write {self.path}: {exc}", file=sys.stderr)

    def _reopen(self) -> None:
        try:
            new = self._open()
        except OSError as exc:
            self.errors += 1
            print(f"tempest: cannot reopen {self.path}: {exc}", file=sys.stderr)
            return
        old, self._file = self._file, new
        try:
            old.close()
        except OSError:
            pass


# -- rendering ----------------------------------------------------------------

BATCH_DELAY = 0.002
"""Seconds a writer waits after waking for more lines to write in the same batch."""

_ts_cache: list[Any] = [-1, ""]


def _timestamp(now: float) -> str:
    """ISO 8601 UTC with microseconds; the seconds part is cached."""
    second = int(now)
    if second != _ts_cache[0]:
        _ts_cache[:] = [second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))]
    return f"{_ts_cache[1]}.{int((now - second) * 1_000_000):06d}Z"


_BARE = re.compile(r'[^\s"=\\\x00-\x1f\x7f]+')
"""A value written without quotes: no space, quote, equals sign, backslash or control."""


_rendered_names: dict[str, str] = {}
"""Task names as _text_value renders them (there are few; see Logs.success_line)."""


def _text_value(value: Any) -> str:
    if isinstance(value, str):
        if _BARE.fullmatch(value):
            return value
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.6f}".rstrip("0").rstrip(".") if value != int(value) else str(int(value))
    if value is None or isinstance(value, (bool, int, float)):
        return json.dumps(value)
    try:
        return json.dumps(value, ensure_ascii=False, default=shown)
    except (TypeError, ValueError, RecursionError):  # a cycle, or nested too deep
        return json.dumps(shown(value), ensure_ascii=False)


def _exc_text(exc_info: Any) -> str:
    if exc_info is True:
        exc_info = sys.exc_info()
    elif isinstance(exc_info, BaseException):
        exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
    if not exc_info or exc_info[0] is None:
        return ""
    return "".join(traceback.format_exception(*exc_info)).rstrip("\n")


def render_text(event_dict: dict[str, Any], prefix: str = "") -> str:
    """``[prefix ]<timestamp> <LEVEL> <event> key=value ...`` plus traceback lines."""
    ts = event_dict.pop("timestamp")
    level = event_dict.pop("level").upper()
    event = str(event_dict.pop("event", ""))
    exc = _exc_text(event_dict.pop("exc_info", None))
    parts = [f"{prefix}{ts} {level:<7} {event}"]
    parts.extend(f"{k}={_text_value(v)}" for k, v in event_dict.items())
    # "\r" too: text-mode readers (Python's universal newlines) split on it.
    line = " ".join(parts).replace("\n", "\\n").replace("\r", "\\r") + "\n"
    if exc:
        line += "".join(f"{prefix}{tb_line}\n"
                        for tb_line in exc.replace("\r", "\\r").split("\n"))
    return line


def render_json(event_dict: dict[str, Any]) -> str:
    """One JSON object; a traceback goes under the ``exception`` key."""
    exc = _exc_text(event_dict.pop("exc_info", None))
    if exc:
        event_dict["exception"] = exc
    try:
        return json.dumps(event_dict, ensure_ascii=False, default=shown) + "\n"
    except (TypeError, ValueError, RecursionError):  # a value with a cycle, or too deep
        return json.dumps({key: _json_safe(value) for key, value in event_dict.items()},
                          ensure_ascii=False, default=shown) + "\n"


def _json_safe(value: Any) -> Any:
    """*value* if JSON can write it, else its never-raising repr (see ``shown``)."""
    try:
        json.dumps(value, ensure_ascii=False, default=shown)
    except (TypeError, ValueError, RecursionError):
        return shown(value)
    return value


class _Sink:
    """The structlog "logger" at the end of the chain: writes a rendered line."""

    __slots__ = ("write",)

    def __init__(self, write: Callable[[str], None]) -> None:
        self.write = write

    def msg(self, line: str) -> None:
        self.write(line)

    debug = info = warning = warn = error = err = critical = exception = msg


def _add_meta(_logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    event_dict["timestamp"] = _timestamp(time.time())
    event_dict["level"] = "warning" if method == "warn" else method
    return event_dict


def _text_main(_logger: Any, _method: str, event_dict: dict[str, Any]) -> str:
    return render_text(event_dict)


def _text_task(_logger: Any, _method: str, event_dict: dict[str, Any]) -> str:
    return render_text(event_dict, f"{event_dict.pop('task_id', None)} ")


def _json(_logger: Any, _method: str, event_dict: dict[str, Any]) -> str:
    return render_json(event_dict)


def _ordered(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    # JSON lines read best as timestamp, level, event, then the fields.
    head: dict[str, Any] = {
        k: event_dict.pop(k) for k in ("timestamp", "level", "event") if k in event_dict}
    head.update(event_dict)
    return head


# -- the engine's two logs --------------------------------------------------------


def _make_logger(level: int, sink: _Sink, chain: list[Any], context: dict[str, Any]) -> Any:
    # make_filtering_bound_logger gives a class whose methods below *level*
    # are no-ops: a filtered line costs one method call. Built once per level.
    cls: Any = _bound_classes.get(level)
    if cls is None:
        cls = _bound_classes[level] = structlog.make_filtering_bound_logger(level)
    return cls(sink, chain, context)


_bound_classes: dict[int, Any] = {}


class Logs:
    """The main log and the task log of one running engine."""

    def __init__(self, name: str, directory: Path, level: str, fmt: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.level = _LEVELS[level]
        self.json = fmt == "json"
        main_path, task_path = log_path(directory, name)
        self.main_file = LogFile(main_path)
        self.task_file = LogFile(task_path)
        if self.json:
            main_chain: list[Any] = [_add_meta, _ordered, _json]
            self._task_chain: list[Any] = [_add_meta, _ordered, _json]
        else:
            main_chain = [_add_meta, _text_main]
            self._task_chain = [_add_meta, _text_task]
        self._task_sink = _Sink(self.task_file.write)
        main_sink = _Sink(self.main_file.write)
        self.main = _make_logger(self.level, main_sink, main_chain, {})
        """Main-log logger, filtered at the engine's log_level."""
        self.always = _make_logger(logging.DEBUG, main_sink, main_chain, {})
        """Main-log logger for start-up and stop lines, written at any log_level."""

    def main_line(self, level: int, event: str, **fields: Any) -> None:
        """Write one main-log line at *level* (a logging level number).

        The same rendering as ``main``, without structlog's per-call chain:
        the engine's hot path (one outcome line per task) goes through here.
        """
        if level < self.level:
            return
        if self.json:
            self.main_file.write(render_json({
                "timestamp": _timestamp(time.time()), "level": _NAMES[level],
                "event": event, **fields}))
            return
        # render_text's output, built directly: no event dict to fill and unpick.
        line = " ".join([f"{_timestamp(time.time())} {_NAMES[level].upper():<7} {event}",
                         *[f"{k}={_text_value(v)}" for k, v in fields.items()]])
        if "\n" in line or "\r" in line:
            line = line.replace("\n", "\\n").replace("\r", "\\r")
        self.main_file.write(line + "\n")

    def success_line(self, task_id: str, task: str, duration: float, attempt: int = 1
                     ) -> None:
        """``main_line(INFO, "task ended", ..., outcome="success", ...)``, made cheaper.

        One line per task is the engine's costliest log line: in text, it is
        put together directly, with the task name's rendering cached.
        """
        if self.level > logging.INFO:
            return
        if self.json:
            self.main_line(logging.INFO, "task ended", task_id=task_id, task=task,
                           outcome="success", duration=round(duration, 6), attempt=attempt)
            return
        name = _rendered_names.get(task)
        if name is None:
            name = _rendered_names[task] = _text_value(task)
        tid = task_id if _BARE.fullmatch(task_id) else _text_value(task_id)
        self.main_file.write(
            f"{_timestamp(time.time())} INFO    task ended task_id={tid} task={name} "
            f"outcome=success duration={_text_value(round(duration, 6))} attempt={attempt}\n")

    def enabled(self, level: int) -> bool:
        """Whether lines at *level* are written."""
        return level >= self.level

    def task_logger(self, task_id: str | None) -> Any:
        """A structlog logger whose lines go to the task log, prefixed with *task_id*."""
        return _make_logger(self.level, self._task_sink, self._task_chain, {"task_id": task_id})

    def capture(self, record: logging.LogRecord, task_id: str) -> None:
        """Write a standard-library log record to the task log."""
        # logging.makeLogRecord() calls the factory with level None and fills
        # the record in afterwards: such a rebuilt record is not captured.
        if not isinstance(record.levelno, int) or record.levelno < self.level:
            return
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad %-format must not break the task
            message = f"{record.msg!r} % {record.args!r}"
        event_dict: dict[str, Any] = {
            "task_id": task_id,
            "timestamp": _timestamp(record.created),
            "level": record.levelname.lower(),
            "event": message,
            "logger": record.name,
        }
        if record.exc_info:
            event_dict["exc_info"] = record.exc_info
        if self.json:
            line = _json(None, "", _ordered(None, "", event_dict))
        else:
            line = _text_task(None, "", event_dict)
        self.task_file.write(line)

    def reopen(self) -> None:
        """Reopen both files by path (after logrotate renamed them)."""
        self.main_file.reopen()
        self.task_file.reopen()

    def flush(self, timeout: float | None = 5.0) -> bool:
        """Wait until every line logged so far is written to both files."""
        return self.main_file.flush(timeout) and self.task_file.flush(timeout)

    def close(self) -> None:
        """Write what is queued and close both files."""
        self.main_file.close()
        self.task_file.close()


# -- capturing the logging module -----------------------------------------------

_scope: contextvars.ContextVar[tuple[Any, Any] | None] = contextvars.ContextVar(
    "tempest_task_scope", default=None)
"""The task the current context runs: a thread's (each thread has a context of its
own) or a coroutine's (each asyncio task runs in a copy of the context), so records
of interleaved coroutines on one loop each go to their own task."""
_capture_lock = threading.Lock()
_capture_users = 0
_active_factory: Any = None
"""The capturing factory installed by the first of the running engines, if any."""


def _make_factory(previous: Callable[..., logging.LogRecord]) -> Any:
    # A new wrapper per installation, each calling the factory it replaced: one
    # left behind inside an application's wrapper (see uninstall_capture) then
    # passes records through to its own predecessor, instead of a later
    # installation calling the application's wrapper, which calls us, forever.
    def capturing_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if _active_factory is capturing_factory:
            scope = _scope.get()
            if scope is not None:
                scope[0].capture(record, scope[1])
        return record

    capturing_factory.previous = previous  # type: ignore[attr-defined]
    return capturing_factory


def install_capture() -> None:
    """Start sending task threads' logging records to their task log."""
    global _capture_users, _active_factory
    with _capture_lock:
        _capture_users += 1
        if _capture_users == 1:
            _active_factory = _make_factory(logging.getLogRecordFactory())
            logging.setLogRecordFactory(_active_factory)


def uninstall_capture() -> None:
    """Undo one install_capture; the last one restores the previous factory."""
    global _capture_users, _active_factory
    with _capture_lock:
        _capture_users -= 1
        if _capture_users == 0:
            factory, _active_factory = _active_factory, None
            previous = factory.previous
            # If someone wrapped our factory since, leave it: unwrapping would
            # drop theirs. No longer active, ours merely passes records through.
            if logging.getLogRecordFactory() is factory:
                logging.setLogRecordFactory(previous)


def task_scope(logs: Logs | None, task_id: str | None = None) -> None:
    """Mark the calling thread, or coroutine, as running *task_id* (None: no task)."""
    _scope.set(None if logs is None else (logs, task_id))


def current_task() -> str | None:
    """The id of the task the calling thread or coroutine is running, if any."""
    scope = _scope.get()
    return None if scope is None else scope[1]


def log_path(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """The main log's and the task log's paths for engine *name* in *directory*."""
    base = Path(directory)
    return base / f"{name}.log", base / f"{name}.task.log"
