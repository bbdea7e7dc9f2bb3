"""An engine that tolerates no abandoned thread, and a task blocked in C past its timeout.

``tempest run cli_abandon:CliAbandonEngine --burst`` stops with TooManyAbandoned.
"""

from __future__ import annotations

import time

from tempest import Engine, Task


class CliAbandonEngine(Engine):
    class configure:
        threads = 1
        report_every = None
        max_abandoned = 0
        shutdown_timeout = 2


class CliStuck(Task):
    class configure:
        timeout = 0.2

    def process(self) -> None:
        time.sleep(30)  # blocked in C: TaskTimeout cannot interrupt it


CliAbandonEngine.submit(CliStuck, task_id="stuck")
