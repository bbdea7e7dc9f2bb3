"""``tempest failed list|show|retry|delete``, run as real processes on a SQLite queue."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tempest.queues import SQLiteQueue

from .test_cli import one_error_line
from .test_signals import SCRIPTS, clean_env

pytestmark = pytest.mark.timeout(60)

TARGET = "cli_failed_app:FailApp"


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """A SQLite queue whose failed store holds f0, f1, f2 (run and failed by an engine)."""
    path = tmp_path / "queue.db"
    queue = SQLiteQueue(path)
    for n in range(3):
        queue.enqueue([f"f{n}", "CliFlop", n])
    queue.close()
    ran = tempest(path, "run", TARGET, "--burst", "--log-dir", str(tmp_path))
    assert ran.returncode == 0, ran.stderr
    return path


def tempest(db: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m tempest ARGS`` in tests/scripts, on the queue file *db*."""
    return subprocess.run([sys.executable, "-m", "tempest", *args], cwd=SCRIPTS,
                          env=clean_env(TEMPEST_TEST_DB=str(db)), capture_output=True,
                          text=True, timeout=30, check=False)


def test_list_shows_a_table_and_json(db: Path) -> None:
    """list: one row per failed task, the latest first, with a count; --json for scripts."""
    table = tempest(db, "failed", "list", TARGET)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["TASK", "ID", "TASK", "ATTEMPTS", "LAST", "FAILED", "ERROR"]
    assert sorted(line.split()[0] for line in lines[1:4]) == ["f0", "f1", "f2"]
    assert "RuntimeError: flop 1 <b>" in table.stdout
    assert lines[-1] == "1-3 of 3 failed tasks"
    entries = json.loads(tempest(db, "failed", "list", TARGET, "--json").stdout)
    assert sorted(e["task_id"] for e in entries) == ["f0", "f1", "f2"]
    assert all(e["attempts"] == 1 and e["task"] == "CliFlop" for e in entries)
    limited = json.loads(tempest(db, "failed", "list", TARGET, "--json", "--limit", "2",
                                 "--offset", "1").stdout)
    assert [e["task_id"] for e in limited] == [e["task_id"] for e in entries[1:3]]


def test_show_prints_the_entry_and_its_traceback(db: Path) -> None:
    """show ID: the fields, the arguments as JSON and the traceback; --json too."""
    shown = tempest(db, "failed", "show", TARGET, "f1")
    assert shown.returncode == 0, shown.stderr
    assert "task id:      f1" in shown.stdout and "arguments:    [1]" in shown.stdout
    assert "Traceback (most recent call last)" in shown.stdout
    assert shown.stdout.rstrip().endswith("RuntimeError: flop 1 <b>")
    entry = json.loads(tempest(db, "failed", "show", TARGET, "f1", "--json").stdout)
    assert entry["task_id"] == "f1" and entry["args"] == [1]


def test_retry_and_delete_act_on_ids_and_report_unknown_ones(db: Path) -> None:
    """retry/delete ID...: done for each known id; unknown ones in one line, exit 6."""
    retried = tempest(db, "failed", "retry", TARGET, "f0")
    assert retried.returncode == 0 and retried.stdout == "retried f0\n"
    queue = SQLiteQueue(db)
    try:
        assert len(queue) == 1
        message = queue.dequeue()
        assert list(message) == ["f0", "CliFlop", 0] and queue.attempts(message) == 0
        queue.ack(message)
        deleted = tempest(db, "failed", "delete", TARGET, "f1", "nope")
        assert deleted.returncode == 6 and deleted.stdout == "deleted f1\n"
        assert "not in the failed store: nope" in one_error_line(deleted)
        assert queue.failed_count() == 1
        unknown = tempest(db, "failed", "show", TARGET, "f1")
        assert unknown.returncode == 6 and "'f1'" in one_error_line(unknown)
        everything = tempest(db, "failed", "retry", TARGET, "--all")
        assert everything.returncode == 0 and everything.stdout == "retried 1 failed task\n"
        assert len(queue) == 1 and queue.failed_count() == 0
    finally:
        queue.close()
    purged = tempest(db, "failed", "delete", TARGET, "--all")
    assert purged.returncode == 0 and purged.stdout == "deleted 0 failed tasks\n"


def test_ids_and_all_together_or_neither_is_a_usage_error(db: Path) -> None:
    """retry needs task ids or --all: neither, or both, exits 2 with one line."""
    for args in ([], ["f0", "--all"]):
        result = tempest(db, "failed", "retry", TARGET, *args)
        assert result.returncode == 2
        assert "give task ids or --all" in one_error_line(result)


def test_an_engine_whose_queue_keeps_no_failed_tasks(tmp_path: Path) -> None:
    """A queue without a failed store: exit 4, one line naming the queue."""
    result = subprocess.run([sys.executable, "-m", "tempest", "failed", "list",
                             "cli_app:CliEngine"], cwd=SCRIPTS, env=clean_env(CLI_TASKS="0"),
                            capture_output=True, text=True, timeout=30, check=False)
    # cli_app's engine has a MemoryQueue: it has a failed store (empty, in that process).
    assert result.returncode == 0 and "no failed tasks (0 in all)" in result.stdout
    plain = subprocess.run([sys.executable, "-m", "tempest", "failed", "list",
                            "cli_plain_app:PlainApp"], cwd=SCRIPTS, env=clean_env(),
                           capture_output=True, text=True, timeout=30, check=False)
    assert plain.returncode == 4
    assert "PlainQueue" in one_error_line(plain)
