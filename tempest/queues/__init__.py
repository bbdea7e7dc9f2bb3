"""Built-in queues.

A queue is any object with ``enqueue(message)`` and ``dequeue()``; see
:mod:`tempest.queues.protocol` for the optional methods the engine uses when
a queue has them, and the delivery guarantee each one buys.
"""

from tempest.queues.memory import MemoryQueue

__all__ = ["MemoryQueue"]
