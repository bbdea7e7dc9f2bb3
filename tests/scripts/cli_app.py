"""An engine for tests/test_cli.py: ``tempest run cli_app:CliEngine``.

At import it submits ``CLI_TASKS`` (default 20) CliAdder tasks with the ids
``cli00``, ``cli01``, ... so that ``--burst`` has work to drain.
"""

from __future__ import annotations

import os

from tempest import Engine, Task


class CliEngine(Engine):
    class configure:
        threads = 2
        report_every = None
        shutdown_timeout = 5


class CliAdder(Task):
    def process(self, a: int, b: int) -> int:
        self.task_logger.info("added", a=a, b=b, c=a + b)
        return a + b


for i in range(int(os.environ.get("CLI_TASKS", "20"))):
    CliEngine.submit(CliAdder, i, i, task_id=f"cli{i:02d}")
