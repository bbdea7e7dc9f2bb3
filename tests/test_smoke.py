"""The quick-start path end to end: submit, run in burst mode, read the logs."""

from __future__ import annotations

from tempest import Task

from .conftest import main_log, task_log


class SmokeAdder(Task):
    def process(self, a: int, b: int) -> int:
        self.task_logger.info(f"{a} + {b} = {a + b}")
        return a + b


def test_burst_run_processes_everything_and_logs_each_outcome(make_engine):
    """Ten submitted tasks all succeed, each with one outcome line and a task-log line."""
    engine = make_engine()
    ids = [engine.submit(SmokeAdder, i, i) for i in range(10)]
    engine.run(burst=True)
    stats = engine.stats()
    assert stats["succeeded"] == 10 and stats["running"] == 0 and stats["queued"] == 0
    main, tasks = main_log(engine), task_log(engine)
    for i, task_id in enumerate(ids):
        assert main.count(f"task_id={task_id} task=SmokeAdder outcome=success") == 1
        assert f"{task_id} " in tasks and f"{i} + {i} = {2 * i}" in tasks
