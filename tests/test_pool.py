"""The deadline supervisor's own promises: bounded memory, no stale timeouts."""

from __future__ import annotations

import re

from tempest import Task

from .conftest import main_log


class PoolQuick(Task):
    class configure:
        timeout = 60.0

    def process(self, n: int) -> int:
        return n


class PoolTight(Task):
    class configure:
        timeout = 0.05

    def process(self, n: int) -> int:
        return n


def test_supervisor_heap_stays_as_small_as_the_pool(make_engine):
    """Thousands of quick tasks with a long timeout leave about one entry per worker."""
    engine = make_engine(threads=4, log_level="WARNING")
    for i in range(3000):
        engine.submit(PoolQuick, i)
    engine.start()
    runtime = engine._state.control.runtime
    try:
        from .conftest import wait_for

        wait_for(lambda: engine.stats()["processed"] == 3000, timeout=30)
        assert runtime.supervisor.pending() <= 2 * 4
    finally:
        assert engine.stop(timeout=10)


def test_stale_deadlines_never_time_out_a_later_task(make_engine):
    """A deadline left by a finished task never times out the next task on that thread."""
    engine = make_engine(threads=2)
    for i in range(500):
        engine.submit(PoolTight, i)
    engine.run(burst=True)
    stats = engine.stats()
    assert stats["succeeded"] + stats["timed_out"] == stats["processed"] == 500, stats
    log = main_log(engine)
    assert "worker crashed" not in log
    # On a loaded machine a task may really be descheduled past its 50 ms: a
    # timeout is then right. A stale deadline would time out a task that ran
    # for less than its own limit.
    durations = [float(d) for d in re.findall(r"outcome=timeout duration=([\d.]+)", log)]
    assert len(durations) == stats["timed_out"]
    assert all(d >= 0.05 for d in durations), durations
    assert stats["timed_out"] <= 25, stats  # a few stalls, not a pattern
