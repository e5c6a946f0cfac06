"""The prefix cache's interface, and the cache that caches nothing.

The cache manager talks to a prefix cache only through `PrefixCache`. `RadixCache` (radix_cache.py) is
RadixAttention's tree; `NoPrefixCache` is the same contract with nothing stored (`--disable-radix-cache`), so the
manager has no "cache disabled" branches.

Ownership rule, the same for every implementation: the cache owns exactly the KV indices it returns in a
`MatchResult` (from `match_prefix` or `insert`) and frees them only when it evicts them; every index a caller
passed to `insert` that is not in the returned match at the same position stays the caller's.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any


class CacheIntegrityError(Exception):
    """The cache's structure or accounting disagrees with itself or with the KV pool."""


@dataclass
class MatchResult:
    """The longest cached prefix of a token sequence."""

    kv_indices: list[int]  # KV indices of the matched tokens, in order (owned by the cache)
    last_node: Any  # the cache's handle for the end of the match; `lock` / `unlock` take it
    # Hierarchical cache: how many of the matched tokens this match brought back from the host tier (L2) and from
    # storage (L3); the rest were in the device pool already.
    from_host: int = 0
    from_storage: int = 0

    def __len__(self) -> int:
        return len(self.kv_indices)


class PrefixCache(ABC):
    """Token-id prefixes -> KV indices, with reference-count locking and eviction of what no one holds."""

    @abstractmethod
    def match_prefix(self, tokens: Sequence[int]) -> MatchResult:
        """The longest cached prefix of `tokens`. The indices are safe to use only while the node is locked."""

    def match_and_load(self, tokens: Sequence[int], prefetched: Future | None = None) -> MatchResult:
        """As `match_prefix`, for a request being admitted: a cache with slower tiers also brings what they hold
        of `tokens` back into the device pool (evicting other unlocked entries for room), using what `prefetch`
        read for them if `prefetched` is its finished result."""
        return self.match_prefix(tokens)

    def prefetch(self, tokens: Sequence[int]) -> Future | None:
        """Start reading what a slow tier (storage) holds of `tokens` beyond what the faster tiers hold, on another
        thread, while the request waits; None if there is nothing to read."""
        return None

    def continuation(self, node, tokens: Sequence[int], max_tokens: int) -> list[int]:
        """Up to `max_tokens` tokens the cache holds right after the path that runs from `node` (a match's
        `last_node`) on through `tokens`, following the most recently used branch; [] if the cache does not hold
        that path or nothing after it. Read-only: no entry is split, stamped or locked. A speculative draft."""
        return []

    @abstractmethod
    def insert(self, tokens: Sequence[int], kv_indices: Sequence[int]) -> MatchResult:
        """Offer `tokens` with their KV indices; return the cache's entry for the longest prefix of `tokens` it
        holds afterwards. Where it already held a token it keeps its own index (the caller's is a duplicate, still
        the caller's); where it stores a new token it takes the caller's index."""

    @abstractmethod
    def lock(self, node) -> None:
        """Protect the path ending at `node` from eviction (one more reference)."""

    @abstractmethod
    def unlock(self, node) -> None:
        """Release one reference taken by `lock` on the same node."""

    @abstractmethod
    def evict(self, num_tokens: int) -> int:
        """Free at least `num_tokens` unlocked tokens if possible (least recently used first); return how many."""

    @abstractmethod
    def evictable_size(self) -> int:
        """Cached tokens no one holds (reclaimable by `evict`)."""

    @abstractmethod
    def protected_size(self) -> int:
        """Cached tokens locked by at least one user."""

    def total_size(self) -> int:
        return self.evictable_size() + self.protected_size()

    def flush(self) -> None:
        """Drop every unlocked entry, in every tier (no request may hold KV)."""
        self.evict(self.total_size())

    def pin_session(self, session_id: str, node) -> None:
        """Retain the prefix ending at `node` for session `session_id` (replacing its earlier one; None: release
        it). A cache that keeps nothing keeps no sessions either."""
        return None

    def session_sizes(self) -> dict[str, int]:
        return {}

    def tier_stats(self) -> dict:
        """Sizes and traffic of the slower tiers (hierarchical cache), for metrics."""
        return {}

    @abstractmethod
    def check_integrity(self, num_free_kv: int, pool_size: int) -> None:
        """Raise `CacheIntegrityError` unless free (including KV held outside the cache) + cached == pool size."""


class NoPrefixCache(PrefixCache):
    """Caches nothing: every match is empty and `insert` takes no index (`--disable-radix-cache`)."""

    def match_prefix(self, tokens: Sequence[int]) -> MatchResult:
        return MatchResult([], None)

    def insert(self, tokens: Sequence[int], kv_indices: Sequence[int]) -> MatchResult:
        return MatchResult([], None)

    def lock(self, node) -> None:
        pass

    def unlock(self, node) -> None:
        pass

    def evict(self, num_tokens: int) -> int:
        return 0

    def evictable_size(self) -> int:
        return 0

    def protected_size(self) -> int:
        return 0

    def check_integrity(self, num_free_kv: int, pool_size: int) -> None:
        if num_free_kv != pool_size:
            raise CacheIntegrityError(f"KV leak or double count: free {num_free_kv} != pool size {pool_size}")
