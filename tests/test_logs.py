"""The main log and the task log: files, formats, levels, capture, rotation, stats."""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tempest import Task
from tempest.queues import MemoryQueue

from .conftest import main_log, task_log, wait_for

# Objects a task cannot receive through a JSON message (events, barriers),
# handed over by a key that is passed as the task's argument.
_SHARED: dict[str, Any] = {}


@pytest.fixture(autouse=True)
def _release_held(make_engine: Any) -> Any:
    """After each test (before its engines are stopped), release every waiting task."""
    yield
    for obj in _SHARED.values():
        for item in obj if isinstance(obj, tuple) else (obj,):
            if isinstance(item, threading.Event):
                item.set()
    _SHARED.clear()


def share(obj: Any) -> str:
    key = uuid.uuid4().hex
    _SHARED[key] = obj
    return key


# -- parsing the text format --------------------------------------------------------

_KV = r'[A-Za-z_][\w.]*=(?:"(?:[^"\\]|\\.)*"|\S*)'
_LINE = re.compile(
    r"^(?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z) (?P<level>[A-Z]+) +"
    rf"(?P<event>.*?)(?P<kv>(?: {_KV})*)$"
)
_PAIR = re.compile(rf" ({_KV})")


def parse_line(line: str) -> dict[str, Any]:
    """Split a text line into timestamp, level, event and its key=value fields."""
    match = _LINE.match(line)
    assert match, f"not a text log line: {line!r}"
    fields: dict[str, Any] = {
        "timestamp": match["ts"], "level": match["level"], "event": match["event"]}
    for pair in _PAIR.findall(match["kv"]):
        key, _, value = pair.partition("=")
        fields[key] = json.loads(value) if value.startswith('"') else value
    datetime.fromisoformat(match["ts"][:-1])  # a real ISO timestamp
    return fields


def main_lines(engine: Any) -> list[dict[str, Any]]:
    return [parse_line(line) for line in main_log(engine).splitlines()]


def events(engine: Any, event: str) -> list[dict[str, Any]]:
    return [f for f in main_lines(engine) if f["event"] == event]


def outcomes(engine: Any) -> dict[str, dict[str, Any]]:
    return {f["task_id"]: f for f in events(engine, "task ended")}


def task_lines(engine: Any, task_id: str) -> list[str]:
    """The task-log lines of *task_id*, prefix removed (as grep would show them)."""
    prefix = f"{task_id} "
    return [line[len(prefix):] for line in task_log(engine).splitlines()
            if line.startswith(prefix)]


# -- tasks -------------------------------------------------------------------------


class LogEcho(Task):
    def process(self, text: str) -> str:
        self.task_logger.info(text)
        return text


class LogKv(Task):
    def process(self, note: str) -> None:
        self.task_logger.info("noted", note=note, count=3)


class LogBoom(Task):
    def process(self, message: str) -> None:
        self.task_logger.info("about to fail")
        raise ValueError(message)


class LogStdlib(Task):
    def process(self, logger_name: str, message: str) -> None:
        logger = logging.getLogger(logger_name)
        logger.warning(message)
        try:
            raise KeyError("inner")
        except KeyError:
            logger.exception("caught it")


class LogLevels(Task):
    def process(self) -> None:
        self.task_logger.debug("debug-line")
        self.task_logger.info("info-line")
        self.task_logger.warning("warning-line")


class LogTogether(Task):
    def process(self, key: str, count: int) -> None:
        _SHARED[key].wait()
        for i in range(count):
            self.task_logger.info("tick", i=i, who=self.task_id)
            logging.getLogger("tempest_test.together").warning("std %s", self.task_id)


class LogSpam(Task):
    def process(self, count: int) -> None:
        log = self.task_logger
        for i in range(count):
            log.info("spam", i=i)


class LogHold(Task):
    def process(self, key: str) -> None:
        started, release = _SHARED[key]
        started.set()
        assert release.wait(10)


class LogMakeRecord(Task):
    def process(self) -> str:
        record = logging.makeLogRecord({"msg": "rebuilt", "levelno": 30})
        return record.getMessage()


class LogAppCode(Task):
    def process(self, logger_name: str) -> None:
        logging.getLogger(logger_name).info("from inside the task")


class AckingListQueue:
    """A list-based queue with ack (so: at-least-once) and no blocking dequeue."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.acked: list[Any] = []
        self.lock = threading.Lock()

    def enqueue(self, message: Any) -> None:
        with self.lock:
            self.items.append(message)

    def dequeue(self) -> Any:
        with self.lock:
            return self.items.pop(0) if self.items else None

    def ack(self, message: Any) -> None:
        with self.lock:
            self.acked.append(message)

    def __len__(self) -> int:
        with self.lock:
            return len(self.items)


class ListHandler(logging.Handler):
    """An application's own handler: keeps the records it gets."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self) -> list[str]:
        return [r.getMessage() for r in self.records]


# -- files -------------------------------------------------------------------------


def test_log_files_are_named_after_the_class_in_a_created_nested_dir(make_engine, tmp_path):
    """Both files, <ClassName>.log and <ClassName>.task.log, appear in a nested new log_dir."""
    log_dir = tmp_path / "a" / "b" / "logs"
    engine = make_engine(log_dir=str(log_dir), class_name="LogNamedEngine")
    engine.submit(LogEcho, "hello")
    engine.run(burst=True)
    assert sorted(p.name for p in log_dir.iterdir()) == [
        "LogNamedEngine.log", "LogNamedEngine.task.log"]
    assert "hello" in (log_dir / "LogNamedEngine.task.log").read_text()


def test_name_option_changes_the_file_names(make_engine, tmp_path):
    """With name="orders" the files are orders.log and orders.task.log."""
    engine = make_engine(name="orders", log_dir=str(tmp_path / "n"))
    engine.submit(LogEcho, "x")
    engine.run(burst=True)
    assert sorted(p.name for p in (tmp_path / "n").iterdir()) == [
        "orders.log", "orders.task.log"]
    assert events(engine, "starting")[0]["engine"] == "orders"


def test_default_log_dir_is_the_current_directory(tmp_path, monkeypatch):
    """An engine without log_dir writes its files in the current directory."""
    from tempest import Engine

    monkeypatch.chdir(tmp_path)
    block = type("configure", (), {"threads": 1, "queue": MemoryQueue(),
                                   "report_every": None})
    engine = type("LogCwdEngine", (Engine,), {"configure": block})
    try:
        engine.submit(LogEcho, "in cwd")
        engine.run(burst=True)
    finally:
        engine.stop(timeout=10)
    assert (tmp_path / "LogCwdEngine.log").exists()
    assert "in cwd" in (tmp_path / "LogCwdEngine.task.log").read_text()


def test_log_dir_callable_is_evaluated_at_start(make_engine, tmp_path):
    """A callable log_dir is called when the engine starts, not when the class is made."""
    where = {"dir": tmp_path / "early"}
    calls = []

    def log_dir() -> str:
        calls.append(1)
        return str(where["dir"])

    engine = make_engine(log_dir=log_dir)
    assert not calls
    where["dir"] = tmp_path / "late"
    engine.submit(LogEcho, "late dir")
    engine.run(burst=True)
    assert calls
    assert not (tmp_path / "early").exists()
    name = engine._options["name"]
    assert "late dir" in (tmp_path / "late" / f"{name}.task.log").read_text()


# -- text format ---------------------------------------------------------------------


def test_text_main_log_lines_and_outcome_fields(make_engine):
    """Main-log lines read "<ts> <LEVEL> <event> k=v"; outcomes give id, task, outcome, duration."""
    engine = make_engine()
    ok = engine.submit(LogEcho, "fine")
    bad = engine.submit(LogBoom, "broken")
    engine.run(burst=True)
    lines = main_lines(engine)  # parse_line asserts the shape of every line
    assert [f["event"] for f in lines][:2] == ["starting", "started"]
    assert [f["event"] for f in lines][-2:] == ["stopping", "stopped"]
    ended = outcomes(engine)
    assert ended[ok]["task"] == "LogEcho" and ended[ok]["outcome"] == "success"
    assert ended[ok]["level"] == "INFO"
    assert ended[bad]["task"] == "LogBoom" and ended[bad]["outcome"] == "failure"
    assert ended[bad]["level"] == "ERROR"
    for fields in ended.values():
        assert 0 <= float(fields["duration"]) < 10
    text = main_log(engine)
    assert f"task_id={ok} task=LogEcho outcome=success duration=" in text
    assert f"task_id={bad} task=LogBoom outcome=failure duration=" in text


def test_values_with_spaces_are_quoted_and_stay_on_one_line(make_engine):
    """A field value with spaces, quotes or newlines is quoted and escaped on one line."""
    engine = make_engine()
    note = 'two words, a "quote" and\na newline = x'
    task_id = engine.submit(LogKv, note)
    engine.run(burst=True)
    lines = task_lines(engine, task_id)
    assert len(lines) == 1
    fields = parse_line(lines[0])
    assert fields["event"] == "noted"
    assert fields["note"] == note
    assert fields["count"] == "3"


def test_every_task_log_line_starts_with_the_task_id(make_engine):
    """Every task-log line, traceback lines included, begins with '<task_id> '."""
    engine = make_engine()
    ids = {engine.submit(LogEcho, "plain"),
           engine.submit(LogBoom, "first line\nsecond line"),
           engine.submit(LogStdlib, "tempest_test.lib", "library says hi")}
    engine.run(burst=True)
    lines = task_log(engine).splitlines()
    assert lines
    for line in lines:
        assert line.split(" ", 1)[0] in ids, line


def test_failure_traceback_is_prefixed_and_grep_tells_the_whole_story(make_engine):
    """grep <task_id> shows a failure's log lines and its full traceback, message lines too."""
    engine = make_engine()
    other = engine.submit(LogEcho, "noise")
    task_id = engine.submit(LogBoom, "first line\nsecond line")
    engine.run(burst=True)
    story = task_lines(engine, task_id)
    assert parse_line(story[0])["event"] == "about to fail"
    failed = parse_line(story[1])
    assert failed["event"] == "failed" and failed["level"] == "ERROR"
    assert failed["error"] == "ValueError: first line\nsecond line"
    traceback_lines = story[2:]
    assert traceback_lines[0] == "Traceback (most recent call last):"
    assert any("raise ValueError(message)" in line for line in traceback_lines)
    assert traceback_lines[-2:] == ["ValueError: first line", "second line"]
    assert all(other not in line for line in story)


def test_multi_line_message_stays_one_escaped_line(make_engine):
    """A message containing a newline is written as one line with the newline escaped."""
    engine = make_engine()
    task_id = engine.submit(LogEcho, "line one\nline two")
    engine.run(burst=True)
    lines = task_lines(engine, task_id)
    assert len(lines) == 1
    assert lines[0].endswith("line one\\nline two")


def test_carriage_returns_do_not_split_lines(make_engine):
    """A message or exception text with a carriage return stays on its prefixed line."""
    engine = make_engine()
    echoed = engine.submit(LogEcho, "progress 50%\rprogress 100%")
    failed = engine.submit(LogBoom, "windows\r\nline")
    engine.run(burst=True)
    lines = task_log(engine).splitlines()  # splitlines() breaks on "\r" as well
    assert all(line.split(" ", 1)[0] in (echoed, failed) for line in lines)
    assert task_lines(engine, echoed)[0].endswith("progress 50%\\rprogress 100%")
    assert task_lines(engine, failed)[-2:] == ["ValueError: windows\\r", "line"]


def test_stdlib_logging_inside_a_task_lands_in_the_task_log(make_engine):
    """logging calls made inside process, with their tracebacks, are in the task log with the id."""
    engine = make_engine()
    task_id = engine.submit(LogStdlib, "tempest_test.somelib", "library warning")
    engine.run(burst=True)
    story = task_lines(engine, task_id)
    warning = parse_line(story[0])
    assert warning["event"] == "library warning" and warning["level"] == "WARNING"
    assert warning["logger"] == "tempest_test.somelib"
    caught = parse_line(story[1])
    assert caught["event"] == "caught it" and caught["level"] == "ERROR"
    assert story[2] == "Traceback (most recent call last):"
    assert story[-1] == "KeyError: 'inner'"


def test_stdlib_makelogrecord_inside_a_task_does_not_break_it(make_engine):
    """logging.makeLogRecord (records rebuilt from a dict) works inside a task."""
    engine = make_engine()
    task_id = engine.submit(LogMakeRecord)
    engine.run(burst=True)
    assert outcomes(engine)[task_id]["outcome"] == "success"


def test_concurrent_tasks_never_mix_their_lines(make_engine):
    """Two tasks logging at once: each line carries exactly its own task's prefix."""
    engine = make_engine(threads=2)
    go = threading.Event()
    key = share(go)
    a = engine.submit(LogTogether, key, 300)
    b = engine.submit(LogTogether, key, 300)
    engine.start()
    wait_for(lambda: engine.stats()["running"] == 2, 5)
    go.set()
    assert engine.stop(timeout=10)
    lines = task_log(engine).splitlines()
    assert len(lines) == 2 * 600
    for line in lines:
        owner, rest = line.split(" ", 1)
        assert owner in (a, b)
        other = b if owner == a else a
        assert other not in rest
        fields = parse_line(rest)
        assert fields.get("who", owner) == owner
        if fields["event"].startswith("std "):
            assert fields["event"] == f"std {owner}"
    assert sum(line.startswith(f"{a} ") for line in lines) == 600


# -- JSON format --------------------------------------------------------------------


def test_json_format_one_object_per_line_with_ids_and_exceptions(make_engine):
    """In JSON format every line is an object; task lines have task_id; failures have exception."""
    engine = make_engine(log_format="json")
    ok = engine.submit(LogEcho, "json line\nwith newline")
    bad = engine.submit(LogBoom, "json failure")
    std = engine.submit(LogStdlib, "tempest_test.jsonlib", "json warning")
    engine.run(burst=True)
    main = [json.loads(line) for line in main_log(engine).splitlines()]
    tasks = [json.loads(line) for line in task_log(engine).splitlines()]
    assert main[0]["event"] == "starting" and main[-1]["event"] == "stopped"
    assert all({"timestamp", "level", "event"} <= obj.keys() for obj in main + tasks)
    assert all(isinstance(obj.get("task_id"), str) for obj in tasks)
    ended = {o["task_id"]: o for o in main if o["event"] == "task ended"}
    assert set(ended) == {ok, bad, std}
    for obj in ended.values():
        assert {"task_id", "task", "outcome", "duration"} <= obj.keys()
        assert isinstance(obj["duration"], float | int) and obj["duration"] >= 0
    assert ended[ok]["outcome"] == "success" and ended[ok]["task"] == "LogEcho"
    assert ended[bad]["outcome"] == "failure" and ended[bad]["task"] == "LogBoom"
    failed = [o for o in tasks if o["task_id"] == bad and "exception" in o]
    assert len(failed) == 1
    assert failed[0]["exception"].startswith("Traceback (most recent call last):")
    assert failed[0]["exception"].endswith("ValueError: json failure")
    echoed = [o for o in tasks if o["task_id"] == ok]
    assert echoed[0]["event"] == "json line\nwith newline"
    captured = [o for o in tasks if o["task_id"] == std]
    assert captured[0]["event"] == "json warning"
    assert captured[0]["logger"] == "tempest_test.jsonlib"
    assert "KeyError: 'inner'" in captured[1]["exception"]


# -- log_level and start-up lines ---------------------------------------------------------


def test_warning_level_drops_info_but_keeps_start_and_stop_lines(make_engine):
    """At WARNING, successes and info lines vanish; starting/started/stopping/stopped stay."""
    engine = make_engine(log_level="WARNING")
    ok = engine.submit(LogLevels)
    bad = engine.submit(LogBoom, "still logged")
    engine.run(burst=True)
    by_event = {f["event"]: f for f in main_lines(engine)}
    assert {"starting", "started", "stopping", "stopped"} <= by_event.keys()
    started = by_event["started"]
    assert started["threads"] == "2"
    assert started["queue"] == "MemoryQueue"
    assert started["guarantee"] == "at-most-once"
    assert by_event["starting"]["guarantee"] == "at-most-once"
    ended = outcomes(engine)
    assert ok not in ended
    assert ended[bad]["outcome"] == "failure"
    story = task_lines(engine, ok)
    assert [parse_line(line)["event"] for line in story] == ["warning-line"]
    assert not any("about to fail" in line for line in task_log(engine).splitlines())


def test_debug_level_writes_debug_lines(make_engine):
    """At DEBUG, task_logger.debug lines appear in the task log."""
    engine = make_engine(log_level="DEBUG")
    task_id = engine.submit(LogLevels)
    engine.run(burst=True)
    events_seen = [parse_line(line)["event"] for line in task_lines(engine, task_id)]
    assert {"debug-line", "info-line", "warning-line"} <= set(events_seen)


def test_info_level_hides_debug_lines(make_engine):
    """At the default INFO level, debug lines are not written."""
    engine = make_engine()
    task_id = engine.submit(LogLevels)
    engine.run(burst=True)
    events_seen = [parse_line(line)["event"] for line in task_lines(engine, task_id)]
    assert events_seen == ["info-line", "warning-line"]


def test_queue_with_ack_states_at_least_once_and_is_acked_once_per_outcome(make_engine):
    """A queue with ack: start-up says at-least-once, and each outcome acks its message once."""
    queue = AckingListQueue()
    engine = make_engine(queue=queue)
    ids = [engine.submit(LogEcho, f"m{i}") for i in range(3)]
    ids.append(engine.submit(LogBoom, "acked too"))
    engine.run(burst=True)
    for event in ("starting", "started"):
        fields = events(engine, event)[0]
        assert fields["guarantee"] == "at-least-once"
        assert fields["queue"] == "AckingListQueue"
    assert sorted(m[0] for m in queue.acked) == sorted(ids)
    assert len(queue.acked) == 4
    assert [m[1] for m in queue.acked if m[0] == ids[-1]] == ["LogBoom"]


# -- the application's logging stays its own -------------------------------------------


def test_root_logger_and_app_handlers_are_left_alone(make_engine):
    """Root level/handlers, a logger's propagate/handlers and the record factory are untouched."""
    root = logging.getLogger()
    app = logging.getLogger("tempest_test.app_untouched")
    handler = ListHandler()
    app.addHandler(handler)
    app.propagate = False
    try:
        factory = logging.getLogRecordFactory()

        def snapshot() -> tuple[Any, ...]:
            return (root.level, list(root.handlers), app.propagate, list(app.handlers),
                    app.level, logging.lastResort)

        before = snapshot()
        engine = make_engine()
        hold = (threading.Event(), threading.Event())
        engine.submit(LogHold, share(hold))
        engine.start()
        assert hold[0].wait(5)
        assert snapshot() == before
        hold[1].set()
        assert engine.stop(timeout=10)
        assert snapshot() == before
        assert logging.getLogRecordFactory() is factory
    finally:
        app.removeHandler(handler)
        app.propagate = True


def test_app_records_outside_tasks_stay_out_of_the_task_log(make_engine):
    """Records the app logs in its own thread while the engine runs reach its handler only."""
    app = logging.getLogger("tempest_test.app_outside")
    app.setLevel(logging.DEBUG)
    handler = ListHandler()
    app.addHandler(handler)
    try:
        engine = make_engine()
        hold = (threading.Event(), threading.Event())
        held = engine.submit(LogHold, share(hold))
        engine.start()
        assert hold[0].wait(5)  # a task is running meanwhile
        app.info("application line %d", 42)
        hold[1].set()
        inside = engine.submit(LogAppCode, "tempest_test.app_outside")
        wait_for(lambda: engine.stats()["processed"] == 2, 5)
        text = task_log(engine)
        assert engine.stop(timeout=10)
        assert "application line" not in text
        assert handler.messages() == ["application line 42", "from inside the task"]
        story = task_lines(engine, inside)
        assert [parse_line(line)["event"] for line in story] == ["from inside the task"]
        assert not task_lines(engine, held)
    finally:
        app.removeHandler(handler)
        app.setLevel(logging.NOTSET)


def test_record_factory_restored_and_no_capture_after_stop(make_engine):
    """After stop the record factory is the application's again; nothing reaches the task log."""
    original = logging.getLogRecordFactory()
    seen = []

    def app_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        seen.append(1)
        return original(*args, **kwargs)

    logging.setLogRecordFactory(app_factory)
    try:
        engine = make_engine()
        task_id = engine.submit(LogStdlib, "tempest_test.factory", "with app factory")
        engine.run(burst=True)
        assert logging.getLogRecordFactory() is app_factory
        assert seen  # the application's factory was still used during the run
        assert task_lines(engine, task_id)
    finally:
        logging.setLogRecordFactory(original)


def test_factory_wrapped_by_the_app_while_running_survives_a_restart(make_engine):
    """An app that wraps the record factory during a run keeps working over an engine restart."""
    original = logging.getLogRecordFactory()
    engine = make_engine()
    engine.start()
    during = logging.getLogRecordFactory()
    wrapped = []

    def app_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        wrapped.append(1)
        return during(*args, **kwargs)

    logging.setLogRecordFactory(app_factory)  # e.g. an instrumentation library
    try:
        assert engine.stop(timeout=5)
        assert logging.getLogRecordFactory() is app_factory  # not unwrapped under the app
        task_id = engine.submit(LogStdlib, "tempest_test.rewrapped", "after restart")
        engine.run(burst=True)  # the second run must not recurse through the app's wrapper
        assert outcomes(engine)[task_id]["outcome"] == "success"
        assert "after restart" in task_lines(engine, task_id)[0]
        assert task_log(engine).count("after restart") == 1
        assert wrapped
        logging.getLogger("tempest_test.rewrapped").warning("outside any engine")
    finally:
        logging.setLogRecordFactory(original)


def test_two_engines_capture_into_their_own_task_logs(make_engine, tmp_path):
    """With two engines running, logging records go to the running task's own engine log."""
    original = logging.getLogRecordFactory()
    first = make_engine(log_dir=str(tmp_path / "first"))
    second = make_engine(log_dir=str(tmp_path / "second"))
    first.start()
    second.start()
    a = first.submit(LogStdlib, "tempest_test.two", "said in first")
    wait_for(lambda: first.stats()["processed"] == 1, 5)
    assert first.stop(timeout=5)  # the second engine still captures after this
    b = second.submit(LogStdlib, "tempest_test.two", "said in second")
    wait_for(lambda: second.stats()["processed"] == 1, 5)
    assert second.stop(timeout=5)
    assert logging.getLogRecordFactory() is original
    assert "said in first" in task_lines(first, a)[0]
    assert "said in second" in task_lines(second, b)[0]
    assert "said in second" not in task_log(first)
    assert "said in first" not in task_log(second)


# -- rotation, stats, performance ------------------------------------------------------


def test_reopen_after_rename_writes_to_new_files(make_engine, tmp_path):
    """After logrotate renames the files, reopen() sends new lines to new files."""
    engine = make_engine()
    engine.start()
    wait_for(lambda: engine._state.control is not None, 5)
    before = engine.submit(LogEcho, "before rotation")
    wait_for(lambda: engine.stats()["processed"] == 1, 5)
    engine._state.control.runtime.logs.flush()
    name = engine._options["name"]
    main_path, task_path = tmp_path / f"{name}.log", tmp_path / f"{name}.task.log"
    os.rename(main_path, tmp_path / f"{name}.log.1")
    os.rename(task_path, tmp_path / f"{name}.task.log.1")
    engine._state.control.runtime.logs.reopen()
    after = engine.submit(LogEcho, "after rotation")
    wait_for(lambda: engine.stats()["processed"] == 2, 5)
    engine._state.control.runtime.logs.flush()
    assert engine.stop(timeout=10)
    old_main = (tmp_path / f"{name}.log.1").read_text()
    old_task = (tmp_path / f"{name}.task.log.1").read_text()
    new_main, new_task = main_path.read_text(), task_path.read_text()
    assert "before rotation" in old_task and "after rotation" not in old_task
    assert "after rotation" in new_task and "before rotation" not in new_task
    assert f"task_id={before}" in old_main and f"task_id={after}" not in old_main
    assert f"task_id={after}" in new_main and "stopped" in new_main
    assert "starting" not in new_main


def test_report_every_writes_stats_lines(make_engine):
    """With report_every=0.2 the main log gets periodic 'stats' lines with the counters."""
    engine = make_engine(report_every=0.2)
    engine.submit(LogEcho, "counted")
    engine.start()
    stats = wait_for(lambda: [f for f in events(engine, "stats") if f["processed"] == "1"], 5)
    assert engine.stop(timeout=10)
    fields = stats[0]
    for key in ("processed", "succeeded", "failed", "timed_out", "running", "threads",
                "abandoned", "uptime", "queued"):
        assert key in fields, key
    assert fields["running"] == "0" and fields["threads"] == "2"
    assert float(fields["uptime"]) > 0


def test_many_lines_from_many_threads_all_land_quickly(make_engine):
    """20,000 task_logger lines from 4 threads are all written within a generous 20 s."""
    engine = make_engine(threads=4)
    ids = [engine.submit(LogSpam, 5000) for _ in range(4)]
    started = time.monotonic()
    engine.run(burst=True)
    text = task_log(engine)
    elapsed = time.monotonic() - started
    assert elapsed < 20
    lines = text.splitlines()
    assert len(lines) == 20000
    for task_id in ids:
        mine = [line for line in lines if line.startswith(f"{task_id} ")]
        assert len(mine) == 5000
        assert mine[-1].endswith("spam i=4999")


def test_task_log_prefix_keeps_file_lines_intact(make_engine, tmp_path):
    """Each file ends with a newline: no partial lines are left after stop."""
    engine = make_engine()
    engine.submit(LogEcho, "last")
    engine.run(burst=True)
    name = engine._options["name"]
    for path in (Path(tmp_path) / f"{name}.log", Path(tmp_path) / f"{name}.task.log"):
        assert path.read_text().endswith("\n")
