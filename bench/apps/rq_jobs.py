"""The RQ job functions: the workers run ``rq worker-pool`` on the queue ``<BENCH_NS>``.

RQ has no thread workers: its pool runs one process per worker. The finish
line is therefore shared through Redis (see bench.apps.SharedFinishLine).
"""

from __future__ import annotations

from bench import common
from bench.apps import configure_worker


def noop() -> None:
    common.noop()


def sleep() -> None:
    common.sleep()


def sleep1() -> None:
    common.sleep1()


def probe(submitted: float) -> None:
    common.probe(submitted)


TASKS = {"noop": noop, "sleep": sleep, "sleep1": sleep1, "probe": probe}

configure_worker(shared=True)
