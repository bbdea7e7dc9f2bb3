"""The Dramatiq broker and actors: the worker runs ``dramatiq bench.apps.dramatiq_app``.

Every key it makes starts with ``<BENCH_NS>:`` (the broker's namespace);
default middleware, no results middleware.
"""

from __future__ import annotations

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from bench import common
from bench.apps import NS, REDIS_URL, configure_worker

broker = RedisBroker(url=REDIS_URL, namespace=NS)
dramatiq.set_broker(broker)


@dramatiq.actor(actor_name="bench_noop", queue_name="bench")
def noop() -> None:
    common.noop()


@dramatiq.actor(actor_name="bench_sleep", queue_name="bench")
def sleep() -> None:
    common.sleep()


@dramatiq.actor(actor_name="bench_sleep1", queue_name="bench")
def sleep1() -> None:
    common.sleep1()


@dramatiq.actor(actor_name="bench_probe", queue_name="bench")
def probe(submitted: float) -> None:
    common.probe(submitted)


TASKS = {"noop": noop, "sleep": sleep, "sleep1": sleep1, "probe": probe}

configure_worker()
