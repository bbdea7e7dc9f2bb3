"""The periodic stats line: per-interval throughput, durations, busy threads, RSS, files."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest

from tempest import Task

from .conftest import main_log, wait_for

INTERVAL_KEYS = {
    "interval", "succeeded_per_s", "failed_per_s", "timed_out_per_s", "rejected_per_s",
    "retried_per_s", "processed_per_s", "duration_min", "duration_avg", "duration_max",
    "busy_min", "busy_avg", "busy_max", "rss", "open_files",
}


class StlSleep(Task):
    def process(self, seconds: float) -> None:
        time.sleep(seconds)


class StlBoom(Task):
    def process(self) -> None:
        raise ValueError("boom")


class StlAsync(Task):
    async def process(self) -> None:
        return None


class StlHold(Task):
    release = threading.Event()
    started = threading.Event()

    def process(self) -> None:
        StlHold.started.set()
        StlHold.release.wait(10)


@pytest.fixture(autouse=True)
def _release() -> Any:
    StlHold.release.clear()
    StlHold.started.clear()
    yield
    StlHold.release.set()


def stats_lines(engine: Any) -> list[dict[str, Any]]:
    """The engine's stats lines so far (json log format), oldest first."""
    lines = [json.loads(line) for line in main_log(engine).splitlines() if line]
    return [line for line in lines if line["event"] == "stats"]


def test_the_line_covers_the_interval_since_the_previous_one(make_engine):
    """Throughput per outcome and durations count only what ended in each interval."""
    engine = make_engine(report_every=0.2, log_format="json")
    engine.start()
    try:
        wait_for(lambda: stats_lines(engine))  # an interval before any task
        for _ in range(3):
            engine.submit(StlSleep, 0.03)
        engine.submit(StlBoom)
        engine.submit(StlAsync)
        wait_for(lambda: engine.stats()["processed"] == 5)
        done = len(stats_lines(engine))
        # Two whole intervals after the last outcome: nothing ended in them.
        lines = wait_for(lambda: len(stats_lines(engine)) >= done + 2 and stats_lines(engine))
    finally:
        assert engine.stop(timeout=10)
    assert set(lines[0]) >= INTERVAL_KEYS
    assert {"processed", "succeeded", "running", "uptime"} <= set(lines[0])  # stats() too
    for line in lines:
        assert 0.1 < line["interval"] < 5

    def ended(key: str) -> float:
        return sum(line[f"{key}_per_s"] * line["interval"] for line in lines)

    assert ended("succeeded") == pytest.approx(4, abs=0.1)
    assert ended("failed") == pytest.approx(1, abs=0.1)
    assert ended("processed") == pytest.approx(5, abs=0.1)
    assert ended("timed_out") == ended("rejected") == ended("retried") == 0  # exactly
    with_tasks = [line for line in lines if line["processed_per_s"]]
    for line in with_tasks:
        assert 0 <= line["duration_min"] <= line["duration_avg"] <= line["duration_max"]
    assert max(line["duration_max"] for line in with_tasks) >= 0.03
    last = lines[-1]
    assert last["processed_per_s"] == 0 and last["duration_avg"] is None
    assert last["duration_min"] is None and last["duration_max"] is None
    assert last["succeeded"] == 4 and last["failed"] == 1  # the totals go on


def test_busy_threads_are_sampled_within_the_interval(make_engine):
    """busy_min/avg/max: a task held across a whole interval keeps one thread busy."""
    engine = make_engine(threads=3, report_every=0.3, log_format="json")
    engine.start()
    try:
        engine.submit(StlHold)
        StlHold.started.wait(5)
        seen = len(stats_lines(engine))
        # The line after next covers an interval that started with the task running.
        held = wait_for(lambda: len(stats_lines(engine)) >= seen + 2
                        and stats_lines(engine)[seen + 1])
        StlHold.release.set()
        wait_for(lambda: engine.stats()["succeeded"] == 1)
        seen = len(stats_lines(engine))
        idle = wait_for(lambda: len(stats_lines(engine)) >= seen + 2
                        and stats_lines(engine)[seen + 1])
    finally:
        StlHold.release.set()
        assert engine.stop(timeout=10)
    assert held["busy_min"] == held["busy_max"] == 1 and held["busy_avg"] == 1
    assert idle["busy_min"] == idle["busy_max"] == 0


def test_process_figures(make_engine):
    """rss (bytes) and open_files (count) describe the process now (Linux: /proc)."""
    engine = make_engine(report_every=0.05, log_format="json")
    engine.start()
    try:
        line = wait_for(lambda: stats_lines(engine))[0]
    finally:
        assert engine.stop(timeout=10)
    assert isinstance(line["rss"], int) and line["rss"] > 10 * 2**20
    assert isinstance(line["open_files"], int) and line["open_files"] >= 3
