"""Retries with backoff, and the failed store, on a durable queue in a file.

Run it from anywhere::

    python examples/retries.py

A flaky task succeeds on its third attempt; a hopeless one fails on every
attempt and ends in the failed store. The script prints each attempt as it
runs, then what the store holds. Afterwards, from the same directory (the
queue is ``retries.sqlite3`` there)::

    PYTHONPATH=path/to/examples tempest failed list retries:RetryTempest
    PYTHONPATH=path/to/examples tempest failed show retries:RetryTempest <task id>
    grep <task id> RetryTempest.task.log           # every attempt of one task
"""

from __future__ import annotations

import time

from tempest import Engine, Retry, Task
from tempest.queues import SQLiteQueue

BEGAN = time.time()


class RetryTempest(Engine):
    class configure:
        threads = 2
        queue = SQLiteQueue("retries.sqlite3")
        retries = 3          # every task: up to four attempts
        retry_delay = 0.5    # 0.5 s, 1 s, 2 s (each times 1 to 1.5)
        report_every = None


class Flaky(Task):
    """Fails twice (a ConnectionError), then works."""

    def process(self, order):
        print(f"  {time.time() - BEGAN:5.2f} s  {order}: attempt {self.attempt}", flush=True)
        if self.attempt < 3:
            raise ConnectionError("the gateway is busy")
        return "charged"

    def after_retry(self, exc, delay):
        print(f"           {self.args[0]}: {exc}; again in {delay:.2f} s", flush=True)

    def after_success(self, result):
        print(f"           {self.args[0]}: {result}", flush=True)


class Hopeless(Task):
    """Asks for a retry itself, 0.2 s later, until none are left."""

    def process(self, order):
        print(f"  {time.time() - BEGAN:5.2f} s  {order}: attempt {self.attempt}", flush=True)
        raise Retry(delay=0.2, reason="the card was declined")

    def after_failure(self, exc):
        print(f"           {self.args[0]}: gave up after {self.attempt} attempts", flush=True)


if __name__ == "__main__":
    RetryTempest.purge_failed()
    RetryTempest.submit(Flaky, "order-1")
    hopeless = RetryTempest.submit(Hopeless, "order-2")
    RetryTempest.start()
    deadline = time.monotonic() + 20
    while RetryTempest.stats()["failed"] + RetryTempest.stats()["succeeded"] < 2 \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    RetryTempest.stop()
    entry = RetryTempest.failed_task(hopeless)
    print(f"failed store: {RetryTempest.failed_count()} entry: {entry['task']} "
          f"{entry['args']} after {entry['attempts']} attempts: "
          f"{entry['error_type']}: {entry['error']}")
