"""Tests for the radix prefix cache: hand-written cases plus a model-based state machine."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from radixflow.runtime.cache.prefix_cache import CacheIntegrityError, NoPrefixCache
from radixflow.runtime.cache.radix_cache import RadixCache


class FreedLog:
    """A `free_kv` callback that records every call."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    def __call__(self, indices: list[int]) -> None:
        self.calls.append(list(indices))

    @property
    def all(self) -> list[int]:
        return [i for call in self.calls for i in call]


@pytest.fixture
def freed() -> FreedLog:
    return FreedLog()


@pytest.fixture
def cache(freed: FreedLog) -> RadixCache:
    return RadixCache(freed)


def test_match_on_empty_tree(cache: RadixCache) -> None:
    result = cache.match_prefix([1, 2, 3])
    assert result.kv_indices == []
    assert result.last_node is cache.root
    assert cache.total_size() == 0


def test_exact_and_partial_match(cache: RadixCache) -> None:
    inserted = cache.insert([1, 2, 3, 4], [10, 11, 12, 13])
    assert inserted.kv_indices == [10, 11, 12, 13] and inserted.last_node.key == [1, 2, 3, 4]
    assert cache.match_prefix([1, 2, 3, 4]).kv_indices == [10, 11, 12, 13]
    assert cache.match_prefix([1, 2, 3, 4, 5, 6]).kv_indices == [10, 11, 12, 13]
    assert cache.match_prefix([1, 2, 9]).kv_indices == [10, 11]
    assert cache.match_prefix([2, 1]).kv_indices == []
    assert cache.match_prefix([]).kv_indices == []
    assert cache.total_size() == 4
    cache.check_integrity(num_free_kv=0, pool_size=4)


def test_match_ending_mid_edge_splits_the_edge(cache: RadixCache) -> None:
    cache.insert([1, 2, 3, 4], [10, 11, 12, 13])
    result = cache.match_prefix([1, 2, 7])
    upper = result.last_node
    assert (upper.key, upper.value) == ([1, 2], [10, 11])
    assert upper.parent is cache.root and cache.root.children == {1: upper}
    lower = upper.children[3]
    assert (lower.key, lower.value) == ([3, 4], [12, 13])
    assert lower.parent is upper and lower.children == {}
    assert cache.total_size() == 4
    cache.check_integrity(num_free_kv=0, pool_size=4)


def test_split_keeps_held_handles_and_their_locks(cache: RadixCache) -> None:
    cache.insert([1, 2, 3, 4], [10, 11, 12, 13])
    handle = cache.match_prefix([1, 2, 3, 4]).last_node
    cache.lock(handle)
    cache.match_prefix([1, 2])  # splits the locked edge
    assert handle.key == [3, 4] and handle.parent.key == [1, 2]
    assert handle.parent.lock_ref == 1 and cache.protected_size() == 4
    cache.unlock(handle)
    assert cache.protected_size() == 0 and cache.evictable_size() == 4
    cache.check_integrity(num_free_kv=0, pool_size=4)


def test_insert_returns_what_the_tree_holds_and_keeps_its_own_indices(
    cache: RadixCache, freed: FreedLog
) -> None:
    assert cache.insert([1, 2, 3], [10, 11, 12]).kv_indices == [10, 11, 12]
    # The tree keeps its own indices for the cached prefix (the caller's 20-22 are duplicates) and takes 23, 24.
    held = cache.insert([1, 2, 3, 4, 5], [20, 21, 22, 23, 24])
    assert held.kv_indices == [10, 11, 12, 23, 24] and held.last_node.key == [4, 5]
    assert cache.insert([1, 2, 9], [30, 31, 32]).kv_indices == [10, 11, 32]
    held = cache.insert([1, 2], [40, 41])
    assert held.kv_indices == [10, 11] and held.last_node.key == [1, 2]  # ends at a split edge
    assert cache.insert([], []).last_node is cache.root
    assert cache.match_prefix([1, 2, 3, 4, 5]).kv_indices == [10, 11, 12, 23, 24]
    assert cache.match_prefix([1, 2, 9]).kv_indices == [10, 11, 32]
    assert cache.total_size() == 6
    assert freed.calls == []  # duplicates are the caller's to free, never insert's


def test_insert_length_mismatch_raises(cache: RadixCache) -> None:
    with pytest.raises(ValueError, match="2 tokens but 1 KV"):
        cache.insert([1, 2], [10])


def test_lock_prevents_eviction(cache: RadixCache, freed: FreedLog) -> None:
    cache.insert([1, 2], [10, 11])
    cache.insert([5, 6, 7], [20, 21, 22])
    cache.lock(cache.match_prefix([1, 2]).last_node)
    assert (cache.protected_size(), cache.evictable_size()) == (2, 3)
    assert cache.evict(100) == 3
    assert freed.all == [20, 21, 22]
    assert cache.match_prefix([1, 2]).kv_indices == [10, 11]
    assert cache.evict(100) == 0
    cache.check_integrity(num_free_kv=3, pool_size=5)


def test_unlocked_child_of_locked_node_is_evictable(cache: RadixCache, freed: FreedLog) -> None:
    cache.insert([1, 2], [10, 11])
    cache.lock(cache.match_prefix([1, 2]).last_node)
    cache.insert([1, 2, 3], [10, 11, 12])
    assert cache.evict(1) == 1 and freed.all == [12]


def test_unlock_below_zero_raises(cache: RadixCache) -> None:
    cache.insert([1, 2], [10, 11])
    node = cache.match_prefix([1, 2]).last_node
    cache.lock(node)
    cache.unlock(node)
    with pytest.raises(RuntimeError, match="below 0"):
        cache.unlock(node)
    assert node.lock_ref == 0 and cache.evictable_size() == 2


def test_lock_on_evicted_node_raises(cache: RadixCache) -> None:
    cache.insert([1, 2], [10, 11])
    node = cache.match_prefix([1, 2]).last_node
    cache.evict(2)
    with pytest.raises(ValueError, match="not in this cache"):
        cache.lock(node)


def test_eviction_is_least_recently_used_first(cache: RadixCache, freed: FreedLog) -> None:
    cache.insert([1], [10])
    cache.insert([2], [20])
    cache.insert([3], [30])
    cache.match_prefix([1])  # refresh: [2] is now the oldest, then [3]
    assert cache.evict(1) == 1 and freed.calls == [[20]]
    assert cache.evict(1) == 1 and freed.calls[-1] == [30]
    assert cache.evict(1) == 1 and freed.calls[-1] == [10]


def test_parent_becomes_evictable_after_its_children(cache: RadixCache, freed: FreedLog) -> None:
    cache.insert([1, 2, 3], [10, 11, 12])
    cache.insert([1, 2, 4], [10, 11, 14])
    cache.insert([9], [90])
    cache.match_prefix([9])  # newest, so the whole [1, 2, *] subtree goes first
    assert cache.evict(4) == 4
    assert sorted(freed.all) == [10, 11, 12, 14]
    assert cache.root.children.keys() == {9}
    assert cache.total_size() == 1
    cache.check_integrity(num_free_kv=4, pool_size=5)


def test_evict_returns_freed_count_and_frees_exactly_those(cache: RadixCache, freed: FreedLog) -> None:
    cache.insert([1, 2, 3], [10, 11, 12])
    cache.insert([4], [40])
    cache.match_prefix([4])
    assert cache.evict(1) == 3  # whole leaves only
    assert freed.calls == [[10, 11, 12]]
    assert cache.evict(0) == 0 and len(freed.calls) == 1
    assert cache.evict(10) == 1 and freed.calls[-1] == [40]
    assert cache.total_size() == 0


def test_reset_drops_everything_without_freeing(cache: RadixCache, freed: FreedLog) -> None:
    cache.insert([1, 2], [10, 11])
    cache.lock(cache.match_prefix([1]).last_node)
    cache.reset()
    assert cache.total_size() == 0 and cache.match_prefix([1, 2]).kv_indices == []
    assert freed.calls == []
    cache.check_integrity(num_free_kv=4, pool_size=4)


def test_integrity_catches_duplicate_index(cache: RadixCache) -> None:
    cache.insert([1, 2], [10, 11])
    cache.insert([3, 4], [12, 13])
    cache.root.children[3].value[1] = 10
    with pytest.raises(CacheIntegrityError, match=r"more than once.*\[10\]"):
        cache.check_integrity(num_free_kv=0, pool_size=4)


def test_integrity_catches_wrong_free_count(cache: RadixCache) -> None:
    cache.insert([1, 2], [10, 11])
    cache.check_integrity(num_free_kv=6, pool_size=8)
    with pytest.raises(CacheIntegrityError, match="!= pool size 8"):
        cache.check_integrity(num_free_kv=5, pool_size=8)


def test_integrity_catches_structural_corruption(cache: RadixCache) -> None:
    cache.insert([1, 2, 3], [10, 11, 12])
    cache.match_prefix([1])  # split into [1] -> [2, 3]
    upper = cache.root.children[1]
    lower = upper.children[2]
    lower.parent = cache.root
    with pytest.raises(CacheIntegrityError, match="inconsistently"):
        cache.check_integrity(num_free_kv=0, pool_size=3)
    lower.parent = upper
    lower.lock_ref = 1  # more references than its parent, and counters not updated
    with pytest.raises(CacheIntegrityError, match="more references than its parent"):
        cache.check_integrity(num_free_kv=0, pool_size=3)
    upper.lock_ref = 1
    with pytest.raises(CacheIntegrityError, match="recount"):
        cache.check_integrity(num_free_kv=0, pool_size=3)


def test_pretty_lists_nodes(cache: RadixCache) -> None:
    cache.insert([1, 2], [10, 11])
    assert "[1, 2] -> [10, 11]" in cache.pretty()


# ---- model-based test ----

POOL_SIZE = 64
token_seqs = st.lists(st.integers(0, 3), min_size=1, max_size=12)


class KVPool:
    """A free list that refuses double frees, as the real pool should."""

    def __init__(self, size: int) -> None:
        self.free = list(range(size))

    def allocate(self, n: int) -> list[int]:
        taken, self.free = self.free[:n], self.free[n:]
        return taken

    def release(self, indices: list[int]) -> None:
        assert not set(indices) & set(self.free), "double free"
        self.free.extend(indices)


class RadixCacheMachine(RuleBasedStateMachine):
    """Drives the cache the way a scheduler does and compares it with a naive model.

    The model maps every cached prefix (a tuple of tokens) to the KV index of its last token.
    """

    def __init__(self) -> None:
        super().__init__()
        self.pool = KVPool(POOL_SIZE)
        self.evicted: list[int] = []
        self.cache = RadixCache(self._on_free)
        self.model: dict[tuple[int, ...], int] = {}
        self.locks: list = []  # (node, matched tokens) pairs locked by the `lock` rule
        self.running: list = []  # started requests: (tokens, match, privately held indices)

    def _on_free(self, indices: list[int]) -> None:
        self.evicted.extend(indices)
        self.pool.release(indices)

    def _model_match(self, tokens: list[int]) -> list[int]:
        kv: list[int] = []
        while len(kv) < len(tokens) and tuple(tokens[: len(kv) + 1]) in self.model:
            kv.append(self.model[tuple(tokens[: len(kv) + 1])])
        return kv

    def _match(self, tokens: list[int]):
        result = self.cache.match_prefix(tokens)
        assert result.kv_indices == self._model_match(tokens)
        return result

    def _evict(self, num_tokens: int) -> int:
        evictable_before = self.cache.evictable_size()
        self.evicted = []
        freed = self.cache.evict(num_tokens)
        assert freed == len(self.evicted) >= min(num_tokens, evictable_before)
        if freed < num_tokens:
            assert self.cache.evictable_size() == 0
        gone = set(self.evicted)
        evicted_prefixes = {p for p, i in self.model.items() if i in gone}
        assert len(evicted_prefixes) == freed, "evicted an index the model never cached"
        assert not evicted_prefixes & self._protected_prefixes(), "evicted a locked prefix"
        for prefix in evicted_prefixes:
            del self.model[prefix]
        assert all(p[:-1] in self.model for p in self.model if len(p) > 1), "left a hole in a path"
        return freed

    def _protected_prefixes(self) -> set[tuple[int, ...]]:
        held = [tokens for _, tokens in self.locks]
        held += [tokens[: len(match.kv_indices)] for tokens, match, _ in self.running]
        return {tuple(t[:i]) for t in held for i in range(1, len(t) + 1)}

    def _start(self, tokens: list[int]):
        """Match, lock and allocate the rest, evicting if the pool is short; None if it can't."""
        match = self._match(tokens)
        self.cache.lock(match.last_node)
        need = len(tokens) - len(match.kv_indices)
        if need > len(self.pool.free):
            self._evict(need - len(self.pool.free))
        if need > len(self.pool.free):
            self.cache.unlock(match.last_node)
            return None
        return tokens, match, self.pool.allocate(need)

    def _finish(self, tokens: list[int], match, private: list[int]) -> None:
        matched = len(match.kv_indices)
        kv = match.kv_indices + private
        before = self._model_match(tokens)
        held = self.cache.insert(tokens, kv).kv_indices
        assert held == before + kv[len(before):]  # its own indices where it had the token, ours for the rest
        self.pool.release(kv[matched:len(before)])  # duplicates of what another request cached
        for i in range(len(before), len(tokens)):
            self.model[tuple(tokens[: i + 1])] = kv[i]
        self.cache.unlock(match.last_node)

    @rule(tokens=token_seqs)
    def insert(self, tokens: list[int]) -> None:
        request = self._start(tokens)
        if request is not None:
            self._finish(*request)

    @rule(tokens=token_seqs)
    def start_request(self, tokens: list[int]) -> None:
        request = self._start(tokens)
        if request is not None:
            self.running.append(request)

    @precondition(lambda self: self.running)
    @rule(pick=st.integers(0, 100))
    def finish_request(self, pick: int) -> None:
        self._finish(*self.running.pop(pick % len(self.running)))

    @rule(tokens=token_seqs)
    def match(self, tokens: list[int]) -> None:
        self._match(tokens)

    @rule(tokens=token_seqs)
    def lock(self, tokens: list[int]) -> None:
        result = self._match(tokens)
        self.cache.lock(result.last_node)
        self.locks.append((result.last_node, tokens[: len(result.kv_indices)]))

    @precondition(lambda self: self.locks)
    @rule(pick=st.integers(0, 100))
    def unlock(self, pick: int) -> None:
        node, _ = self.locks.pop(pick % len(self.locks))
        self.cache.unlock(node)

    @rule(num_tokens=st.integers(0, 20))
    def evict(self, num_tokens: int) -> None:
        self._evict(num_tokens)

    @invariant()
    def accounts_for_every_kv_index(self) -> None:
        private = sum(len(p) for _, _, p in self.running)
        self.cache.check_integrity(len(self.pool.free) + private, POOL_SIZE)
        protected = len(self._protected_prefixes())
        assert self.cache.total_size() == len(self.model)
        assert self.cache.protected_size() == protected
        assert self.cache.evictable_size() == len(self.model) - protected


RadixCacheMachine.TestCase.settings = settings(max_examples=200, deadline=None, stateful_step_count=50)
test_radix_cache_against_model = RadixCacheMachine.TestCase


def test_no_prefix_cache_holds_nothing_and_takes_no_index() -> None:
    """--disable-radix-cache: the same contract with nothing stored, so the caller keeps every index."""
    cache = NoPrefixCache()
    held = cache.insert([1, 2, 3], [10, 11, 12])
    assert held.kv_indices == [] and cache.match_prefix([1, 2, 3]).kv_indices == []
    cache.lock(held.last_node)
    cache.unlock(held.last_node)
    assert (cache.total_size(), cache.evictable_size(), cache.evict(10)) == (0, 0, 0)
    cache.check_integrity(num_free_kv=8, pool_size=8)
    with pytest.raises(CacheIntegrityError, match="free 7 != pool size 8"):
        cache.check_integrity(num_free_kv=7, pool_size=8)
