"""Delayed, prioritised and periodic tasks, on a durable queue in a file.

Run it from anywhere::

    python examples/scheduling.py

It submits a few tasks to run later or first, declares a task that fires every
two seconds, runs the engine for about seven seconds and prints what ran when.
The schedule lives in ``scheduling.sqlite3`` (in the current directory): stop
the script before a delayed task's time, start it again, and the task still
runs once its time comes. Start it in two terminals at once: each periodic slot
still fires once, on one of them (``grep Tick SchedulingTempest.log``).
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone

from tempest import Engine, Task, every
from tempest.queues import SQLiteQueue

BEGAN = time.time()


def _note(what: str) -> None:
    print(f"  {time.time() - BEGAN:5.2f} s  {what}", flush=True)


class Greet(Task):
    def process(self, text):
        _note(text)


class Tick(Task):
    class configure:
        priority = 5  # periodic firings go before waiting greetings

    def process(self):
        _note(f"tick {self.task_id}")


class SchedulingTempest(Engine):
    class configure:
        threads = 1  # one worker, so the priorities show
        queue = SQLiteQueue("scheduling.sqlite3")
        periodic = [every(2, Tick)]


if __name__ == "__main__":
    SchedulingTempest.submit(Greet, "submitted first, priority -1", priority=-1)
    SchedulingTempest.submit(Greet, "submitted second, priority 0")
    SchedulingTempest.submit(Greet, "submitted third, priority 3", priority=3)
    SchedulingTempest.submit(Greet, "three seconds after submit", delay=3)
    SchedulingTempest.submit(Greet, "at a time five seconds on",
                             at=datetime.now(timezone.utc) + timedelta(seconds=5))
    print(f"scheduled: {SchedulingTempest.stats()['scheduled']}, "
          f"ready: {SchedulingTempest.stats()['queued']}")

    # Stop the engine after seven seconds, as SIGTERM would.
    threading.Timer(7, SchedulingTempest.stop, kwargs={"wait": False}).start()
    SchedulingTempest.run()
    SchedulingTempest.configure.queue.close()
    print("main log: SchedulingTempest.log")
