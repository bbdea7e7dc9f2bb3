"""Prometheus metrics of an engine: a collector, and the ``metrics_port`` server.

Needs the ``metrics`` extra (``pip install 'task-tempest[metrics]'``: the
prometheus-client library). ::

    from prometheus_client import REGISTRY
    from tempest.metrics import EngineCollector

    REGISTRY.register(EngineCollector(MathTempest))

The collector reads the engine's current run when scraped: the counts come
from the per-thread tallies the workers keep anyway (:mod:`tempest.tally`),
summed at scrape time, so a scrape adds nothing to a task's cost. While the
engine is not running in this process it yields only the queue's depth
(which any process that reaches the queue can read).

=======================================  =================================================
metric                                   what
=======================================  =================================================
``tempest_tasks_total``                  counter ``{engine, task, outcome}``: final
                                         outcomes ``succeeded``, ``failed``,
                                         ``timed_out``, and ``rejected`` messages (task
                                         ``<unknown>`` where the message named no
                                         registered task)
``tempest_retries_total``                counter ``{engine, task}``: attempts that failed
                                         or timed out with another one scheduled
``tempest_task_duration_seconds``        histogram ``{engine, task}``: every attempt that
                                         ran, retried ones included
``tempest_running``                      gauge ``{engine}``: messages in hand now
``tempest_prefetched``                   gauge ``{engine}``: messages held ahead of a
                                         free worker (the ``prefetch`` option)
``tempest_threads``                      gauge ``{engine}``: the ``threads`` option
``tempest_abandoned_threads``            gauge ``{engine}``: threads abandoned this run
``tempest_queue_depth``                  gauge ``{engine, state}``: ``ready``,
                                         ``scheduled``, ``failed`` (the failed store),
                                         where the queue counts them
=======================================  =================================================
"""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from tempest.exceptions import ConfigurationError
from tempest.tally import (
    BOUNDS,
    BUCKET,
    FAILED,
    OUTCOMES,
    REJECTED,
    RETRIED,
    SUCCEEDED,
    SUM,
    TIMED_OUT,
)

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

    from tempest.engine import Engine

__all__ = ["EngineCollector", "MetricsServer", "require"]

_FINAL = ((SUCCEEDED, "succeeded"), (FAILED, "failed"), (TIMED_OUT, "timed_out"),
          (REJECTED, "rejected"))
"""The outcomes of ``tempest_tasks_total`` (retries have their own counter)."""

_DEPTHS = (("queued", "ready"), ("scheduled", "scheduled"), ("failed_stored", "failed"))
"""stats() keys of the queue's counts, and their ``state`` label."""


def require(what: str = "tempest.metrics") -> None:
    """Raise ConfigurationError naming the extra where prometheus_client is missing."""
    try:
        import prometheus_client  # noqa: F401, PLC0415 - an optional extra
    except ImportError:
        raise ConfigurationError(
            f"{what}: Prometheus metrics need the prometheus-client library: "
            f"pip install 'task-tempest[metrics]'") from None


class EngineCollector:
    """A prometheus_client collector of *engine*'s metrics (see the module docstring).

    Register it in a registry (``REGISTRY.register(EngineCollector(MyEngine))``,
    or a ``CollectorRegistry`` of your own); every scrape calls :meth:`collect`.
    """

    def __init__(self, engine: type[Engine]) -> None:
        require()
        self.engine = engine

    def describe(self) -> Iterator[Any]:
        """The metric families, without samples (what a registry checks names with)."""
        return self._families(None, describing=True)

    def collect(self) -> Iterator[Any]:
        """The metric families with the current values."""
        return self._families(self.engine._current_runtime(), describing=False)

    def _families(self, runtime: Any, *, describing: bool) -> Iterator[Any]:
        from prometheus_client.core import (  # noqa: PLC0415 - an optional extra
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        from tempest.runtime import queue_counts  # noqa: PLC0415 - imports this module

        name = self.engine._options["name"]
        tasks = CounterMetricFamily(
            "tempest_tasks", "Final outcomes of tasks, and rejected messages.",
            labels=["engine", "task", "outcome"])
        retries = CounterMetricFamily(
            "tempest_retries", "Attempts that failed or timed out with another one scheduled.",
            labels=["engine", "task"])
        durations = HistogramMetricFamily(
            "tempest_task_duration_seconds", "How long each attempt of a task ran.",
            labels=["engine", "task"])
        running = GaugeMetricFamily("tempest_running", "Messages in hand now.",
                                    labels=["engine"])
        prefetched = GaugeMetricFamily("tempest_prefetched",
                                       "Messages held ahead of a free worker.",
                                       labels=["engine"])
        threads = GaugeMetricFamily("tempest_threads", "Worker threads (the option).",
                                    labels=["engine"])
        abandoned = GaugeMetricFamily("tempest_abandoned_threads",
                                      "Threads abandoned this run (stuck past a timeout).",
                                      labels=["engine"])
        depth = GaugeMetricFamily("tempest_queue_depth", "Messages in the queue, by state.",
                                  labels=["engine", "state"])
        if runtime is not None:
            counts = runtime.counters()
            for task, row in sorted(runtime.tallies.rows().items()):
                for cell, outcome in _FINAL:
                    tasks.add_metric([name, task, outcome], row[cell])
                retries.add_metric([name, task], row[RETRIED])
                ran = sum(row[cell] for cell in range(len(OUTCOMES)) if cell != REJECTED)
                if ran:
                    buckets, total = [], 0
                    for bound, cell in zip((*map(str, BOUNDS), "+Inf"),
                                           range(BUCKET, BUCKET + len(BOUNDS) + 1), strict=True):
                        total += row[cell]
                        buckets.append((bound, total))
                    durations.add_metric([name, task], buckets, row[SUM])
            running.add_metric([name], counts["running"])
            prefetched.add_metric([name], counts["prefetched"])
            threads.add_metric([name], counts["threads"])
            abandoned.add_metric([name], counts["abandoned"])
            yield from (tasks, retries, durations, running, prefetched, threads, abandoned)
        elif describing:
            yield from (tasks, retries, durations, running, prefetched, threads, abandoned)
        if not describing:
            found = queue_counts(self.engine._options["queue"])
            for key, state in _DEPTHS:
                if found.get(key) is not None:
                    depth.add_metric([name, state], found[key])
        yield depth


class MetricsServer:
    """Serves ``/metrics`` of *engine* on *host*:*port* from a daemon thread.

    What the ``metrics_port`` option starts with the engine and closes when it
    has finished: a fresh registry holding an :class:`EngineCollector` and
    prometheus_client's process collector (``process_*``: CPU, memory, open
    files, on Linux). *port* 0 takes any free port (see :attr:`port`).
    """

    def __init__(self, engine: type[Engine], host: str, port: int) -> None:
        require()
        from prometheus_client import CollectorRegistry, ProcessCollector  # noqa: PLC0415

        registry = CollectorRegistry()
        registry.register(EngineCollector(engine))
        ProcessCollector(registry=registry)
        server_class = _IPv6Server if ":" in host else _Server
        self._server = server_class((host, port), _handler(registry))
        self.host = host
        self.port: int = self._server.server_address[1]
        """The port served (the one chosen, for port 0)."""
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.5,),
                                        daemon=True,
                                        name=f"tempest-metrics:{engine._options['name']}")
        self._thread.start()

    @property
    def url(self) -> str:
        """Where the metrics are: ``http://host:port/metrics``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


class _IPv6Server(_Server):
    address_family = socket.AF_INET6


def _handler(registry: CollectorRegistry) -> type[http.server.BaseHTTPRequestHandler]:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest  # noqa: PLC0415

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.partition("?")[0] != "/metrics":
                self.send_error(404, "only /metrics is served here")
                return
            body = generate_latest(registry)
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_LATEST)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # scrapes are not the engine's log lines

    return Handler
