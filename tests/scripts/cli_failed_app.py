"""An engine for tests/test_cli_failed.py: ``tempest failed ... cli_failed_app:FailApp``.

Its queue is the SQLite file named by ``TEMPEST_TEST_DB``. ``CliFlop`` always
raises; ``tempest run --burst`` fills the failed store with what was enqueued.
"""

from __future__ import annotations

import os

from tempest import Engine, Task
from tempest.queues import SQLiteQueue


class FailApp(Engine):
    class configure:
        threads = 2
        queue = SQLiteQueue(os.environ["TEMPEST_TEST_DB"])
        report_every = None
        shutdown_timeout = 5


class CliFlop(Task):
    def process(self, n: int) -> None:
        raise RuntimeError(f"flop {n} <b>")
