"""The examples run as their docstrings say, from a fresh directory."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.timeout(60)
def test_scheduling_example_runs_by_priority_and_time(tmp_path: Path) -> None:
    """Prioritised tasks run highest first, delayed ones at their time, ticks every 2 s."""
    done = subprocess.run([sys.executable, str(EXAMPLES / "scheduling.py")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=50, check=True)
    lines = done.stdout.splitlines()
    assert lines[0] == "scheduled: 2, ready: 3", done.stdout
    ran = {text: float(at) for at, text in
           (re.match(r"\s*([\d.]+) s  (.*)", line).groups()  # type: ignore[union-attr]
            for line in lines if re.match(r"\s*[\d.]+ s  ", line))}
    order = [text for text in ran if text.startswith("submitted")]
    assert order == ["submitted third, priority 3", "submitted second, priority 0",
                     "submitted first, priority -1"]
    assert 3.0 <= ran["three seconds after submit"] < 5.0
    assert 5.0 <= ran["at a time five seconds on"] < 7.0
    assert len([text for text in ran if text.startswith("tick Tick[every_2s]@")]) >= 3
    assert (tmp_path / "scheduling.sqlite3").exists()


@pytest.mark.timeout(60)
def test_retries_example_retries_then_stores_the_hopeless_task(tmp_path: Path) -> None:
    """Three attempts for the flaky task, four for the hopeless one, then the store; the
    command line sees the entry the script left."""
    done = subprocess.run([sys.executable, str(EXAMPLES / "retries.py")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=50, check=True)
    out = done.stdout
    assert [line.split(": ")[-1] for line in out.splitlines() if "order-1: attempt" in line] \
        == ["attempt 1", "attempt 2", "attempt 3"]
    assert "order-1: charged" in out and "order-2: gave up after 4 attempts" in out
    assert out.splitlines()[-1] == ("failed store: 1 entry: Hopeless ['order-2'] after 4 "
                                    "attempts: Retry: the card was declined")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(EXAMPLES), str(EXAMPLES.parent), os.environ.get("PYTHONPATH", "")]))
    listed = subprocess.run([sys.executable, "-m", "tempest", "failed", "list",
                             "retries:RetryTempest", "--json"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=30, check=True)
    assert [e["task"] for e in json.loads(listed.stdout)] == ["Hopeless"]
