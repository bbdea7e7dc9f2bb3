"""The web dashboard on a busy shop: two engines, one queue, a steady stream of orders.

Run it from anywhere (it needs the web extra: ``pip install 'task-tempest[web]'``)::

    python examples/dashboard.py

then open http://127.0.0.1:8100/ . Two engines (``Shop``, 4 threads, and
``ShopWorker``, 2 threads) share one SQLite queue, ``dashboard.sqlite3`` in the
current directory; a producer submits orders, e-mails and thumbnails, some of
which fail (declined cards land in the failed store, with their tracebacks)
or time out, some are scheduled for later; a report runs every 30 seconds.
Ctrl-C stops it all.

From another terminal, the same dashboard without the engines (it only reads
the queue file)::

    cd examples && tempest web dashboard:Shop --port 8101
"""

from __future__ import annotations

import random
import threading
import time

import uvicorn

from tempest import Engine, Task, every
from tempest.queues import SQLiteQueue
from tempest.web import dashboard


class Charge(Task):
    class configure:
        retries = 1  # one more attempt, then the failed store
        retry_delay = 2.0

    def process(self, order, amount):
        time.sleep(random.uniform(0.2, 1.5))
        if random.random() < 0.12:
            raise ValueError(f"card declined for order {order} ({amount:.2f} EUR)")
        return {"order": order, "charged": amount}


class SendEmail(Task):
    def process(self, to, template):
        time.sleep(random.uniform(0.05, 0.3))


class Thumbnail(Task):
    class configure:
        timeout = 1.0

    def process(self, image, size):
        # Now and then an image too large to finish in time: a timeout.
        time.sleep(2.0 if random.random() < 0.08 else random.uniform(0.1, 0.5))


class DailyReport(Task):
    def process(self):
        time.sleep(0.2)


class Shop(Engine):
    class configure:
        threads = 4
        queue = SQLiteQueue("dashboard.sqlite3")
        periodic = [every(30, DailyReport, name="report")]
        announce_every = 1.0  # the dashboard sees the engines within a second
        report_every = None
        log_dir = "logs"


class ShopWorker(Shop):
    class configure:
        threads = 2


def produce(stop: threading.Event, rate: float = 6.0) -> None:
    """Submit a realistic mix of work, about *rate* tasks a second, until *stop*."""
    order = 1000
    while not stop.wait(1 / rate):
        order += 1
        pick = random.random()
        if pick < 0.5:
            Shop.submit(Charge, f"A-{order}", round(random.uniform(5, 400), 2))
        elif pick < 0.8:
            Shop.submit(SendEmail, f"customer{order}@example.com", "receipt",
                        delay=random.choice([0, 0, 0, 20, 120]))
        else:
            Shop.submit(Thumbnail, f"img/{order}.jpg", random.choice([64, 256, 1024]))


def main() -> None:
    """Start both engines and the producer, serve the dashboard until Ctrl-C."""
    stop = threading.Event()
    Shop.start()
    ShopWorker.start()
    producer = threading.Thread(target=produce, args=(stop,), daemon=True)
    producer.start()
    try:
        uvicorn.run(dashboard(Shop), host="127.0.0.1", port=8100, log_level="warning")
    finally:
        stop.set()
        ShopWorker.stop(timeout=10)
        Shop.stop(timeout=10)


if __name__ == "__main__":
    main()
