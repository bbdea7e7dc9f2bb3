"""The dashboard in a real headless Chromium (Debian's), driven by Playwright.

The app is served by uvicorn on 127.0.0.1 and the engine runs in this process;
the pages are what a user sees, their script included.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from tempest import Engine, Task

from ..conftest import wait_for
from .conftest import announcing, run_to_failed_store, start_and_wait_announced

pytestmark = pytest.mark.timeout(90)

SCRIPT = "<script>window.__pwned = 1</script>"
IMAGE = '<img src=x onerror="window.__pwned = 2">'

release = threading.Event()


class BrowserHold(Task):
    def process(self) -> None:
        release.wait(20)


class BrowserBoom(Task):
    def process(self, *args: Any) -> None:
        raise ValueError(f"no good: {args[0] if args else ''}")


class BrowserOk(Task):
    def process(self, *args: Any) -> None:
        pass


@pytest.fixture(autouse=True)
def _released() -> Any:
    release.clear()
    yield
    release.set()


def dashboard_of(engine: type[Engine], **options: Any) -> Any:
    from tempest.web import dashboard

    return dashboard(engine, **options)


def failed_ids(engine: type[Engine], *args_list: Any) -> list[str]:
    """Run one failing task per argument list into the failed store; their ids."""
    return run_to_failed_store(engine, BrowserBoom, *args_list)


def refreshed(page: Any) -> None:
    """Wait for the page's script to have refreshed its live parts once more."""
    before = page.text_content("#live-status")
    page.wait_for_function(
        "before => document.getElementById('live-status').textContent.startsWith('live · ')"
        " && document.getElementById('live-status').textContent !== before", arg=before,
        polling=100)


def test_overview_shows_the_engine_and_live_counts(make_engine, serve, page):
    """The page loads, lists the running engine, and its counts change without a reload."""
    engine = make_engine(**announcing(threads=1))
    engine.submit(BrowserHold)
    record = start_and_wait_announced(engine)
    queue = engine._options["queue"]
    wait_for(lambda: not len(queue))  # the one thread holds the first task
    base = serve(dashboard_of(engine))
    page.goto(base + "/")
    assert page.title().startswith("Overview")
    engines = page.locator('table[data-section="engines"] tbody tr')
    assert engines.count() == 1
    cells = engines.first.locator("td").all_text_contents()
    assert cells[0] == engine.__name__ and cells[1] == record["host"]
    assert cells[2] == str(record["pid"])
    assert page.text_content('[data-field="ready"]') == "0"
    page.evaluate("window.__sameDocument = true")
    for _ in range(3):
        engine.submit(BrowserHold)
    page.wait_for_function(
        "() => document.querySelector('[data-field=\"ready\"]').textContent === '3'")
    assert page.evaluate("window.__sameDocument") is True  # refreshed in place, no reload
    assert page.locator("svg[data-chart] g.bars > g").count() == 60
    release.set()
    page.wait_for_function(
        "() => document.querySelector('[data-field=\"ready\"]').textContent === '0'")
    assert page.evaluate("window.__sameDocument") is True
    assert page.errors == []


def test_retrying_a_failed_task(make_engine, serve, page):
    """Retry on a failed row puts that task back in the queue and says so."""
    engine = make_engine()
    first, second = failed_ids(engine, ["a"], ["b"])
    base = serve(dashboard_of(engine))
    page.goto(base + "/failed")
    assert page.text_content('[data-field="total"]') == "2"
    row = page.locator('table[data-section="failed"] tbody tr', has_text=first)
    row.locator("summary").click()
    assert "ValueError: no good: a" in row.locator("pre").text_content()
    with page.expect_navigation():
        row.get_by_role("button", name="Retry").click()
    assert page.url == base + "/failed"
    assert f"Retried {first}" in page.text_content(".notice")
    queue = engine._options["queue"]
    assert queue.find(first)["status"] == "waiting"
    assert queue.find_failed(second) is not None and queue.find_failed(first) is None
    assert page.locator('table[data-section="failed"] tbody tr').count() == 1
    # The buttons the script builds on a refresh work too.
    refreshed(page)
    with page.expect_navigation():
        page.locator('table[data-section="failed"] tbody tr', has_text=second).get_by_role(
            "button", name="Retry").click()
    assert f"Retried {second}" in page.text_content(".notice")
    assert queue.failed_count() == 0
    assert page.errors == []


def test_a_post_without_the_token_is_refused(make_engine, serve, page):
    """A state-changing request without the page's CSRF token gets 403 and changes nothing."""
    engine = make_engine()
    (task_id,) = failed_ids(engine, ["x"])
    base = serve(dashboard_of(engine))
    page.goto(base + "/failed")  # the browser now holds the cookie
    refused = page.request.post(base + "/failed/retry", form={"task_id": task_id})
    assert refused.status == 403
    forged = page.request.post(base + "/failed/delete-all", form={"csrf": "f" * 64})
    assert forged.status == 403
    # A form another site would post: the cookie alone is not enough.
    page.evaluate("""([url, id]) => {
        const form = document.createElement('form');
        form.method = 'post'; form.action = url;
        const input = document.createElement('input');
        input.name = 'task_id'; input.value = id; form.appendChild(input);
        document.body.appendChild(form); form.submit();
    }""", [base + "/failed/retry", task_id])
    page.wait_for_load_state()
    page.wait_for_function("() => document.body.textContent.includes('CSRF')")
    assert engine._options["queue"].find_failed(task_id) is not None


def test_a_script_argument_is_shown_as_text_and_never_runs(make_engine, serve, page):
    """<script> and onerror payloads in arguments, errors and ids stay text, also once the
    script has rebuilt the rows."""
    engine = make_engine()
    failed_ids(engine, [SCRIPT], [IMAGE])
    waiting = engine.submit(BrowserOk, SCRIPT, task_id=IMAGE)
    base = serve(dashboard_of(engine))
    for path in ("/failed", "/queued", f"/task/{waiting}"):
        page.goto(base + path)
        refreshed(page)
        text = page.text_content("main")
        assert SCRIPT in text or IMAGE in text, path
        assert page.evaluate("window.__pwned") is None, path
        assert page.locator("main script, main img").count() == 0, path
    page.goto(base + "/failed")
    refreshed(page)
    errors = page.locator('table[data-section="failed"] summary').all_text_contents()
    assert f"ValueError: no good: {SCRIPT}" in errors
    assert page.evaluate("window.__pwned") is None
    assert page.errors == []


def test_read_only_hides_the_actions(make_engine, serve, page):
    """A read-only dashboard shows the failed tasks without a button, and refuses actions."""
    engine = make_engine()
    (task_id,) = failed_ids(engine, ["x"])
    base = serve(dashboard_of(engine, read_only=True))
    page.goto(base + "/failed")
    assert page.locator('table[data-section="failed"] tbody tr', has_text=task_id).count() == 1
    refreshed(page)
    assert page.locator("button", has_text="Retry").count() == 0
    assert page.locator("form[method=post]").count() == 0
    assert page.text_content(".badge") == "read-only"
    token = page.get_attribute('meta[name="tempest-csrf"]', "content")
    refused = page.request.post(base + "/failed/retry", form={"task_id": task_id,
                                                               "csrf": token})
    assert refused.status == 403
    assert engine._options["queue"].find_failed(task_id) is not None


def test_auth_is_required_when_set(make_engine, serve, browser):
    """Without the password: 401; with it, the page and its live refresh work."""
    base = serve(dashboard_of(make_engine(), auth="admin:s3cret"))
    for credentials in (None, {"username": "admin", "password": "nope"}):
        context = browser.new_context(http_credentials=credentials)
        try:
            assert context.request.get(base + "/").status == 401
            assert context.request.get(base + "/api/overview").status == 401
        finally:
            context.close()
    context = browser.new_context(http_credentials={"username": "admin",
                                                    "password": "s3cret"})
    try:
        tab = context.new_page()
        assert tab.goto(base + "/").status == 200
        refreshed(tab)  # the script's requests carry the credentials too
    finally:
        context.close()


def test_metrics_of_a_running_engine(make_engine, serve, page):
    """/metrics, read by a browser, parses as Prometheus text: the in-process engine's
    counters and the queue's depths."""
    from prometheus_client.parser import text_string_to_metric_families

    engine = make_engine(**announcing())
    engine.submit(BrowserOk, 1, delay=600)
    failed_ids(engine, ["m"])
    engine.start()
    engine.submit(BrowserOk, 2)
    wait_for(lambda: engine.stats()["succeeded"] == 1)
    base = serve(dashboard_of(engine))
    response = page.request.get(base + "/metrics")
    assert response.status == 200
    families = {f.name: f for f in text_string_to_metric_families(response.text())}
    depth = {s.labels["state"]: s.value for s in families["tempest_queue_depth"].samples}
    assert depth == {"ready": 0, "scheduled": 1, "failed": 1}
    tasks = {(s.labels["task"], s.labels["outcome"]): s.value
             for s in families["tempest_tasks"].samples if s.name == "tempest_tasks_total"}
    assert tasks[("BrowserOk", "succeeded")] == 1
    assert {s.labels["engine"] for s in families["tempest_running"].samples} == {
        engine._options["name"]}


def test_the_task_page_refresh_leaves_the_queue_scan_alone(make_engine, serve, page):
    """The task page's live refresh asks with ?live=N and does not call find() again:
    the page keeps the queue's answer of its load."""
    from tempest.queues import MemoryQueue

    class CountingQueue(MemoryQueue):
        finds = 0

        def find(self, task_id: str) -> Any:
            CountingQueue.finds += 1
            return super().find(task_id)

    engine = make_engine(queue=CountingQueue())
    waiting = engine.submit(BrowserOk, 1)
    base = serve(dashboard_of(engine))
    asked: list[str] = []
    page.on("request", lambda request: asked.append(request.url))
    page.goto(f"{base}/task/{waiting}")
    refreshed(page)
    refreshed(page)
    assert CountingQueue.finds == 1
    assert [u for u in asked if "/api/" in u][:2] == [
        f"{base}/api/task/{waiting}?live=1", f"{base}/api/task/{waiting}?live=2"]
    assert page.text_content('[data-field="status"]') == "waiting"
    assert "waiting" in page.text_content('table[data-section="queue"]')
    assert page.errors == []


def test_links_from_the_json_stay_on_the_dashboard(make_engine, serve, page):
    """A link cell whose href could leave the site (//host, /\\host, a tab or line break
    that browsers drop, javascript:) is written as text, not as a link."""
    import json

    base = serve(dashboard_of(make_engine()))
    hrefs = ["/\\evil.example", "/\t/evil.example", "/\n/evil.example", "//evil.example",
             "javascript:alert(1)", "https://evil.example/", "/task/ok"]
    view = {"fields": {"total": str(len(hrefs))}, "sections": {"running": {
        "rows": [[{"text": f"link {n}", "href": href}, "", "", "", ""]
                 for n, href in enumerate(hrefs)],
        "empty": "", "unavailable": None, "error": None}}}
    page.route("**/api/running?*", lambda route: route.fulfill(
        status=200, content_type="application/json", body=json.dumps(view)))
    page.goto(base + "/running")
    refreshed(page)
    cells = page.locator('table[data-section="running"] tbody td:first-child')
    assert cells.all_text_contents() == [f"link {n}" for n in range(len(hrefs))]
    links = page.locator('table[data-section="running"] tbody a')
    assert [links.nth(n).get_attribute("href") for n in range(links.count())] == ["/task/ok"]
    assert page.errors == []
