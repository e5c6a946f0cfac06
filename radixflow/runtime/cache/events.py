"""The radix cache's event log: the prefixes it inserted and evicted, in order, for a router that builds its view
of this server's cache from them (`radixflow router --tree-source events`; the server's `GET /cache_events`).

Bounded: a reader that falls more than `capacity` events behind is told it lost some (and starts over).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class CacheEvent:
    seq: int
    op: str  # insert (a new leaf: the whole path from the root), evict (a leaf dropped: its whole path), clear
    tokens: tuple[int, ...]


class CacheEventLog:
    def __init__(self, capacity: int = 4096):
        self._events: deque[CacheEvent] = deque(maxlen=capacity)
        self._next = 0

    def record(self, op: str, tokens) -> None:
        self._events.append(CacheEvent(self._next, op, tuple(tokens)))
        self._next += 1

    def since(self, seq: int) -> tuple[list[CacheEvent], int, bool]:
        """Events numbered `seq` and later, the number to ask from next time, and whether some were lost (the log
        dropped them, or `seq` is from before a restart: beyond the next number)."""
        oldest = self._events[0].seq if self._events else self._next
        lost = seq < oldest or seq > self._next
        return [e for e in self._events if e.seq >= seq or lost], self._next, lost
