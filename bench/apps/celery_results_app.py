"""The Celery app of ``bench.call``: Redis broker and Redis result backend.

The worker runs ``celery -A bench.apps.celery_results_app worker -P threads``.
Every key it makes, the broker's and the result backend's, starts with
``<BENCH_NS>:`` (kombu's and the backend's ``global_keyprefix``).
:mod:`bench.apps.celery_app` is the same without results (the drains).
"""

from __future__ import annotations

from celery import Celery

from bench.apps import NS, REDIS_URL

app = Celery("bench_call", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    broker_transport_options={"global_keyprefix": f"{NS}:"},
    result_backend_transport_options={"global_keyprefix": f"{NS}:"},
    broker_connection_retry_on_startup=True,
    task_default_queue=NS,
    task_ignore_result=False,
    result_expires=600,
)


@app.task(name="bench.call_noop")
def noop() -> int:
    return 1
