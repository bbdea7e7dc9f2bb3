"""Every page on every built-in queue: what the engines stored, as the dashboard shows it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tempest import Task

from ..conftest import BUILT_IN_KINDS, built_in_queue, wait_for
from .conftest import LOCAL, announcing, need_web

pytestmark = pytest.mark.timeout(90)


class BackendBoom(Task):
    def process(self, n: Any) -> None:
        raise KeyError(f"nothing for {n}")


class BackendOk(Task):
    class configure:
        store_result = True

    def process(self, n: Any) -> Any:
        return n * 2


@pytest.fixture(params=BUILT_IN_KINDS)
def queue(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Any]:
    """A fresh queue of each built-in kind (Redis and PostgreSQL: skipped without them)."""
    with built_in_queue(request.param, request, tmp_path,
                        f"web_{uuid.uuid4().hex[:8]}") as made:
        yield made


def test_every_page_shows_what_the_engines_stored(make_engine, queue):
    """Engines, depths, messages, a failure with its traceback, a rejected message, a kept
    result and the outcome chart, read back through each queue's own methods."""
    need_web()
    from starlette.testclient import TestClient

    from tempest.web import dashboard

    engine = make_engine(**announcing(queue=queue))
    failed = engine.submit(BackendBoom, 1)
    kept = engine.submit(BackendOk, 21)
    engine.submit("NoSuchTask", 1)
    engine.start()
    wait_for(lambda: queue.failed_count() == 1 and queue.rejected_count() == 1
             and engine.stats()["succeeded"] == 1)
    waiting = engine.submit(BackendOk, 1, delay=3600)
    with TestClient(dashboard(engine), base_url=LOCAL) as client:

        def announced() -> Any:
            view = client.get("/api/overview").json()
            return view if view["sections"]["engines"]["rows"] and \
                view["chart"]["totals"]["failed"] else None

        overview = wait_for(announced)
        assert overview["fields"]["engines"] == "1"
        assert overview["sections"]["engines"]["rows"][0][0] == engine.__name__
        assert (overview["fields"]["failed"], overview["fields"]["rejected"],
                overview["fields"]["scheduled"]) == ("1", "1", "1")
        totals = overview["chart"]["totals"]
        assert (totals["succeeded"], totals["failed"], totals["rejected"]) == (1, 1, 1)
        engine.stop(timeout=10)
        scheduled = client.get("/api/scheduled").json()["sections"]["messages"]
        assert scheduled["error"] is None
        assert [r[0]["text"] for r in scheduled["rows"]] == [waiting]
        engine.submit(BackendOk, 2, task_id="ready-1")
        queued = client.get("/api/queued").json()["sections"]["messages"]
        assert [r[0]["text"] for r in queued["rows"]] == ["ready-1"]
        rejected = client.get("/api/rejected").json()["sections"]["rejected"]["rows"]
        assert rejected[0][2:] == ["NoSuchTask", "[1]", "UnknownTask"]
        row = client.get("/api/failed").json()["sections"]["failed"]["rows"][0]
        assert row[0]["text"] == failed and "KeyError" in row[5]["summary"]
        assert "Traceback" in row[5]["pre"]
        for task_id, status in ((failed, "failed"), (kept, "succeeded"),
                                (waiting, "scheduled"), ("ready-1", "waiting")):
            view = client.get(f"/api/task/{task_id}").json()
            assert view["fields"]["status"] == status, (task_id, view)
        for page in ("", "queued", "scheduled", "running", "failed", "rejected", "periodic"):
            html = client.get(f"/{page}").text
            assert "not available for this queue" not in html and "error: " not in html, page
