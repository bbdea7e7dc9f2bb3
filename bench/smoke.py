"""A smoke check of the benchmark: ``python -m bench.smoke`` (or ``bash bench/run --smoke``).

Runs every tempest contender -- no peer, no matplotlib, no py-spy -- through
each scenario with tiny sizes, in this process, in a few seconds: what the
project's own virtual environment can run, so a test can call :func:`main`
and expect 0. A backend whose queue class is not importable, or whose server
is not reachable, is skipped with a printed note.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common, runner
from bench.contenders.inprocess import TempestContender

SCENARIOS: list[dict[str, Any]] = [
    {"scenario": "drain", "body": "noop", "n": 300, "timeout": 30},
    {"scenario": "drain", "body": "sleep", "n": 32, "timeout": 30},
    {"scenario": "drain", "body": "sleep1", "n": 64, "timeout": 30},
    {"scenario": "latency", "warm": 5, "gap": 0.001, "idle": 0.2, "idle_samples": 1,
     "probe_timeout": 10, "handshake": False},
]
SMOKE_TABLE = "bench_smoke_messages"
"""Not the suite's table: the smoke check may run (in the test suite) while the suite does."""

MEMORY = {"scenario": "memory", "n": 2000, "backlog": 100, "sample_every": 0.05, "timeout": 30}


def contenders() -> list[TempestContender]:
    return [TempestContender("memory", "WARNING"), TempestContender("memory", "INFO"),
            TempestContender("sqlite"), TempestContender("redis"),
            TempestContender("postgres")]


def check(out: Any = sys.stdout) -> list[dict[str, Any]]:
    """Run every available tempest contender through every scenario; the results."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-smoke-"))
    results = []
    try:
        for number, contender in enumerate(contenders()):
            reason = contender.unavailable()
            if reason:
                print(f"smoke: skipped {contender.key}: {reason}", file=out)
                continue
            plan = SCENARIOS + ([MEMORY] if contender.backend == "memory" else [])
            for step, fields in enumerate(plan):
                ns = f"bench_smoke_{int(time.time())}_{number}_{step}"
                spec = {"contender": contender.key, "threads": common.THREADS, "ns": ns,
                        "tmp": str(tmp / ns), "postgres_table": SMOKE_TABLE, **fields}
                began = time.monotonic()
                result = runner.run(spec)
                result["seconds"] = time.monotonic() - began
                results.append(result)
                what = f"{contender.key} {fields['scenario']} {fields.get('body', '')}".strip()
                if result["ok"]:
                    print(f"smoke: ok   {what} ({result['seconds']:.2f} s)", file=out)
                else:
                    print(f"smoke: FAIL {what}\n{result.get('error')}", file=out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if any(r["contender"] == "tempest-postgres" for r in results):
            drop_postgres_tables(SMOKE_TABLE)
    return results


def drop_postgres_tables(table: str = common.POSTGRES_TABLE) -> None:
    """The bench's tables are its own: each run's rows are deleted, the tables at the end."""
    import psycopg

    with psycopg.connect(common.POSTGRES_DSN, autocommit=True, connect_timeout=5) as conn:
        for name in (table, f"{table}_rejected"):
            conn.execute(f'DROP TABLE IF EXISTS "{name}"')


def main() -> int:
    """0 if every contender that could run did, 1 otherwise."""
    results = check()
    return 0 if results and all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
