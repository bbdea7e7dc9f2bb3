"""Fixtures of the dashboard tests: the app served by uvicorn, a headless Chromium."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tempest import Engine, Task

from ..conftest import service_unavailable, wait_for

CHROMIUM = "/usr/bin/chromium"

LOCAL = "http://127.0.0.1:8100"
"""The test client's base URL: a dashboard without auth answers a loopback Host only."""

try:
    import uvicorn
    from starlette.applications import Starlette
except ImportError:  # the web extra: tests that need it skip (or fail on CI)
    uvicorn = None  # type: ignore[assignment]


def need_web() -> None:
    """Skip a test without the web extra; fail it instead when CI is set."""
    if uvicorn is None:
        service_unavailable("the web extra is not installed: pip install -e '.[test]'")


@pytest.fixture
def serve() -> Iterator[Callable[[Starlette], str]]:
    """Serve an app with uvicorn on 127.0.0.1 (a free port), in a thread; its base URL."""
    need_web()
    running: list[tuple[Any, threading.Thread, socket.socket]] = []

    def start(app: Starlette) -> str:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                               lifespan="off"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]},
                                  name="test-uvicorn", daemon=True)
        thread.start()
        running.append((server, thread, listener))
        wait_for(lambda: server.started or not thread.is_alive())
        assert server.started, "uvicorn did not start"
        return f"http://127.0.0.1:{listener.getsockname()[1]}"

    yield start
    for server, thread, listener in running:
        server.should_exit = True
        thread.join(10)
        listener.close()


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """Debian's chromium, headless, driven by Playwright (no browser is downloaded)."""
    if not Path(CHROMIUM).exists():
        service_unavailable(f"no {CHROMIUM}: apt-get install chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        service_unavailable("playwright is not installed: pip install -e '.[test]'")
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh browser context and page; what the page's script logs is kept."""
    context = browser.new_context()
    context.set_default_timeout(10_000)
    tab = context.new_page()
    tab.errors = []
    tab.on("pageerror", lambda error: tab.errors.append(str(error)))
    yield tab
    context.close()


def announcing(**options: Any) -> dict[str, Any]:
    """Engine options that make a started engine announce itself often."""
    options.setdefault("announce_every", 0.2)
    return options


def start_and_wait_announced(engine: type[Engine]) -> dict[str, Any]:
    """Start *engine* and return its record once its queue lists it."""
    engine.start()
    queue = engine._options["queue"]
    return wait_for(lambda: next((r for r in queue.engines()
                                  if r["name"] == engine._options["name"]), None))


def run_to_failed_store(engine: type[Engine], task: type[Task], *args_list: Any
                        ) -> list[str]:
    """Run one *task* (one that raises) per argument list into the failed store, the
    engine started and stopped around it; their ids."""
    ids = [engine.submit(task, *args) for args in args_list]
    engine.start()
    queue = engine._options["queue"]
    wait_for(lambda: all(queue.find_failed(i) for i in ids) and not len(queue))
    engine.stop(timeout=10)
    return ids
