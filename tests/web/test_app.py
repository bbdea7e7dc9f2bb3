"""The dashboard's pages, JSON views and actions, through Starlette's test client."""

from __future__ import annotations

import re
import threading
import time
from typing import Any

import pytest

from tempest import Engine, Task, every
from tempest.queues import MemoryQueue

from ..conftest import wait_for
from .conftest import LOCAL, need_web, run_to_failed_store

pytestmark = pytest.mark.timeout(60)

SCRIPT = "<script>window.__pwned = 1</script>"


class WebBoom(Task):
    def process(self, *args: Any) -> None:
        raise RuntimeError(f"boom {args!r}")


class WebOk(Task):
    def process(self, x: Any) -> Any:
        return x


class WebKept(Task):
    class configure:
        store_result = True

    def process(self, x: Any) -> Any:
        return x


@pytest.fixture
def client_for() -> Any:
    """A test client for dashboard(engine, **options)."""
    need_web()
    from starlette.testclient import TestClient

    from tempest.web import dashboard

    clients: list[Any] = []

    def make(engine: type[Engine], **options: Any) -> Any:
        client = TestClient(dashboard(engine, **options), base_url=LOCAL)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def fail_tasks(engine: type[Engine], *args_list: Any) -> list[str]:
    """Run one failing task per argument list to the failed store; their ids."""
    return run_to_failed_store(engine, WebBoom, *args_list)


def token(client: Any) -> str:
    """The CSRF token of the page the client loaded last (its cookie is in the jar)."""
    html = client.get("/failed").text
    return re.search(r'name="tempest-csrf" content="([0-9a-f]+)"', html).group(1)


def test_every_page_renders_on_a_memory_queue(make_engine, client_for):
    """Each page and its JSON twin answer 200 on a queue that has every method."""
    engine = make_engine()
    engine.submit(WebOk, 1)
    client = client_for(engine)
    for page in ("", "queued", "scheduled", "running", "failed", "rejected", "periodic"):
        html = client.get(f"/{page}")
        assert html.status_code == 200, page
        assert "not available for this queue" not in html.text, page
        view = client.get(f"/api/{page or 'overview'}")
        assert view.status_code == 200 and view.headers["cache-control"] == "no-store"
        assert view.json()["page"] == (page or "overview")
    assert client.get("/api/nothing").status_code == 404


def test_overview_counts_depths_and_draws_outcomes(make_engine, client_for):
    """Depth cards count ready, scheduled, failed and rejected; the chart has 60 bars."""
    engine = make_engine()
    queue = engine._options["queue"]
    for n in range(3):
        engine.submit(WebOk, n)
    engine.submit(WebOk, 9, delay=600)
    queue.reject(["bad", "Nope"], "UnknownTask")
    minute = int(time.time() // 60) * 60
    queue.add_outcomes(minute - 60, {"succeeded": 7, "failed": 2})
    view = client_for(engine).get("/api/overview").json()
    fields = view["fields"]
    assert (fields["ready"], fields["scheduled"], fields["failed"], fields["rejected"]) == (
        "3", "1", "0", "1")
    assert fields["engines"] == "0" and fields["running"] == "0"
    bars = view["chart"]["bars"]
    assert len(bars) == 60
    assert [s["outcome"] for s in bars[-2]["segments"]] == ["succeeded", "failed"]
    assert "7 succeeded, 2 failed" in bars[-2]["title"]
    assert fields["last_minute"] == "9 (0.15/s)"
    html = client_for(engine).get("/").text
    assert html.count('<rect class="o-succeeded"') == 1  # drawn server-side too


def test_a_queue_without_the_optional_methods_says_not_available(make_engine, client_for):
    """A user's queue with enqueue and dequeue only: every panel says so, no page fails."""

    class BareQueue:
        def enqueue(self, message: Any) -> None:
            pass

        def dequeue(self) -> Any:
            return None

    client = client_for(make_engine(queue=BareQueue()))
    for page in ("", "queued", "scheduled", "running", "failed", "rejected", "task/x"):
        response = client.get(f"/{page}")
        assert response.status_code == 200, page
        assert "not available for this queue" in response.text, page
    assert client.get("/api/failed").json()["sections"]["failed"]["unavailable"] == (
        "failed(), failed_count(): not available for this queue")


def test_a_failing_queue_method_shows_its_error(make_engine, client_for):
    """A queue method that raises shows the error in its panel; the page still renders."""

    class Flaky(MemoryQueue):
        def engines(self) -> list[dict[str, Any]]:
            raise ConnectionError("server gone")

    view = client_for(make_engine(queue=Flaky())).get("/api/overview").json()
    assert view["sections"]["engines"]["error"] == "error: ConnectionError: server gone"
    assert view["fields"]["ready"] == "0"


def test_engine_records_fill_the_engines_and_running_pages(make_engine, client_for):
    """Each live engine's record is a row; its running tasks are listed with their age."""
    engine = make_engine()
    queue = engine._options["queue"]
    started = time.time() - 75
    queue.announce("box:42:W:1", {
        "engine_id": "box:42:W:1", "name": "W", "host": "box", "pid": 42, "threads": 4,
        "uptime": 3700, "processed": 12, "busy": 1, "version": "0.1.0", "stopping": False,
        "announced_at": time.time(),
        "running": [{"task_id": "t-1", "task": "Slow", "started_at": started}]}, 30)
    client = client_for(engine)
    overview = client.get("/api/overview").json()
    assert overview["sections"]["engines"]["rows"][0][:7] == [
        "W", "box", "42", "4", "1h 01m", "12", "1"]
    assert overview["fields"]["running"] == "1"
    rows = client.get("/api/running").json()["sections"]["running"]["rows"]
    assert rows[0][0] == {"text": "t-1", "href": "/task/t-1"}
    assert rows[0][1:3] == ["Slow", "W (box:42)"] and rows[0][4].startswith("1m 1")
    task = client.get("/api/task/t-1").json()
    assert task["fields"]["status"] == "running"


def test_queued_and_scheduled_pages_page_through_the_messages(make_engine, client_for):
    """50 a page, in the queue's order, with next and previous links."""
    engine = make_engine()
    ids = [engine.submit(WebOk, n) for n in range(120)]
    soon = engine.submit(WebOk, "soon", delay=60)
    later = engine.submit(WebOk, "later", delay=600)
    client = client_for(engine)
    first = client.get("/api/queued").json()
    assert [r[0]["text"] for r in first["sections"]["messages"]["rows"]] == ids[:50]
    assert first["pager"]["next"] == 50 and first["pager"]["previous"] is None
    last = client.get("/api/queued?offset=100").json()
    assert [r[0]["text"] for r in last["sections"]["messages"]["rows"]] == ids[100:]
    assert last["pager"]["next"] is None and last["pager"]["previous"] == 50
    # The range shown is a live field: a refresh after more came updates it too.
    assert first["fields"]["range"] == "1\u201350" and last["fields"]["range"] == "101\u2013120"
    engine.submit(WebOk, "one more")
    assert client.get("/api/queued?offset=100").json()["fields"]["range"] == "101\u2013121"
    assert 'data-field="range">101\u2013121<' in client.get("/queued?offset=100").text
    assert 'href="?offset=50&amp;limit=50"' in client.get("/queued?offset=100").text
    rows = client.get("/api/scheduled").json()["sections"]["messages"]["rows"]
    assert [r[0]["text"] for r in rows] == [soon, later]
    assert rows[0][4].startswith("in ") and rows[0][2] == '["soon"]'
    assert len(engine._options["queue"]) == 121  # looking took nothing


def test_rejected_lists_the_latest_first(make_engine, client_for):
    """Rejected messages, the newest on top, paged from the newest."""
    engine = make_engine()
    queue = engine._options["queue"]
    for n in range(60):
        queue.reject([f"r{n}", "Nope", n], "UnknownTask")
    queue.reject("not json", "Undecodable")
    client = client_for(engine)
    rows = client.get("/api/rejected").json()["sections"]["rejected"]["rows"]
    assert rows[0] == ["61", "", "(undecodable)", "not json", "Undecodable"]
    assert rows[1][:3] == ["60", {"text": "r59", "href": "/task/r59"}, "Nope"]
    assert len(rows) == 50
    rest = client.get("/api/rejected?offset=50").json()["sections"]["rejected"]["rows"]
    assert [r[0] for r in rest] == [str(n) for n in range(11, 0, -1)]


def test_failed_page_shows_the_traceback_and_retries_by_id(make_engine, client_for):
    """The failed store with its tracebacks; Retry puts that one entry back in the queue."""
    engine = make_engine()
    first, second = fail_tasks(engine, [1], [2])
    client = client_for(engine)
    html = client.get("/failed").text
    assert "RuntimeError: boom (1,)" in html and "Traceback (most recent call last)" in html
    done = client.post("/failed/retry", data={"task_id": first, "csrf": token(client)},
                       follow_redirects=False)
    assert done.status_code == 303
    assert done.headers["location"] == "/failed"
    assert f"Retried {first}" in client.get(done.headers["location"]).text
    assert f"Retried {first}" not in client.get("/failed").text  # said once
    queue = engine._options["queue"]
    assert queue.find_failed(first) is None and queue.find_failed(second) is not None
    assert queue.find(first)["status"] == "waiting"
    missing = client.post("/failed/delete", data={"task_id": first, "csrf": token(client)},
                          follow_redirects=False)
    assert missing.headers["location"] == "/failed"
    assert f"{first} is not in the failed store" in client.get("/failed").text
    deleted = client.post("/failed/delete", data={"task_id": second, "csrf": token(client),
                                                  "back": "task"}, follow_redirects=False)
    assert deleted.headers["location"] == f"/task/{second}"
    assert f"Deleted {second} from the failed store" in client.get(f"/task/{second}").text
    assert queue.failed_count() == 0


def test_retry_all_and_delete_all(make_engine, client_for):
    """The bulk buttons act on every entry of the failed store and say how many."""
    engine = make_engine()
    fail_tasks(engine, [1], [2], [3])
    client = client_for(engine)
    done = client.post("/failed/retry-all", data={"csrf": token(client)})
    assert "Retried 3 failed task(s)" in done.text
    assert len(engine._options["queue"]) == 3
    fail_tasks(engine, [4])
    done = client.post("/failed/delete-all", data={"csrf": token(client)})
    assert "Deleted 4 failed task(s)" in done.text  # the three retried failed again


def test_actions_need_the_csrf_token(make_engine, client_for):
    """A POST without the token, with a wrong one, or without the cookie is refused (403)."""
    engine = make_engine()
    (task_id,) = fail_tasks(engine, [1])
    client = client_for(engine)
    good = token(client)
    for data in ({"task_id": task_id}, {"task_id": task_id, "csrf": "0" * 64},
                 {"task_id": task_id, "csrf": "\u00e9" * 64},
                 {"task_id": task_id, "csrf": good[:-1] + ("0" if good[-1] != "0" else "1")}):
        refused = client.post("/failed/retry", data=data)
        assert refused.status_code == 403, data
        assert "CSRF" in refused.text
    client.cookies.clear()
    assert client.post("/failed/retry", data={"task_id": task_id, "csrf": good}
                       ).status_code == 403
    assert client.post("/failed/retry-all", data={}).status_code == 403
    assert client.get("/failed/retry").status_code == 405  # actions are POSTs only
    assert engine._options["queue"].failed_count() == 1


def test_read_only_hides_and_refuses_every_action(make_engine, client_for):
    """No retry or delete button; each action answers 403 even with a good token."""
    engine = make_engine()
    (task_id,) = fail_tasks(engine, [1])
    client = client_for(engine, read_only=True)
    for path in ("/failed", f"/task/{task_id}"):
        html = client.get(path).text
        assert "<button type=\"submit\" class=\"retry\"" not in html and "<form method=\"post\"" \
            not in html, path
        assert "read-only" in html
    rows = client.get("/api/failed").json()["sections"]["failed"]["rows"]
    assert all(not isinstance(c, dict) or "actions" not in c for r in rows for c in r)
    good = token(client)
    for action in ("retry", "delete", "retry-all", "delete-all"):
        assert client.post(f"/failed/{action}", data={"task_id": task_id, "csrf": good}
                           ).status_code == 403
    assert engine._options["queue"].failed_count() == 1


def test_basic_auth_when_set(make_engine, client_for):
    """With auth, every page (and /metrics) needs the user and password."""
    client = client_for(make_engine(), auth="admin:s3cret")
    for path in ("/", "/api/overview", "/metrics", "/static/dashboard.js"):
        refused = client.get(path)
        assert refused.status_code == 401, path
        assert refused.headers["www-authenticate"].startswith("Basic ")
    assert client.get("/", auth=("admin", "wrong")).status_code == 401
    assert client.get("/", auth=("admin", "s3cret")).status_code == 200


@pytest.mark.parametrize("auth", ["admin", "admin:", ":pw", ""])
def test_auth_must_be_user_colon_password(make_engine, auth):
    """dashboard(auth=...) takes 'user:password' only."""
    need_web()
    from tempest.web import dashboard

    with pytest.raises(ValueError, match="user:password"):
        dashboard(make_engine(), auth=auth)


def test_dashboard_takes_an_engine_class():
    """Anything but an Engine subclass is a TypeError."""
    need_web()
    from tempest.web import dashboard

    with pytest.raises(TypeError, match="Engine subclass"):
        dashboard(Engine)  # type: ignore[arg-type]


def test_what_a_task_carries_is_escaped(make_engine, client_for):
    """A task's arguments and error are text in the HTML, never markup."""
    engine = make_engine()
    (task_id,) = fail_tasks(engine, [SCRIPT])
    engine.submit(WebOk, SCRIPT, task_id="<b>id</b>")
    client = client_for(engine)
    for path in ("/failed", "/queued", f"/task/{task_id}", "/task/%3Cb%3Eid%3C%2Fb%3E"):
        html = client.get(path).text
        assert "<script>window" not in html and "<b>id" not in html, path
        assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in html, path
    assert client.get("/").headers["content-security-policy"].startswith("default-src 'self'")


def test_task_page_tells_where_a_task_is(make_engine, client_for):
    """Waiting, scheduled, failed (with its traceback), a kept result, or unknown."""
    engine = make_engine()
    (failed_id,) = fail_tasks(engine, ["x"])
    kept = engine.submit(WebKept, 41)
    engine.start()
    assert engine.result(kept, timeout=10) == 41
    engine.stop(timeout=10)
    waiting = engine.submit(WebOk, 1)
    later = engine.submit(WebOk, 2, delay=600)
    client = client_for(engine)
    status = {task_id: client.get(f"/api/task/{task_id}").json()["fields"]["status"]
              for task_id in (failed_id, kept, waiting, later, "nobody")}
    assert status[failed_id] == "failed" and status[kept] == "succeeded"
    assert status[waiting] == "waiting" and status[later] == "scheduled"
    assert status["nobody"].startswith("unknown")
    html = client.get(f"/task/{failed_id}").text
    assert "RuntimeError: boom (&#39;x&#39;,)" in html and "Traceback" in html
    facts = dict(client.get(f"/api/task/{kept}").json()["sections"]["facts"]["rows"])
    assert facts["value"] == "41" and facts["result"].startswith("succeeded, after 1 attempt")


def test_search_goes_to_the_task_page(make_engine, client_for):
    """/search?task_id=ID redirects to /task/ID (quoted); an empty search to the overview."""
    client = client_for(make_engine())
    found = client.get("/search?task_id=+a/b c+", follow_redirects=False)
    assert found.status_code == 303 and found.headers["location"] == "/task/a%2Fb%20c"
    assert client.get("/api/task/a%2Fb%20c").json()["task_id"] == "a/b c"
    assert client.get("/search?task_id=", follow_redirects=False).headers["location"] == "/"


def test_periodic_page_shows_last_and_next_firing(make_engine, client_for):
    """Each schedule with its task, when it fired last and when it fires next."""
    engine = make_engine(periodic=[every(60, WebOk, 1, name="minutely")])
    queue = engine._options["queue"]
    slot = (int(time.time() // 60) - 1) * 60.0
    queue.fire("minutely", slot, ["minutely@x", "WebOk", 1], keep=600)
    (row,) = client_for(engine).get("/api/periodic").json()["sections"]["schedules"]["rows"]
    assert row[:4] == ["minutely", "WebOk", "[1]", "every 1m 00s"]
    assert row[4] == time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(slot))
    assert row[5].startswith(time.strftime("%Y-%m-%d %H:", time.gmtime(slot + 120))[:11])
    assert "(in " in row[5]


def test_mounted_under_a_prefix(make_engine):
    """Mounted at /tempest in another Starlette app, links and the cookie stay under it."""
    need_web()
    from starlette.applications import Starlette
    from starlette.routing import Mount
    from starlette.testclient import TestClient

    from tempest.web import dashboard

    engine = make_engine()
    (task_id,) = fail_tasks(engine, [1])
    outer = Starlette(routes=[Mount("/tempest", dashboard(engine))])
    with TestClient(outer, base_url=LOCAL) as client:
        page = client.get("/tempest/failed")
        assert page.status_code == 200
        assert f'href="/tempest/task/{task_id}"' in page.text
        assert 'src="/tempest/static/dashboard.js"' in page.text
        assert "Path=/tempest" in page.headers["set-cookie"]
        csrf = re.search(r'name="tempest-csrf" content="([0-9a-f]+)"', page.text).group(1)
        done = client.post("/tempest/failed/retry", data={"task_id": task_id, "csrf": csrf},
                           follow_redirects=False)
        assert done.headers["location"] == "/tempest/failed"
        assert "Path=/tempest" in done.headers["set-cookie"]
        assert f"Retried {task_id}" in client.get("/tempest/failed").text
        assert client.get("/tempest/api/failed").json()["fields"]["total"] == "0"


def test_metrics_parse_as_prometheus_text(make_engine, client_for):
    """/metrics is Prometheus' text format, with the queue's depths."""
    from prometheus_client.parser import text_string_to_metric_families

    engine = make_engine()
    engine.submit(WebOk, 1)
    engine.submit(WebOk, 2, delay=600)
    response = client_for(engine).get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith(
        "text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    depth = {s.labels["state"]: s.value for s in families["tempest_queue_depth"].samples}
    assert depth["ready"] == 1 and depth["scheduled"] == 1 and depth["failed"] == 0


def test_static_files_are_a_fixed_set(make_engine, client_for):
    """The script and the style sheet are served; no other path is looked up."""
    client = client_for(make_engine())
    assert client.get("/static/dashboard.js").headers["content-type"].startswith(
        "text/javascript")
    assert client.get("/static/dashboard.css").status_code == 200
    assert client.get("/static/..%2Fapp.py").status_code == 404
    assert client.get("/static/views.py").status_code == 404


def test_pages_answer_while_tasks_run(make_engine, client_for):
    """The dashboard reads a queue that a running engine uses at the same time."""
    release = threading.Event()

    class WebHold(Task):
        def process(self) -> None:
            release.wait(10)

    engine = make_engine(threads=1)
    engine.submit(WebHold)
    engine.submit(WebHold)
    engine.start()
    try:
        client = client_for(engine)
        wait_for(lambda: client.get("/api/overview").json()["fields"]["ready"] == "1")
    finally:
        release.set()



def test_processes_sharing_a_secret_accept_each_others_tokens(make_engine, monkeypatch):
    """With TEMPEST_WEB_SECRET, a token from one app (process) is good in another."""
    need_web()
    from starlette.testclient import TestClient

    from tempest.web import dashboard

    engine = make_engine()
    (task_id,) = fail_tasks(engine, [1])
    monkeypatch.setenv("TEMPEST_WEB_SECRET", "one secret for every worker")
    first = TestClient(dashboard(engine), base_url=LOCAL)
    second = TestClient(dashboard(engine), base_url=LOCAL)
    monkeypatch.delenv("TEMPEST_WEB_SECRET")
    other = TestClient(dashboard(engine), base_url=LOCAL)
    csrf = token(first)
    for client in (second, other):
        client.cookies.update(first.cookies)
    assert other.post("/failed/retry", data={"task_id": task_id, "csrf": csrf}
                      ).status_code == 403
    done = second.post("/failed/retry", data={"task_id": task_id, "csrf": csrf},
                       follow_redirects=False)
    assert done.status_code == 303
    for client in (first, second, other):
        client.close()


FOREIGN = {"host": "attacker.example:8100"}


@pytest.mark.parametrize("path", ["/", "/api/overview", "/task/x", "/metrics",
                                  "/static/dashboard.js"])
def test_without_auth_a_foreign_host_is_refused(make_engine, client_for, path):
    """DNS rebinding: a request naming another site's host gets 400 and nothing of the
    dashboard, neither a page nor a CSRF cookie."""
    refused = client_for(make_engine()).get(path, headers=FOREIGN)
    assert refused.status_code == 400, path
    assert "allowed_hosts" in refused.text and "tempest-csrf" not in refused.text
    assert "set-cookie" not in refused.headers
    assert refused.headers["x-frame-options"] == "DENY"


@pytest.mark.parametrize("host", ["127.0.0.1:8100", "127.0.0.1", "localhost:8100",
                                  "LocalHost.:8100", "[::1]:8100", "[::1]", "127.0.0.2:9"])
def test_without_auth_loopback_hosts_are_answered(make_engine, client_for, host):
    """localhost and the loopback addresses, with any port, are this machine."""
    assert client_for(make_engine()).get("/", headers={"host": host}).status_code == 200


@pytest.mark.parametrize("host", ["", "127.0.0.1:80x", "[::1", "::1", "localhost.evil",
                                  "127.0.0.1.evil:8100", "localhost:8100@evil"])
def test_without_auth_a_malformed_or_lookalike_host_is_refused(make_engine, client_for, host):
    """A Host that is not exactly a loopback name (and port) is not one."""
    assert client_for(make_engine()).get("/", headers={"host": host}).status_code == 400


def test_with_auth_any_host_passes_on_to_auth(make_engine, client_for):
    """With auth, the password keeps a rebinding site out: a foreign Host gets the 401 of
    auth, and with the password the page."""
    client = client_for(make_engine(), auth="admin:s3cret")
    assert client.get("/", headers=FOREIGN).status_code == 401
    assert client.get("/", headers=FOREIGN, auth=("admin", "s3cret")).status_code == 200


def test_allowed_hosts_let_named_hosts_in(make_engine, client_for):
    """allowed_hosts adds names (any port, any case) to the loopback ones; "*" allows all;
    with auth as well, the list still applies."""
    engine = make_engine()
    client = client_for(engine, allowed_hosts=["Dash.Example.com", "::2"])
    for host in ("dash.example.com", "DASH.example.com:443", "dash.example.com.", "[::2]:80",
                 "127.0.0.1:8100"):
        assert client.get("/", headers={"host": host}).status_code == 200, host
    for host in ("attacker.example", "evil.dash.example.com", "dash.example.com.evil"):
        assert client.get("/", headers={"host": host}).status_code == 400, host
    assert client_for(engine, allowed_hosts=["*"]).get("/", headers=FOREIGN).status_code == 200
    both = client_for(engine, auth="admin:s3cret", allowed_hosts=["dash.example.com"])
    assert both.get("/", headers=FOREIGN, auth=("admin", "s3cret")).status_code == 400
    assert both.get("/", headers={"host": "dash.example.com"},
                    auth=("admin", "s3cret")).status_code == 200


@pytest.mark.parametrize(("hosts", "error"), [
    ("dash.example.com", TypeError), ([b"dash.example.com"], TypeError),
    (["dash.example.com:8100"], ValueError), (["https://dash.example.com"], ValueError),
    ([""], ValueError), (["dash example"], ValueError)])
def test_allowed_hosts_must_be_host_names(make_engine, hosts, error):
    """One str instead of a list, a port or a URL is a mistake, said at once."""
    need_web()
    from tempest.web import dashboard

    with pytest.raises(error, match="allowed_hosts"):
        dashboard(make_engine(), allowed_hosts=hosts)


def test_an_action_from_another_site_is_refused_even_with_a_token(make_engine, client_for):
    """A POST whose Origin is another site's (or null), or whose Sec-Fetch-Site says
    cross-site, gets 403 and changes nothing; the dashboard's own origin is let through."""
    engine = make_engine()
    (task_id,) = fail_tasks(engine, [1])
    client = client_for(engine)
    good = token(client)
    for headers in ({"origin": "http://attacker.example:8100"}, {"origin": "null"},
                    {"origin": "http://127.0.0.1:8101"}, {"origin": "http://localhost:8100"},
                    {"origin": "chrome-extension://abc"}, {"sec-fetch-site": "cross-site"},
                    {"origin": "http://127.0.0.1:8100", "sec-fetch-site": "cross-site"}):
        refused = client.post("/failed/retry", data={"task_id": task_id, "csrf": good},
                              headers=headers)
        assert refused.status_code == 403, headers
        assert "another site" in refused.text
    assert engine._options["queue"].failed_count() == 1
    done = client.post("/failed/retry", data={"task_id": task_id, "csrf": good},
                       headers={"origin": "http://127.0.0.1:8100",
                                "sec-fetch-site": "same-origin"}, follow_redirects=False)
    assert done.status_code == 303 and engine._options["queue"].failed_count() == 0


def test_an_action_behind_an_https_proxy_is_its_own_origin(make_engine, client_for):
    """Behind a proxy that speaks HTTPS, the browser's https Origin names the Host that the
    proxy passes on: the same site, without a port on either side."""
    engine = make_engine()
    (task_id,) = fail_tasks(engine, [1])
    client = client_for(engine, allowed_hosts=["dash.example.com"])
    done = client.post("/failed/retry", data={"task_id": task_id, "csrf": token(client)},
                       headers={"host": "dash.example.com",
                                "origin": "https://dash.example.com"},
                       follow_redirects=False)
    assert done.status_code == 303


def test_a_link_cannot_make_a_page_say_anything(make_engine, client_for):
    """The notice of an action comes in a signed cookie from its redirect: a crafted link's
    query, a forged cookie or another dashboard's cookie shows nothing."""
    need_web()
    from starlette.testclient import TestClient

    from tempest.web import dashboard

    engine = make_engine()
    fail_tasks(engine, [1])
    client = client_for(engine)
    spoof = "Your session expired: call +1 555 0100"
    for query in (f"done=missing&id={spoof}", f"done=retried_all&n=9&id={spoof}"):
        html = client.get(f"/failed?{query}").text
        # The spoof's words, not "555" alone: a page's random token may hold those digits.
        assert 'class="notice"' not in html and "555 0100" not in html
        assert "session expired" not in html and "Retried 9" not in html
    for forged in ("eyJkb25lIjogIm1pc3NpbmcifQ==.00", "."):
        client.cookies.set("tempest_notice", forged)
        assert 'class="notice"' not in client.get("/failed").text, forged
    utf8 = client_for(engine).get("/failed", headers={"cookie": "tempest_notice=x.é".encode()})
    assert utf8.status_code == 200 and 'class="notice"' not in utf8.text
    with TestClient(dashboard(engine), base_url=LOCAL) as other:
        done = other.post("/failed/delete-all", data={"csrf": token(other)},
                          follow_redirects=False)
        sealed = other.cookies["tempest_notice"]
    assert done.status_code == 303 and sealed
    client.cookies.set("tempest_notice", sealed)
    assert 'class="notice"' not in client.get("/failed").text


class CountingQueue(MemoryQueue):
    """A MemoryQueue that counts the calls of find(), the scan of the queue."""

    def __init__(self) -> None:
        super().__init__()
        self.finds = 0

    def find(self, task_id: str) -> Any:
        self.finds += 1
        return super().find(task_id)


def test_the_task_page_refresh_scans_the_queue_once_a_minute(make_engine, client_for):
    """The script's refreshes (?live=N) read the engines, the failed store and the result
    every time but find() on every 30th only; the page and a plain JSON view always do."""
    queue = CountingQueue()
    engine = make_engine(queue=queue)
    waiting = engine.submit(WebOk, 1)
    client = client_for(engine)
    assert "waiting" in client.get(f"/task/{waiting}").text and queue.finds == 1
    for n in range(1, 30):
        live = client.get(f"/api/task/{waiting}?live={n}").json()
        assert "status" not in live["fields"] and "queue" not in live["sections"], n
    assert queue.finds == 1
    live = client.get(f"/api/task/{waiting}?live=30").json()
    assert queue.finds == 2 and live["fields"]["status"] == "waiting"
    assert dict(live["sections"]["queue"]["rows"])["status"] == "waiting"
    assert client.get(f"/api/task/{waiting}").json()["fields"]["status"] == "waiting"
    assert queue.finds == 3
    # What is cheap to know still shows at once: the task running on an engine.
    queue.announce("box:1:W:1", {"engine_id": "box:1:W:1", "name": "W", "host": "box",
                                 "pid": 1, "announced_at": time.time(), "running": [
                                     {"task_id": waiting, "task": "WebOk",
                                      "started_at": time.time()}]}, 30)
    live = client.get(f"/api/task/{waiting}?live=31").json()
    assert live["fields"]["status"] == "running" and queue.finds == 3
