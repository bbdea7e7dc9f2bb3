"""An engine on a user's queue with only enqueue and dequeue (tests/test_cli_failed.py)."""

from __future__ import annotations

from typing import Any

from tempest import Engine


class PlainQueue:
    def __init__(self) -> None:
        self.items: list[Any] = []

    def enqueue(self, message: Any) -> None:
        self.items.append(message)

    def dequeue(self) -> Any:
        return self.items.pop(0) if self.items else None


class PlainApp(Engine):
    class configure:
        queue = PlainQueue()
        report_every = None
