"""A bounded buffer for the hot path: append never blocks; when full, the oldest goes.

``append`` and ``drain`` are safe between one producer thread (training) and one
consumer thread (the Threadlet's flusher): both use ``collections.deque``'s
atomic ``append``/``popleft``.
"""

from __future__ import annotations

import collections
from typing import Generic, TypeVar

T = TypeVar("T")


class DropOldestBuffer(Generic[T]):
    """Holds at most ``capacity`` items; counts what it had to drop (``dropped``)."""

    __slots__ = ("_items", "capacity", "dropped")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._items: collections.deque[T] = collections.deque(maxlen=capacity)
        self.dropped = 0

    def append(self, item: T) -> None:
        if len(self._items) == self.capacity:
            self.dropped += 1
        self._items.append(item)

    def drain(self, limit: int | None = None) -> list[T]:
        """Remove and return up to ``limit`` items, oldest first."""
        out: list[T] = []
        items = self._items
        while items and (limit is None or len(out) < limit):
            try:
                out.append(items.popleft())
            except IndexError:
                break
        return out

    def push_front(self, items: list[T]) -> None:
        """Put back items that could not be sent (they stay oldest; drops count if full)."""
        for i, item in enumerate(reversed(items)):
            if len(self._items) == self.capacity:
                self.dropped += len(items) - i  # every item that did not fit
                return
            self._items.appendleft(item)

    def __len__(self) -> int:
        return len(self._items)
