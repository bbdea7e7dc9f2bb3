"""The Celery app: the worker runs ``celery -A bench.apps.celery_app worker -P threads``.

Every key it makes starts with ``<BENCH_NS>:`` (kombu's ``global_keyprefix``);
no result backend: tempest keeps no results either.
"""

from __future__ import annotations

from celery import Celery

from bench import common
from bench.apps import NS, REDIS_URL, configure_worker

app = Celery("bench", broker=REDIS_URL)
app.conf.update(
    broker_transport_options={"global_keyprefix": f"{NS}:"},
    broker_connection_retry_on_startup=True,
    task_default_queue=NS,
    task_ignore_result=True,
)


@app.task(name="bench.noop")
def noop() -> None:
    common.noop()


@app.task(name="bench.sleep")
def sleep() -> None:
    common.sleep()


@app.task(name="bench.sleep1")
def sleep1() -> None:
    common.sleep1()


@app.task(name="bench.probe")
def probe(submitted: float) -> None:
    common.probe(submitted)


TASKS = {"noop": noop, "sleep": sleep, "sleep1": sleep1, "probe": probe}

configure_worker()
