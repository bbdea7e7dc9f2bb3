"""The overview stays fast on a big queue: 100,000 ready and 10,000 failed on PostgreSQL."""

from __future__ import annotations

import statistics
import time
import uuid

import pytest

from .conftest import LOCAL, need_web

pytestmark = pytest.mark.timeout(120)

READY, FAILED = 100_000, 10_000


def test_overview_answers_in_100_ms_on_a_big_postgres_queue(make_engine, postgres_dsn):
    """The overview page and its JSON twin, median of five, under 100 ms each."""
    need_web()
    import psycopg
    from starlette.testclient import TestClient

    from tempest.queues import PostgresQueue
    from tempest.web import dashboard

    from ..queues.test_postgres import drop_tables

    table = f"web_perf_{uuid.uuid4().hex[:8]}"
    queue = PostgresQueue(postgres_dsn, table=table)
    try:
        len(queue)  # the queue creates its tables on first use
        # Rows as the queue stores them (its schema is documented in tempest.queues.postgres),
        # written in two statements: enqueueing 110,000 messages one by one takes minutes.
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            conn.execute(
                f"INSERT INTO {table} (queue, body) SELECT %s, "
                f"json_build_array('q' || n, 'Work', n)::text FROM generate_series(1, %s) n",
                (queue.name, READY))
            conn.execute(
                f"INSERT INTO {table}_failed (queue, task_id, body, task, attempts, error_type, "
                f"error, traceback, first_failed_at, last_failed_at, priority, expires_at) "
                f"SELECT %s, 'f' || n, json_build_array('f' || n, 'Work', n)::text, 'Work', 3, "
                f"'ValueError', 'bad ' || n, 'Traceback (most recent call last): ...', "
                f"now() - n * interval '1 second', now() - n * interval '1 second', 0, "
                f"now() + interval '7 days' FROM generate_series(1, %s) n",
                (queue.name, FAILED))
            conn.execute(f"ANALYZE {table}")
            conn.execute(f"ANALYZE {table}_failed")
        engine = make_engine(queue=queue)
        with TestClient(dashboard(engine), base_url=LOCAL) as client:
            view = client.get("/api/overview").json()
            assert (view["fields"]["ready"], view["fields"]["failed"]) == (
                str(READY), str(FAILED))
            for path in ("/", "/api/overview", "/failed"):
                took = []
                for _ in range(5):
                    began = time.perf_counter()
                    assert client.get(path).status_code == 200
                    took.append(time.perf_counter() - began)
                assert statistics.median(took) < 0.100, (path, took)
    finally:
        queue.close()
        drop_tables(postgres_dsn, table)
