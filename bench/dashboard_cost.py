"""What an open dashboard costs an engine: no-op throughput with and without one.

Run by hand, from the repository's root, in the project's own environment (it
needs the ``web`` extra and Playwright, which bench/.venv does not have; PostgreSQL
on 127.0.0.1 for the second queue, as the tests use it)::

    PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 .venv/bin/python -m bench.dashboard_cost [--rounds N]

For each queue it drains a batch of no-op tasks with ``run(burst=True)``,
8 threads, alternately with no dashboard and with the overview open in
headless chromium (refreshing every 2 s, served by uvicorn in the engine's own
process, the harder case: it shares the GIL with the workers), several rounds
of each in the order ABBA, and prints the median throughputs and the drop: the
median of the per-pair ratios (a pair is seconds apart, so the machine's drift
cancels), with their min-max. The results go to
``bench/results/dashboard-<date>.json`` with the machine and versions.
The browser runs on the same machine as the engine here (on a real one it
runs on the user's), so its own work counts against the engine too.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import uvicorn
from playwright.sync_api import sync_playwright

from bench import report
from bench.harness import RESULTS
from tempest import Engine, Task
from tempest.queues import MemoryQueue, PostgresQueue
from tempest.web import dashboard

CHROMIUM = "/usr/bin/chromium"
DSN = os.environ.get("TEMPEST_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
ROUNDS = 6
"""Pairs of drains (one without the page, one with it) per queue, by default."""


class Noop(Task):
    def process(self) -> None:
        pass


def engine_on(queue: Any) -> type[Engine]:
    block = type("configure", (), {"threads": 8, "queue": queue, "log_level": "WARNING",
                                   "report_every": None, "log_dir": tempfile.mkdtemp()})
    return type(f"Cost{uuid.uuid4().hex[:6]}", (Engine,), {"configure": block})


def drain(engine: type[Engine], fill: Callable[[int], None], count: int) -> float:
    """Tasks a second to drain *count* no-ops."""
    fill(count)
    began = time.perf_counter()
    engine.run(burst=True)
    return count / (time.perf_counter() - began)


def measure(label: str, engine: type[Engine], fill: Callable[[int], None], count: int, *,
            page: Any, base: str, rounds: int) -> dict[str, Any]:
    """Drains without and with the overview open, pair by pair; the summary."""
    drain(engine, fill, count // 10)  # warm up
    closed: list[float] = []
    opened: list[float] = []
    for n in range(rounds):
        # In the order ABBA, so that a drift of the machine (or of the table) over the
        # run weighs on both sides alike.
        for open_page in ((False, True) if n % 2 == 0 else (True, False)):
            if open_page:
                page.goto(base + "/")
                page.wait_for_function("() => document.getElementById('live-status')"
                                       ".textContent.startsWith('live ·')")
                opened.append(drain(engine, fill, count))
            else:
                page.goto("about:blank")
                closed.append(drain(engine, fill, count))
    without, with_page = statistics.median(closed), statistics.median(opened)
    ratios = [o / c for o, c in zip(opened, closed, strict=True)]
    ratio = statistics.median(ratios)
    print(f"{label:<16} without: {without:8.0f}/s   with the overview open: "
          f"{with_page:8.0f}/s   open/closed per pair {ratio:.3f} "
          f"({min(ratios):.3f}-{max(ratios):.3f}), drop {100 * (1 - ratio):5.1f}%",
          flush=True)
    return {"queue": label, "tasks": count, "without": closed, "with_overview": opened,
            "median_without": without, "median_with": with_page, "pair_ratios": ratios,
            "ratio_median": ratio}


def serve(engine: type[Engine]) -> tuple[uvicorn.Server, threading.Thread, str]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    server = uvicorn.Server(uvicorn.Config(dashboard(engine), log_level="warning",
                                           access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    return server, thread, f"http://127.0.0.1:{listener.getsockname()[1]}"


def main(argv: list[str] | None = None) -> None:
    """Measure on a MemoryQueue and a PostgresQueue; write the results."""
    parser = argparse.ArgumentParser(prog="python -m bench.dashboard_cost")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    args = parser.parse_args(argv)
    meta = report.machine(command="python -m bench.dashboard_cost "
                          + " ".join(argv if argv is not None else []))
    results = []
    memory = engine_on(MemoryQueue())

    def fill_memory(count: int) -> None:
        for _ in range(count):
            memory.submit(Noop)

    table = f"dash_cost_{uuid.uuid4().hex[:6]}"
    queue = PostgresQueue(DSN, table=table)
    postgres = engine_on(queue)
    len(queue)

    def fill_postgres(count: int) -> None:
        with psycopg.connect(DSN, autocommit=True) as conn:
            conn.execute(f"VACUUM ANALYZE {table}")  # the last round's dead rows
            conn.execute(f"INSERT INTO {table} (queue, body) SELECT %s, json_build_array("
                         f"md5(random()::text), 'Noop')::text FROM generate_series(1, %s)",
                         (queue.name, count))

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page()
        try:
            for label, engine, fill, count in (("MemoryQueue", memory, fill_memory, 600_000),
                                               ("PostgresQueue", postgres, fill_postgres,
                                                40_000)):
                server, thread, base = serve(engine)
                try:
                    results.append(measure(label, engine, fill, count, page=page,
                                           base=base, rounds=args.rounds))
                finally:
                    page.goto("about:blank")
                    server.should_exit = True
                    thread.join(10)
        finally:
            browser.close()
            queue.close()
            with psycopg.connect(DSN, autocommit=True) as conn:
                conn.execute(f"DROP TABLE IF EXISTS {table}, {table}_rejected, "
                             f"{table}_scheduled, {table}_fired, {table}_failed, "
                             f"{table}_results, {table}_engines, {table}_outcomes")
    out = RESULTS / f"dashboard-{time.strftime('%Y-%m-%d')}.json"
    out.write_text(json.dumps({"meta": meta, "rounds": args.rounds, "results": results},
                              indent=1))
    print(f"wrote {out.relative_to(RESULTS.parent.parent)}")


if __name__ == "__main__":
    main(sys.argv[1:])
