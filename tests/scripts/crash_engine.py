"""An engine in a process of its own, for tests/test_crash.py.

Usage: ``python crash_engine.py LOG_DIR MODE [SHUTDOWN_TIMEOUT]``

- ``nap``: six tasks of 1 s, two threads: two run, four wait in the queue;
- ``stuck``: one task blocked in ``time.sleep(60)``;
- ``burst``: three instant tasks and ``run(burst=True)``;
- ``early``: one task that sends SIGTERM to its own process the moment it starts.

Every task prints ``started <task_id>`` once ``run()`` has installed its signal
handlers (so a signal sent after that line is handled, not fatal). ``returned``
is printed when ``run()`` returns.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from tempest import Engine, Task
from tempest.queues import MemoryQueue

LOG_DIR, MODE = sys.argv[1], sys.argv[2]
SHUTDOWN_TIMEOUT = float(sys.argv[3]) if len(sys.argv) > 3 else 10.0


class CrashEngine(Engine):
    class configure:
        threads = 2
        queue = MemoryQueue()
        log_dir = LOG_DIR
        shutdown_timeout = SHUTDOWN_TIMEOUT
        report_every = None


_print_lock = threading.Lock()


def say(line: str) -> None:
    """Print one whole line (print() from two threads can interleave its parts)."""
    with _print_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def _wait_for_handlers() -> None:
    pause = threading.Event()
    deadline = time.monotonic() + 5.0
    while signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and time.monotonic() < deadline:
        pause.wait(0.005)


class CrashNap(Task):
    def process(self, seconds):
        _wait_for_handlers()
        say(f"started {self.task_id}")
        time.sleep(seconds)
        return seconds


class CrashEarly(Task):
    def process(self):
        say(f"started {self.task_id}")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.3)
        return "finished"


if __name__ == "__main__":
    if MODE == "nap":
        for _ in range(6):
            CrashEngine.submit(CrashNap, 1.0)
    elif MODE == "stuck":
        CrashEngine.submit(CrashNap, 60.0)
    elif MODE == "early":
        CrashEngine.submit(CrashEarly)
    elif MODE == "burst":
        for _ in range(3):
            CrashEngine.submit(CrashNap, 0.0)
    else:
        sys.exit(f"unknown mode {MODE!r}")
    CrashEngine.run(burst=MODE == "burst")
    say("returned")
