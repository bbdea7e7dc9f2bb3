"""A backend whose driver is not installed says which extra to install."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("driver", "queue", "target", "extra"), [
    ("psycopg", "PostgresQueue", "postgresql://localhost/x", "postgres"),
    ("redis", "RedisQueue", "redis://localhost", "redis"),
])
def test_without_the_driver_the_error_names_the_extra(driver, queue, target, extra):
    """tempest.queues imports without the driver; the queue class names the extra."""
    code = textwrap.dedent(f"""
        import sys
        sys.modules[{driver!r}] = None  # as if the extra were not installed
        from tempest import ConfigurationError
        from tempest.queues import {queue}
        try:
            {queue}({target!r})
        except ConfigurationError as exc:
            print(exc)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, timeout=30, check=True).stdout
    assert f"pip install 'task-tempest[{extra}]'" in out
