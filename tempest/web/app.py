"""The dashboard's Starlette application: pages, their JSON twins, the actions, /metrics.

Each page ``/<name>`` has a twin ``/api/<name>`` returning the same view as
JSON (see :mod:`tempest.web.views`), which the page's script fetches every
two seconds to refresh its live parts. The only state-changing requests are
the POSTs under ``/failed/``: each checks the CSRF token and the browser's word
on where it comes from (``Origin``, ``Sec-Fetch-Site``), is refused (403) when
the dashboard is read-only, names the failed-store entry it acts on by task id
(or acts on all of them), and redirects to a page that says what it did (a
signed cookie carries the notice: a link cannot make a page say anything).
Without auth, only requests for this machine's names are answered (see
:mod:`tempest.web.security`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
from prometheus_client import CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Route

from tempest.engine import Engine
from tempest.exceptions import Unsupported
from tempest.metrics import EngineCollector
from tempest.web import views
from tempest.web._checks import parse_auth
from tempest.web.security import (
    CSRF_COOKIE,
    NOTICE_COOKIE,
    BasicAuth,
    Csrf,
    Notices,
    SecurityHeaders,
    TrustedHosts,
    from_elsewhere,
    parse_hosts,
)

__all__ = ["build"]

HERE = Path(__file__).parent

PAGES = {
    "overview": views.overview, "queued": views.queued, "scheduled": views.scheduled,
    "running": views.running, "failed": views.failed, "rejected": views.rejected,
    "periodic": views.periodic,
}
"""Page name -> the function building its view (the overview is ``/``)."""

NAV = [("overview", "Overview"), ("queued", "Queued"), ("scheduled", "Scheduled"),
       ("running", "Running"), ("failed", "Failed"), ("rejected", "Rejected"),
       ("periodic", "Periodic")]

MAX_LIMIT = 500
MAX_TASK_ID = 1000

LOOK_IN_QUEUE_EVERY = 30
"""The task page's live refresh calls ``queue.find()`` (a scan on most backends) on every
30th refresh only (once a minute); see :func:`tempest.web.views.task`."""

STATIC = {"dashboard.js": "text/javascript; charset=utf-8",
          "dashboard.css": "text/css; charset=utf-8"}

NOTICES = {
    "retried": "Retried {id}: enqueued again, ready now.",
    "deleted": "Deleted {id} from the failed store.",
    "retried_all": "Retried {n} failed task(s): enqueued again, ready now.",
    "deleted_all": "Deleted {n} failed task(s).",
    "missing": "{id} is not in the failed store (retried or deleted meanwhile?).",
}


def build(engine: type[Engine], *, read_only: bool = False, auth: str | None = None,
          allowed_hosts: Iterable[str] | None = None) -> Starlette:
    """The dashboard of *engine*; see :func:`tempest.web.dashboard`."""
    if not (isinstance(engine, type) and issubclass(engine, Engine) and engine is not Engine):
        raise TypeError(f"dashboard() takes an Engine subclass, not {engine!r}")
    if auth is not None:
        parse_auth(auth)
    hosts = None if allowed_hosts is None else parse_hosts(allowed_hosts)
    dash = _Dashboard(engine, read_only=read_only)
    routes = [
        *(Route("/" if name == "overview" else f"/{name}", dash.page(name), name=name)
          for name in PAGES),
        Route("/api/{page}", dash.api),
        Route("/task/{task_id:path}", dash.task_page, name="task"),
        Route("/api/task/{task_id:path}", dash.task_api),
        Route("/search", dash.search),
        Route("/failed/{action}", dash.act, methods=["POST"]),
        Route("/metrics", dash.metrics),
        Route("/static/{name}", dash.static),
    ]
    middleware = [Middleware(SecurityHeaders)]
    # Auth keeps a rebinding site out already; allowed_hosts, when given, still applies.
    if auth is None or hosts is not None:
        middleware.append(Middleware(TrustedHosts, allowed=hosts or ()))
    if auth is not None:
        middleware.append(Middleware(BasicAuth, auth=auth))
    app = Starlette(routes=routes, middleware=middleware)
    app.state.tempest_engine = engine
    return app


class _Dashboard:
    """The request handlers of one dashboard app."""

    def __init__(self, engine: type[Engine], *, read_only: bool) -> None:
        self.engine = engine
        self.read_only = read_only
        self.csrf = Csrf()
        self.notices = Notices(self.csrf.secret)
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True, undefined=jinja2.StrictUndefined)
        self.static_files = {name: (HERE / "static" / name).read_bytes() for name in STATIC}
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(EngineCollector(engine))

    # -- pages -----------------------------------------------------------------------------

    def page(self, name: str) -> Any:
        """The handler of page *name*: the page, rendered whole (the first load)."""

        async def render(request: Request) -> Response:
            view = await run_in_threadpool(self._view, request, name)
            return self._render(request, name, view)

        return render

    async def api(self, request: Request) -> Response:
        """A page's view as JSON (the live refresh)."""
        name = request.path_params["page"]
        if name not in PAGES:
            return PlainTextResponse("no such page\n", status_code=404)
        return _json(await run_in_threadpool(self._view, request, name))

    async def task_page(self, request: Request) -> Response:
        """Everything known of one task id."""
        task_id = request.path_params["task_id"]
        view = await run_in_threadpool(self._task_view, request, task_id)
        return self._render(request, "task", view)

    async def task_api(self, request: Request) -> Response:
        """The task page's view as JSON; the script's refreshes (``?live=N``, its Nth) look
        in the queue on every :data:`LOOK_IN_QUEUE_EVERY`-th one only."""
        live = request.query_params.get("live")
        in_queue = live is None or _number(live, 0, None) % LOOK_IN_QUEUE_EVERY == 0
        return _json(await run_in_threadpool(self._task_view, request,
                                             request.path_params["task_id"], in_queue))

    async def search(self, request: Request) -> Response:
        """Search by task id: to that task's page."""
        task_id = request.query_params.get("task_id", "").strip()
        if not task_id:
            return RedirectResponse(_root(request) + "/", status_code=303)
        return RedirectResponse(f"{_root(request)}/task/{quote(task_id, safe='')}",
                                status_code=303)

    async def static(self, request: Request) -> Response:
        """The script and the style sheet (a fixed set of files: no paths from the URL)."""
        name = request.path_params["name"]
        if name not in self.static_files:
            return PlainTextResponse("not found\n", status_code=404)
        return Response(self.static_files[name], media_type=STATIC[name],
                        headers={"cache-control": "no-cache"})

    async def metrics(self, request: Request) -> Response:
        """Prometheus' text format: the engine's counters and the queue's depths."""
        body = await run_in_threadpool(generate_latest, self.registry)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    # -- actions ---------------------------------------------------------------------------

    async def act(self, request: Request) -> Response:
        """retry, delete (one entry, by its task id), retry-all, delete-all."""
        refused = self._refused(request)
        if refused is not None:
            return refused
        action = request.path_params["action"]
        form = await request.form()
        token = form.get("csrf")
        if not self.csrf.valid(request.cookies.get(CSRF_COOKIE),
                               token if isinstance(token, str) else None):
            return PlainTextResponse("missing or bad CSRF token: reload the page and "
                                     "try again\n", status_code=403)
        task_id = form.get("task_id")
        if action in ("retry", "delete") and (
                not isinstance(task_id, str) or not task_id or len(task_id) > MAX_TASK_ID):
            return PlainTextResponse("a task_id is needed\n", status_code=400)
        try:
            notice = await run_in_threadpool(self._act, action, task_id)
        except Unsupported:
            return PlainTextResponse(f"the failed store is {views.NOT_AVAILABLE}\n",
                                     status_code=409)
        root = _root(request)
        if form.get("back") == "task" and isinstance(task_id, str):
            where = f"{root}/task/{quote(task_id, safe='')}"
        else:
            where = f"{root}/failed"
        response = RedirectResponse(where, status_code=303)
        response.set_cookie(NOTICE_COOKIE, self.notices.seal(notice), max_age=60,
                            httponly=True, samesite="strict", path=root or "/")
        return response

    def _refused(self, request: Request) -> Response | None:
        """The answer to an action refused before its form is read, or None."""
        if self.read_only:
            return PlainTextResponse("this dashboard is read-only\n", status_code=403)
        if from_elsewhere(request):
            return PlainTextResponse("refused: this request comes from another site's page "
                                     "(its Origin or Sec-Fetch-Site header says so)\n",
                                     status_code=403)
        if request.path_params["action"] not in ("retry", "delete", "retry-all", "delete-all"):
            return PlainTextResponse("no such action\n", status_code=404)
        return None

    def _act(self, action: str, task_id: Any) -> dict[str, str]:
        engine = self.engine
        if action == "retry-all":
            return {"done": "retried_all", "n": str(engine.retry_failed_all())}
        if action == "delete-all":
            return {"done": "deleted_all", "n": str(engine.purge_failed())}
        try:
            (engine.retry_failed if action == "retry" else engine.delete_failed)(task_id)
        except KeyError:
            return {"done": "missing", "id": task_id}
        return {"done": "retried" if action == "retry" else "deleted", "id": task_id}

    # -- building and rendering ------------------------------------------------------------

    def _page(self, request: Request) -> views.Page:
        return views.Page(self.engine, root=_root(request),
                          offset=_number(request.query_params.get("offset"), 0, None),
                          limit=_number(request.query_params.get("limit"), views.PAGE_SIZE,
                                        MAX_LIMIT) or views.PAGE_SIZE,
                          actions=not self.read_only)

    def _view(self, request: Request, name: str) -> dict[str, Any]:
        view = PAGES[name](self._page(request))
        view["page"] = name
        return view

    def _task_view(self, request: Request, task_id: str, in_queue: bool = True
                   ) -> dict[str, Any]:
        view = views.task(self._page(request), task_id, in_queue=in_queue)
        view["page"] = "task"
        return view

    def _render(self, request: Request, name: str, view: dict[str, Any]) -> Response:
        nonce = request.cookies.get(CSRF_COOKIE)
        fresh = not nonce or len(nonce) > 100
        if fresh:
            nonce = Csrf.new_nonce()
        assert nonce is not None
        root = _root(request)
        api = (f"{root}/api/task/{quote(view['task_id'], safe='')}" if name == "task"
               else f"{root}/api/{name}")
        sealed = request.cookies.get(NOTICE_COOKIE)
        html = self.templates.get_template(f"{name}.html").render(
            view=view, fields=view["fields"], sections=view["sections"],
            engine=self.engine.__name__, read_only=self.read_only,
            csrf=self.csrf.token(nonce), root=root, api=api, nav=NAV, current=name,
            notice=_notice(self.notices.open(sealed)), outcomes=views.OUTCOMES)
        response = HTMLResponse(html, headers={"cache-control": "no-store"})
        if fresh:
            response.set_cookie(CSRF_COOKIE, nonce, httponly=True, samesite="strict",
                                path=root or "/")
        if sealed is not None:  # said once, on the page the action led to
            response.delete_cookie(NOTICE_COOKIE, path=root or "/", httponly=True,
                                   samesite="strict")
        return response


def _root(request: Request) -> str:
    return str(request.scope.get("root_path", "")).rstrip("/")


def _number(text: str | None, default: int, most: int | None) -> int:
    try:
        value = int(text) if text is not None else default
    except ValueError:
        value = default
    value = max(0, value)
    return min(value, most) if most is not None else value


def _notice(notice: dict[str, str] | None) -> str:
    """The status line of what an action did (from its signed cookie), or ""."""
    if notice is None or notice.get("done") not in NOTICES:
        return ""
    return NOTICES[notice["done"]].format(id=notice.get("id", "")[:MAX_TASK_ID],
                                n=_number(notice.get("n"), 0, None))


def _json(view: dict[str, Any]) -> Response:
    return JSONResponse(view, headers={"cache-control": "no-store"})
