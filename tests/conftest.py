"""Shared fixtures: a fresh engine class per test, bounded waits, a thread-leak guard."""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tempest import Engine
from tempest.queues import MemoryQueue

_counter = itertools.count()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "leaks_threads: the test deliberately leaves a stuck (abandoned) thread"
    )


REDIS_URL = os.environ.get("TEMPEST_TEST_REDIS", "redis://127.0.0.1:6379/15")
POSTGRES_DSN = os.environ.get("TEMPEST_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def service_unavailable(reason: str) -> None:
    """Skip a test whose server is absent; fail it instead when CI is set."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: service tests must run)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The test Redis (database 15 of 127.0.0.1:6379 by default); skip/fail if absent."""
    try:
        import redis
    except ImportError:
        service_unavailable("the redis driver is not installed: pip install -e '.[test]'")
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except Exception as exc:
        service_unavailable(f"no Redis at {REDIS_URL}: {exc}")
    return REDIS_URL


@pytest.fixture(scope="session")
def postgres_dsn() -> str:
    """The test PostgreSQL (database test on 127.0.0.1:5432); skip/fail if absent."""
    try:
        import psycopg
    except ImportError:
        service_unavailable("the psycopg driver is not installed: pip install -e '.[test]'")
    try:
        psycopg.connect(POSTGRES_DSN, connect_timeout=2).close()
    except Exception as exc:
        service_unavailable(f"no PostgreSQL at {POSTGRES_DSN}: {exc}")
    return POSTGRES_DSN


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.005
             ) -> Any:
    """Wait until *predicate()* is truthy and return it; fail after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {predicate}")
        pause.wait(interval)


@pytest.fixture(autouse=True)
def no_leaked_threads(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves threads running (engines must stop cleanly)."""
    before = set(threading.enumerate())
    yield
    if request.node.get_closest_marker("leaks_threads"):
        return
    deadline = time.monotonic() + 5.0
    while True:
        # The pool that aresult() waits in keeps its idle threads, as any executor.
        leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()
                  and not t.name.startswith("tempest-aresult")]
        if not leaked or time.monotonic() > deadline:
            break
        leaked[0].join(0.05)
    assert not leaked, f"threads left running: {[t.name for t in leaked]}"


@pytest.fixture
def make_engine(tmp_path: Path) -> Iterator[Callable[..., type[Engine]]]:
    """Build an Engine subclass with a unique name, logging into tmp_path.

    Options are the configure block's; defaults here: ``threads=2``, a fresh
    MemoryQueue, ``report_every=None``. Every engine made is stopped afterwards.
    """
    made: list[type[Engine]] = []

    def factory(**options: Any) -> type[Engine]:
        options.setdefault("threads", 2)
        options.setdefault("queue", MemoryQueue())
        options.setdefault("log_dir", str(tmp_path))
        options.setdefault("report_every", None)
        name = options.pop("class_name", f"TestEngine{next(_counter)}")
        block = type("configure", (), options)
        engine = type(name, (Engine,), {"configure": block})
        made.append(engine)
        return engine

    factory.made = made  # type: ignore[attr-defined]  # for fixtures that stop them early
    yield factory
    for engine in made:
        try:
            engine.stop(timeout=10)
        except Exception:
            pass


def main_log(engine: type[Engine]) -> str:
    """The engine's main log, after the lines logged so far are written."""
    return _read(engine, "log")


def task_log(engine: type[Engine]) -> str:
    """The engine's task log, after the lines logged so far are written."""
    return _read(engine, "task.log")


def _read(engine: type[Engine], suffix: str) -> str:
    control = engine._state.control
    if control is not None and control.runtime.logs is not None:  # None: not open yet
        control.runtime.logs.flush()
    opts = engine._options
    log_dir = opts["log_dir"]() if callable(opts["log_dir"]) else opts["log_dir"]
    path = Path(os.fspath(log_dir)) / f"{opts['name']}.{suffix}"
    return path.read_text(encoding="utf-8") if path.exists() else ""


BUILT_IN_KINDS = ["memory", "sqlite", "redis", "postgres"]
"""The built-in queues, as ``built_in_queue`` makes them."""


@contextlib.contextmanager
def built_in_queue(kind: str, request: pytest.FixtureRequest, tmp_path: Path, name: str
                   ) -> Iterator[Any]:
    """A fresh queue of the built-in *kind*, its storage removed afterwards.

    *name* (letters, digits, underscores) names the Redis queue or the PostgreSQL
    table; SQLite's file is ``tmp_path / "queue.db"``. Redis and PostgreSQL come
    through their fixtures: skipped where the server is absent, failed under CI.
    """
    if kind == "memory":
        yield MemoryQueue()
        return
    remove: Callable[[], Any] = lambda: None  # noqa: E731 - the storage's own clean-up
    if kind == "sqlite":
        from tempest.queues import SQLiteQueue

        made: Any = SQLiteQueue(tmp_path / "queue.db")
    elif kind == "redis":
        from tempest.queues import RedisQueue

        from .queues.test_redis import delete_queue

        url = request.getfixturevalue("redis_url")
        made = RedisQueue(url, name=name)
        remove = lambda: delete_queue(url, name)  # noqa: E731
    else:
        from tempest.queues import PostgresQueue

        from .queues.test_postgres import drop_tables

        dsn = request.getfixturevalue("postgres_dsn")
        made = PostgresQueue(dsn, table=name)
        remove = lambda: drop_tables(dsn, name)  # noqa: E731
    try:
        yield made
    finally:
        made.close()
        remove()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
