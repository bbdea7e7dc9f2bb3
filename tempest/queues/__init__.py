"""Built-in queues.

A queue is any object with ``enqueue(message)`` and ``dequeue()``; see
:mod:`tempest.queues.protocol` for the optional methods the engine uses when
a queue has them, and the delivery guarantee each one buys.
"""

import importlib
from typing import TYPE_CHECKING, Any

from tempest.queues.memory import MemoryQueue
from tempest.queues.sqlite import SQLiteQueue

if TYPE_CHECKING:
    from tempest.queues.postgres import PostgresQueue
    from tempest.queues.redis import RedisQueue

__all__ = ["MemoryQueue", "PostgresQueue", "RedisQueue", "SQLiteQueue"]

# Backends that need a client library load on first use, so that
# ``import tempest.queues`` works without their extras installed.
_LAZY = {
    "PostgresQueue": "tempest.queues.postgres",
    "RedisQueue": "tempest.queues.redis",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
