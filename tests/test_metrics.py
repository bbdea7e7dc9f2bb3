"""Prometheus metrics: EngineCollector's families, and the metrics_port server."""

from __future__ import annotations

import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from tempest import ConfigurationError, Task

from .conftest import free_port, main_log, wait_for

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from tempest.metrics import EngineCollector  # noqa: E402


class MetOk(Task):
    def process(self, n: int) -> int:
        return n


class MetBoom(Task):
    def process(self) -> None:
        raise ValueError("boom")


class MetSlow(Task):
    class configure:
        timeout = 0.05

    def process(self) -> None:
        for _ in range(5000):  # short sleeps: its TaskTimeout fires between two
            time.sleep(0.001)


class MetFlaky(Task):
    """Fails its first attempt, succeeds the second."""

    class configure:
        retries = 1
        retry_delay = 0.01

    def process(self) -> str:
        if self.attempt == 1:
            raise RuntimeError("first try")
        return "ok"


class MetAsync(Task):
    async def process(self, n: int) -> int:
        return n


class MetHold(Task):
    release = threading.Event()

    def process(self) -> None:
        MetHold.release.wait(10)


@pytest.fixture(autouse=True)
def _release() -> Any:
    MetHold.release.clear()
    yield
    MetHold.release.set()


def scrape(collector: EngineCollector) -> dict[str, Any]:
    """The collector's families as Prometheus text, parsed back: name -> family."""
    registry = CollectorRegistry()
    registry.register(collector)
    return {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}


def samples(family: Any, suffix: str = "") -> dict[tuple[tuple[str, str], ...], float]:
    """A family's samples named ``<family><suffix>``, keyed by their sorted labels."""
    return {tuple(sorted(s.labels.items())): s.value for s in family.samples
            if s.name == family.name + suffix}


def test_counts_per_task_and_outcome_match_what_ran(make_engine):
    """Counters per task and outcome, retries and the duration histogram match the run."""
    engine = make_engine()
    collector = EngineCollector(engine)
    for n in range(5):
        engine.submit(MetOk, n)
    engine.submit(MetBoom)
    engine.submit(MetBoom)
    engine.submit(MetSlow)
    engine.submit(MetFlaky)
    engine.submit(MetAsync, 1)
    engine.submit(MetAsync, 2)
    engine._options["queue"].enqueue(["bad1", "NoSuchTask"])
    engine._options["queue"].enqueue(["bad2", "MetOk"])  # no argument: rejected
    engine.start()
    try:
        wait_for(lambda: engine.stats()["processed"] == 12 and engine.stats()["rejected"] == 2
                 and engine.stats()["running"] == 0)
        families = scrape(collector)
    finally:
        assert engine.stop(timeout=10)
    name = engine.__name__
    tasks = samples(families["tempest_tasks"], "_total")
    expected = {
        ("MetOk", "succeeded"): 5, ("MetOk", "rejected"): 1, ("MetBoom", "failed"): 2,
        ("MetSlow", "timed_out"): 1, ("MetFlaky", "succeeded"): 1,
        ("MetAsync", "succeeded"): 2, ("<unknown>", "rejected"): 1,
    }
    for (task, outcome), count in expected.items():
        labels = (("engine", name), ("outcome", outcome), ("task", task))
        assert tasks[labels] == count, (task, outcome)
    assert sum(tasks.values()) == sum(expected.values())
    retries = samples(families["tempest_retries"], "_total")
    assert retries[(("engine", name), ("task", "MetFlaky"))] == 1
    assert sum(retries.values()) == 1
    histogram = families["tempest_task_duration_seconds"]
    counts = samples(histogram, "_count")
    attempts = {"MetOk": 5, "MetBoom": 2, "MetSlow": 1, "MetFlaky": 2, "MetAsync": 2}
    assert counts == {(("engine", name), ("task", task)): n for task, n in attempts.items()}
    sums = samples(histogram, "_sum")
    assert sums[(("engine", name), ("task", "MetSlow"))] >= 0.05
    slow = sorted((float(s.labels["le"]), s.value) for s in histogram.samples
                  if s.name.endswith("_bucket") and s.labels["task"] == "MetSlow")
    assert slow[-1] == (float("inf"), 1)
    assert [v for _, v in slow] == sorted(v for _, v in slow)  # cumulative
    assert dict(slow)[0.05] == 0  # it ran past its 0.05 s timeout
    assert samples(families["tempest_threads"]) == {(("engine", name),): 2}
    assert samples(families["tempest_running"]) == {(("engine", name),): 0}
    assert samples(families["tempest_abandoned_threads"]) == {(("engine", name),): 0}
    depth = samples(families["tempest_queue_depth"])
    assert depth[(("engine", name), ("state", "ready"))] == 0
    assert depth[(("engine", name), ("state", "failed"))] == 3  # MetBoom twice, MetSlow


def test_running_gauge_while_a_task_runs(make_engine):
    """``tempest_running`` counts the messages in hand at scrape time."""
    engine = make_engine(threads=3)
    collector = EngineCollector(engine)
    engine.submit(MetHold)
    engine.submit(MetHold)
    engine.start()
    try:
        wait_for(lambda: engine.stats()["running"] == 2)
        families = scrape(collector)
        assert samples(families["tempest_running"]) == {(("engine", engine.__name__),): 2}
    finally:
        MetHold.release.set()
        assert engine.stop(timeout=10)


def test_only_queue_depth_while_not_running(make_engine):
    """Before a run (or in a process that only submits) only the queue's depth is there."""
    engine = make_engine()
    collector = EngineCollector(engine)
    for n in range(3):
        engine.submit(MetOk, n)
    families = scrape(collector)
    assert set(families) == {"tempest_queue_depth"}
    depth = samples(families["tempest_queue_depth"])
    assert depth[(("engine", engine.__name__), ("state", "ready"))] == 3
    assert depth[(("engine", engine.__name__), ("state", "scheduled"))] == 0


def test_registers_in_a_describing_registry(make_engine):
    """A registry that describes collectors on register (the default one does) takes it."""
    engine = make_engine()
    registry = CollectorRegistry(auto_describe=True)
    registry.register(EngineCollector(engine))
    assert "tempest_queue_depth" in generate_latest(registry).decode()




def get(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.headers["Content-Type"], response.read().decode()


def test_metrics_port_serves_while_running_and_closes_after(make_engine):
    """``metrics_port``: /metrics served on 127.0.0.1 while running, closed after stop."""
    port = free_port()
    engine = make_engine(metrics_port=port)
    engine.start()
    try:
        for n in range(4):
            engine.submit(MetOk, n)
        engine.submit(MetAsync, 5)
        wait_for(lambda: engine.stats()["succeeded"] == 5)
        status, content_type, text = get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200 and content_type.startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(text)}
        tasks = samples(families["tempest_tasks"], "_total")
        name = engine.__name__
        assert tasks[(("engine", name), ("outcome", "succeeded"), ("task", "MetOk"))] == 4
        assert tasks[(("engine", name), ("outcome", "succeeded"), ("task", "MetAsync"))] == 1
        assert "process_resident_memory_bytes" in families
        with pytest.raises(urllib.error.HTTPError) as info:
            get(f"http://127.0.0.1:{port}/other")
        assert info.value.code == 404
        assert f"metrics served url=http://127.0.0.1:{port}/metrics" in main_log(engine)
    finally:
        assert engine.stop(timeout=10)
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port),
                                                                         timeout=2):
        pass


def test_metrics_port_zero_takes_a_free_port(make_engine):
    """``metrics_port = 0``: any free port, named in the main log."""
    engine = make_engine(metrics_port=0)
    engine.start()
    try:
        url = wait_for(lambda: re.search(r"metrics served url=(\S+)", main_log(engine)))[1]
        assert url.startswith("http://127.0.0.1:") and not url.endswith(":0/metrics")
        assert get(url)[0] == 200
    finally:
        assert engine.stop(timeout=10)


def test_metrics_port_answers_metrics_only(make_engine):
    """Only ``/metrics`` (with or without a query string) answers; ``/`` and the rest: 404."""
    port = free_port()
    engine = make_engine(metrics_port=port)
    engine.start()
    try:
        for path in ("/metrics", "/metrics?name[]=tempest_tasks_total"):
            assert get(f"http://127.0.0.1:{port}{path}")[0] == 200, path
        for path in ("/", "/?x=1", "/metrics/", "/metricsx", "/favicon.ico"):
            with pytest.raises(urllib.error.HTTPError) as info:
                get(f"http://127.0.0.1:{port}{path}")
            assert info.value.code == 404, path
    finally:
        assert engine.stop(timeout=10)


def test_a_port_in_use_fails_the_start(make_engine):
    """A port that cannot be bound fails run()/start(), which leaves nothing running."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        engine = make_engine(metrics_port=taken.getsockname()[1])
        with pytest.raises(OSError):
            engine.start()
    assert "start-up failed" in main_log(engine)
    assert engine.stop(timeout=5)


def test_missing_library_names_the_extra(make_engine, monkeypatch):
    """Without prometheus_client, metrics_port and EngineCollector say which extra to add."""
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import fails
    engine = make_engine(metrics_port=9)
    with pytest.raises(ConfigurationError) as info:
        engine.start()
    assert "metrics_port" in str(info.value)
    assert "pip install 'task-tempest[metrics]'" in str(info.value)
    with pytest.raises(ConfigurationError, match=r"task-tempest\[metrics\]"):
        EngineCollector(engine)
