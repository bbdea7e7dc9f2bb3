"""A caller in a process of its own, for tests/test_results.py.

``python results_caller.py KIND WHERE NAME ENGINE_NAME a b``: builds an engine
named ENGINE_NAME on the queue (KIND sqlite: WHERE is the file; redis: the URL;
postgres: the DSN, NAME the table), ``call``-s the task ``ResultsAdd`` by name
with the int arguments *a* and *b*, and prints the JSON result. It runs no
worker: another process (the test's engine) must take the message.
"""

from __future__ import annotations

import json
import sys

from tempest import Engine


def queue_for(kind: str, where: str, name: str) -> object:
    """The queue the test's engine uses."""
    if kind == "sqlite":
        from tempest.queues import SQLiteQueue

        return SQLiteQueue(where)
    if kind == "redis":
        from tempest.queues import RedisQueue

        return RedisQueue(where, name=name)
    from tempest.queues import PostgresQueue

    return PostgresQueue(where, table=name)


def main() -> None:
    kind, where, name, engine_name, a, b = sys.argv[1:7]
    engine = type(engine_name, (Engine,), {"configure": type("configure", (), {
        "queue": queue_for(kind, where, name), "log_dir": "/tmp", "report_every": None})})
    print(json.dumps(engine.call("ResultsAdd", int(a), int(b), timeout=30)), flush=True)


if __name__ == "__main__":
    main()
