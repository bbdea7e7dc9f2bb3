"""An engine whose before_initialize hook fails: an unexpected error (exit 1)."""

from __future__ import annotations

from typing import Any

from tempest import Engine


def _explode(engine: Any) -> None:
    raise RuntimeError("the hook failed")


class CliHookEngine(Engine):
    class configure:
        report_every = None
        before_initialize = _explode
