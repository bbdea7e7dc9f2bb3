"""Fifo: the unbounded many-producer, many-consumer FIFO under MemoryQueue.

Why not :class:`queue.SimpleQueue`: on CPython 3.11 its C ``get(timeout=...)``
can block forever. A getter woken by a ``put`` may find the item already taken
by another getter (one that held the GIL first); it then loops, and if its
deadline passed meanwhile the remaining time it computes is negative, which the
lock it waits on reads as "no timeout". With no further ``put`` it never
returns -- seen as a consumer hung in ``dequeue(timeout=0.05)`` with four
consumers sharing a queue. Later CPythons rewrote that loop; this class keeps
the same properties (``put`` never blocks and takes no lock; a waiting ``get``
sleeps on a lock of its own, without polling, and is woken by the first
``put``) on every version, with every wait bounded.

How no wake-up is lost (all steps are single operations on a deque, atomic
under the GIL; free-threaded builds keep deque operations atomic too):

* A getter registers its lock in ``_waiters`` *before* its last look at
  ``_items``: a ``put`` appends before it looks at ``_waiters``. So either the
  getter's look sees the item, or the ``put`` sees the getter and wakes it.
* A ``put`` wakes one waiter, first come first woken, and removes it from
  ``_waiters``: each registration is woken at most once, and always while its
  lock is held, so a release never meets a free lock.
* A wake may be spent on a getter that leaves without the item it was woken
  for (it timed out at that moment, or took another item). So every getter,
  leaving, wakes the next waiter if items are left: an item never sits in the
  FIFO while a registered getter sleeps with no wake on its way.
"""

from __future__ import annotations

import _thread
import collections
import queue
import time
from typing import Any

__all__ = ["Fifo"]


class Fifo:
    """An unbounded FIFO: ``put`` never blocks, ``get`` waits at most *timeout*."""

    __slots__ = ("_items", "_waiters")

    def __init__(self) -> None:
        self._items: collections.deque[Any] = collections.deque()
        self._waiters: collections.deque[Any] = collections.deque()  # held locks

    def put(self, item: Any) -> None:
        """Append *item*, waking the longest-waiting getter if any."""
        self._items.append(item)
        if self._waiters:
            self._wake()

    def _wake(self) -> None:
        """Wake the longest-waiting getter, if one is still registered."""
        try:
            waiter = self._waiters.popleft()
        except IndexError:
            return  # it left meanwhile
        waiter.release()

    def get_nowait(self) -> Any:
        """The first item; :class:`queue.Empty` if there is none."""
        try:
            return self._items.popleft()
        except IndexError:
            raise queue.Empty from None

    def get(self, timeout: float) -> Any:
        """The first item, waiting up to *timeout* seconds; :class:`queue.Empty` if none."""
        items = self._items
        try:
            return items.popleft()
        except IndexError:
            if timeout <= 0:
                raise queue.Empty from None
        deadline = time.monotonic() + timeout
        waiter = _thread.allocate_lock()
        waiter.acquire()
        try:
            while True:
                self._waiters.append(waiter)
                try:
                    return items.popleft()  # the look after registering
                except IndexError:
                    pass
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not waiter.acquire(True, remaining):
                    try:
                        return items.popleft()  # a put at the last moment
                    except IndexError:
                        raise queue.Empty from None
                # Woken (and so out of _waiters, the lock held again): the item
                # may be gone to a getter that looked first; then wait on.
        finally:
            self._leave(waiter)

    def _leave(self, waiter: Any) -> None:
        """Unregister *waiter* and pass on a wake it may have taken from another getter."""
        try:
            self._waiters.remove(waiter)
        except ValueError:
            pass  # woken, or woken while leaving
        if self._items and self._waiters:
            self._wake()

    def snapshot(self) -> list[Any]:
        """The items, first first, left in place (one copy of the deque, atomic under
        the GIL)."""
        return list(self._items.copy())

    def qsize(self) -> int:
        """Items in the FIFO."""
        return len(self._items)
