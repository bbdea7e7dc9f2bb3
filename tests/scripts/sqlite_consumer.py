"""Bare SQLiteQueue consumers and producers in processes of their own, for test_sqlite.py.

Usage:

``python sqlite_consumer.py consume PATH RESULTS THREADS``
    THREADS threads, each with a queue object of its own, dequeue and ack
    messages, appending ``<task_id> <pid>`` to RESULTS for each, until each
    thread gets a message whose id is ``stop``. ``ready`` is printed once the
    queue's tables exist.
``python sqlite_consumer.py enqueue PATH TASK_ID``
    Enqueues one message, then prints ``time.monotonic()`` (comparable
    between processes on one machine) once ``enqueue`` returned.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from tempest.queues.sqlite import SQLiteQueue

GIVE_UP = 60.0
"""Seconds after which a consumer thread stops waiting for its stop message."""


def consume(path: str, results: str, threads: int) -> None:
    queues = [SQLiteQueue(path, lease=30) for _ in range(threads)]
    len(queues[0])  # creates the tables
    print("ready", flush=True)

    def drain(queue: SQLiteQueue) -> None:
        deadline = time.monotonic() + GIVE_UP
        while time.monotonic() < deadline:
            message = queue.dequeue(timeout=1)
            if message is None:
                continue
            if message[0] != "stop":
                fd = os.open(results, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(fd, f"{message[0]} {os.getpid()}\n".encode())
                finally:
                    os.close(fd)
            queue.ack(message)
            if message[0] == "stop":
                return

    workers = [threading.Thread(target=drain, args=(q,)) for q in queues]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    for queue in queues:
        queue.close()


def enqueue(path: str, task_id: str) -> None:
    queue = SQLiteQueue(path)
    queue.enqueue([task_id, "Task"])
    print(time.monotonic(), flush=True)
    queue.close()


if __name__ == "__main__":
    if sys.argv[1] == "consume":
        consume(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        enqueue(sys.argv[2], sys.argv[3])
