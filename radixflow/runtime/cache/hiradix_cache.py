"""The hierarchical radix cache: RadixAttention across the memory hierarchy (device pool -> host pool -> storage).

Each node's KV lives in the device pool (L1, `value`), in the host pool (L2, `host_value`), or in both. Eviction
from L1 demotes a node to L2 (copying it there first unless it already has a copy) instead of dropping it; L2
evicts host-only leaves, least recently used first, when it needs room. Storage (L3, storage.py) sits beside the
tree, not in it: pages of KV keyed by a hash chain of their tokens, written as prefixes enter the tree and read
when a request's match runs out in L1 and L2; it survives restarts and can be shared between servers.

Invariants (`check_integrity`):
- every node has its KV in L1 or L2 (or both);
- the L1 nodes form a subtree at the root: an L1 node's parent is the root or an L1 node. Eviction takes only L1
  nodes without L1 children, and a match loads a run of L2 nodes just below the L1 frontier, so it holds;
- only L1 nodes are locked (a match hands out L1 indices only);
- device: free + evictable + protected == pool size (as RadixCache); host: free + held by nodes == pool size.

Write policies (SGLang's names): `write_through` copies each new node to L2 as it is inserted, so demotion costs
nothing later; `write_back` copies a node when it is demoted; `write_through_selective` copies a node once it has
been matched twice, and drops cold nodes on demotion instead of copying them.

On this CPU both pools are host memory: the mechanism is the one a GPU uses (where L2 is pinned host memory), and
the copies between the pools cost real time. A load is synchronous here: the request that needs the KV waits for
it, and on two cores a copy thread would only take a core from the forward.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from radixflow.runtime.cache.events import CacheEventLog
from radixflow.runtime.cache.kv_pool import KVPool
from radixflow.runtime.cache.prefix_cache import CacheIntegrityError, MatchResult
from radixflow.runtime.cache.radix_cache import RadixCache, TreeNode, _check_edge, _shared_prefix_len
from radixflow.runtime.cache.storage import KVPageStore

WRITE_POLICIES = ("write_through", "write_through_selective", "write_back")
SELECTIVE_HITS = 2  # write_through_selective: matches after which a node is worth a host copy


@dataclass
class TierTraffic:
    """Tokens, bytes and seconds moved into one tier (writes) or out of it into L1 (loads)."""

    tokens: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def add(self, tokens: int, nbytes: int, seconds: float) -> None:
        self.tokens += tokens
        self.bytes += nbytes
        self.seconds += seconds


class HiRadixCache(RadixCache):
    def __init__(self, device: KVPool, host: KVPool, write_policy: str = "write_through",
                 storage: KVPageStore | None = None, events: CacheEventLog | None = None):
        if write_policy not in WRITE_POLICIES:
            raise ValueError(f"hicache_write_policy: {write_policy!r} is not one of {', '.join(WRITE_POLICIES)}")
        self.device, self.host, self.write_policy, self.storage = device, host, write_policy, storage
        self.host_writes, self.host_loads = TierTraffic(), TierTraffic()
        self.host_drops = 0  # host-only tokens dropped from the tree for room
        self._token_bytes = 2 * len(device.k) * device.k[0][0].numel() * device.k[0].element_size()
        self._loading: set[int] = set()  # ids of host nodes a load is bringing up: not to be evicted meanwhile
        super().__init__(device.free, events)

    # ---- lookup and insertion ----

    def _walk(self, tokens: Sequence[int], now: int) -> tuple[TreeNode, int, list[int]]:
        """The L1 part of the path (what `match_prefix` hands out): stops at the first node not in L1."""
        path, _ = self._path(tokens, now, l1_only=True)
        return (path[-1] if path else self.root), sum(len(n.key) for n in path), _values(path)

    def _path(self, tokens: Sequence[int], now: int, l1_only: bool) -> tuple[list[TreeNode], int]:
        """Nodes along `tokens` as far as the tree holds them (in L1, or in any tier), splitting the last edge where
        the path ends inside it; returns them and the number of tokens they cover."""
        node, matched, path = self.root, 0, []
        while matched < len(tokens) and (child := node.children.get(tokens[matched])) is not None:
            if l1_only and child.value is None:
                break
            shared = _shared_prefix_len(child.key, tokens, matched)
            if shared < len(child.key):
                child = self._split(child, shared)
            child.last_access = now
            path.append(child)
            node, matched = child, matched + shared
        return path, matched

    def prefetch(self, tokens: Sequence[int]) -> Future | None:
        """Read, on the storage's reader thread, the whole pages of `tokens` past what L1 and L2 hold now."""
        if self.storage is None:
            return None
        held = self._held_len(tokens)
        if len(tokens) // self.storage.page_size * self.storage.page_size <= held:
            return None
        return self.storage.prefetch(tokens, held)

    def _held_len(self, tokens: Sequence[int]) -> int:
        """Tokens of `tokens` the tree holds in any tier; read-only (no split, no stamp)."""
        node, matched = self.root, 0
        while matched < len(tokens) and (child := node.children.get(tokens[matched])) is not None:
            shared = _shared_prefix_len(child.key, tokens, matched)
            matched += shared
            if shared < len(child.key):
                break
            node = child
        return matched

    def match_and_load(self, tokens: Sequence[int], prefetched: Future | None = None) -> MatchResult:
        """The longest prefix of `tokens` held in any tier, brought into L1 as far as L1 has room: L2 nodes are
        copied up, then storage pages are placed after them (those `prefetched` read, or read now)."""
        path, _ = self._path(tokens, next(self._clock), l1_only=False)
        for n in path:
            n.hit_count += 1
        l1 = [n for n in path if n.value is not None]  # a prefix of the path (L1 is closed upwards)
        from_host = self._load_from_host(l1[-1] if l1 else self.root, path[len(l1):])
        l1 = [n for n in path if n.value is not None]
        if self.write_policy == "write_through_selective":  # after the load: making L2 room may drop host nodes
            for n in l1:
                if n.host_value is None and n.hit_count >= SELECTIVE_HITS:
                    self._backup(n)
        match = MatchResult(_values(l1), l1[-1] if l1 else self.root, from_host=from_host)
        if self.storage is not None and len(l1) == len(path):  # L3 continues where L1 and L2 both end
            match = self._load_from_storage(tokens, match, prefetched)
        return match

    def insert(self, tokens: Sequence[int], kv_indices: Sequence[int], from_storage: bool = False) -> MatchResult:
        """As RadixCache.insert; where the tree holds a token only in L2, the caller's fresh L1 index takes its
        place in L1 (no copy needed). New nodes are copied to L2 under write_through and written to storage, unless
        they were just read `from_storage` (they get a host copy if they are demoted later)."""
        if len(tokens) != len(kv_indices):
            raise ValueError(
                f"insert got {len(tokens)} tokens but {len(kv_indices)} KV indices; they must match"
            )
        now = next(self._clock)
        path, cached = self._path(tokens, now, l1_only=False)
        pos = 0
        for n in path:
            if n.value is None:
                n.value = list(kv_indices[pos:pos + len(n.key)])
                self._evictable += len(n.key)  # host-only nodes are never locked
            pos += len(n.key)
        held = _values(path)
        node = path[-1] if path else self.root
        if cached < len(tokens):
            leaf = TreeNode(key=list(tokens[cached:]), value=list(kv_indices[cached:]), parent=node,
                            last_access=now)
            node.children[leaf.key[0]] = leaf
            self._evictable += len(leaf.key)
            node, held = leaf, held + leaf.value
            if self.events is not None:
                self.events.record("insert", tokens)
            if self.write_policy == "write_through" and not from_storage:
                self._backup(leaf)
        if self.storage is not None and not from_storage:
            self.storage.save(self.device, tokens, held, start=cached)
        return MatchResult(kv_indices=held, last_node=node)

    # ---- moving KV between the tiers ----

    def _backup(self, node: TreeNode) -> bool:
        """Copy an L1 node's KV to L2; False if L2 has no room for it."""
        indices = self._alloc(self.host, len(node.key), self._evict_host)
        if indices is None:
            return False
        start = time.perf_counter()
        self.host.scatter(indices, self.device.gather(torch.tensor(node.value)))
        node.host_value = indices.tolist()
        self.host_writes.add(len(node.key), len(node.key) * self._token_bytes, time.perf_counter() - start)
        return True

    def _load_from_host(self, anchor: TreeNode, nodes: list[TreeNode]) -> int:
        """Copy the run of host-only `nodes` below `anchor` into L1, as many as L1 has room for; return the tokens
        loaded."""
        if not nodes:
            return 0
        self.lock(anchor)  # the room is made by evicting L1 entries: not the path these nodes hang from
        self._loading = {id(n) for n in nodes}
        try:
            room = self.device.free_count() + self.evictable_size()
            while nodes and sum(len(n.key) for n in nodes) > room:
                nodes = nodes[:-1]
            num = sum(len(n.key) for n in nodes)
            indices = self._alloc(self.device, num, self.evict) if num else None
            if indices is None:
                return 0
            start = time.perf_counter()
            self.device.scatter(indices, self.host.gather(torch.tensor(_host_values(nodes))))
            values = indices.tolist()
            for n in nodes:
                n.value, values = values[:len(n.key)], values[len(n.key):]
                self._evictable += len(n.key)
            self.host_loads.add(num, num * self._token_bytes, time.perf_counter() - start)
            return num
        finally:
            self._loading = set()
            self.unlock(anchor)

    def _load_from_storage(self, tokens: Sequence[int], match: MatchResult,
                           prefetched: Future | None = None) -> MatchResult:
        """Place the storage pages that continue `match` into L1 and insert them into the tree: from a finished
        prefetch when it started at or before the match's end (it then saw everything past it), else read now."""
        if prefetched is not None and prefetched.done() and prefetched.result()[0] <= len(match):
            start, found = prefetched.result()
            if found is None or found[0] <= len(match):
                return match
            found = (found[0], found[1][:, :, len(match) - start:])
        else:
            found = self.storage.load(tokens, len(match))
        if found is None:
            return match
        end, data = found
        self.lock(match.last_node)
        try:  # as much as L1 has room for, evicting other entries (not the matched path)
            end = min(end, len(match) + self.device.free_count() + self.evictable_size())
            indices = self._alloc(self.device, end - len(match), self.evict) if end > len(match) else None
        finally:
            self.unlock(match.last_node)
        if indices is None:
            return match
        self.device.scatter(indices, data[:, :, :end - len(match)])
        mine = match.kv_indices + indices.tolist()
        held = self.insert(tokens[:end], mine, from_storage=True)
        self.device.free([m for m, kept in zip(mine[len(match):], held.kv_indices[len(match):]) if m != kept])
        return MatchResult(held.kv_indices, held.last_node, match.from_host, end - len(match))

    @staticmethod
    def _alloc(pool: KVPool, num: int, evict) -> torch.Tensor | None:
        shortfall = num - pool.free_count()
        if shortfall > 0:
            evict(shortfall)
        return pool.alloc(num)

    # ---- eviction ----

    def evict(self, num_tokens: int) -> int:
        """Free at least `num_tokens` device-pool tokens if possible; return how many were freed.

        Takes unlocked L1 nodes without L1 children, sessions' last and then least recently used first, and
        demotes each to L2 (copying it there unless it has a copy). A node L2 cannot take, or a cold one under
        write_through_selective, is dropped, with any host-only nodes below it."""
        tiebreak = itertools.count()
        heap = [(self._eviction_key(n), next(tiebreak), n) for n in self._nodes() if self._l1_evictable(n)]
        heapq.heapify(heap)
        freed: list[int] = []
        while len(freed) < num_tokens and heap:
            _, _, node = heapq.heappop(heap)
            if node.host_value is None and not self._worth_keeping(node):
                self._drop_subtree(node)
            elif node.host_value is None and not self._backup(node):
                self._drop_subtree(node)
            freed.extend(node.value)
            self._evictable -= len(node.key)
            node.value = None
            parent = node.parent
            if self._l1_evictable(parent):
                heapq.heappush(heap, (self._eviction_key(parent), next(tiebreak), parent))
        if freed:
            self._free_kv(freed)
        return len(freed)

    def _worth_keeping(self, node: TreeNode) -> bool:
        """Whether a demoted node without a host copy gets one (else it is dropped)."""
        return (self.write_policy != "write_through_selective" or node.hit_count >= SELECTIVE_HITS
                or bool(node.children))

    def _l1_evictable(self, node: TreeNode) -> bool:
        return (node is not self.root and node.value is not None and node.lock_ref == 0
                and all(c.value is None for c in node.children.values()))

    def _drop_subtree(self, node: TreeNode) -> None:
        """Unlink `node` and free the host copies below it (an L1 node being evicted: its L1 indices are the
        caller's to free). Its children are all host-only (it is evictable)."""
        below, stack = [], list(node.children.values())
        while stack:
            below.append(stack.pop())
            stack.extend(below[-1].children.values())
        for n in reversed(below):  # children before their parents, so sessions' pins move up step by step
            self._drop_host(n)
            self._drop_leaf_pins(n)
        node.children = {}
        self._remove_leaf(node)
        if node.host_value is not None:
            self._drop_host(node)

    def _drop_host(self, node: TreeNode) -> None:
        self.host.free(node.host_value)
        if node.value is None:
            self.host_drops += len(node.key)
        node.host_value = None

    def _evict_host(self, num_tokens: int) -> int:
        """Free at least `num_tokens` host-pool tokens: first the host copies of nodes that are in L1 as well (no
        KV is lost), then host-only leaves (sessions' last, least recently used first)."""
        freed = 0
        copies = sorted((n for n in self._nodes() if n.value is not None and n.host_value is not None),
                        key=lambda n: n.last_access)
        for n in copies:
            if freed >= num_tokens:
                return freed
            freed += len(n.key)
            self._drop_host(n)
        tiebreak = itertools.count()
        heap = [(self._eviction_key(n), next(tiebreak), n) for n in self._nodes() if self._l2_evictable(n)]
        heapq.heapify(heap)
        while freed < num_tokens and heap:
            _, _, leaf = heapq.heappop(heap)
            self._remove_leaf(leaf)
            freed += len(leaf.key)
            self._drop_host(leaf)
            if self._l2_evictable(leaf.parent):
                heapq.heappush(heap, (self._eviction_key(leaf.parent), next(tiebreak), leaf.parent))
        return freed

    def _l2_evictable(self, node: TreeNode) -> bool:
        return (node is not self.root and node.value is None and not node.children
                and id(node) not in self._loading)

    def flush(self) -> None:
        """Drop every tier's entries (storage keeps its pages: they are shared and survive restarts)."""
        device, host = [], []
        for n in self._nodes():
            device.extend(n.value or ())
            host.extend(n.host_value or ())
        if self.events is not None:
            self.events.record("clear", ())
        self._free_kv(device)
        self.host.free(host)
        self.root, self._sessions = TreeNode(), {}
        self._evictable = self._protected = 0

    # ---- sizes and figures ----

    def host_size(self) -> int:
        """Tokens with a copy in L2."""
        return self.host.size - self.host.free_count()

    def tier_stats(self) -> dict:
        host_only = sum(len(n.key) for n in self._nodes() if n.value is None)
        out = {"hicache_host_tokens": self.host_size(), "hicache_host_only_tokens": host_only,
               "hicache_host_pool_tokens": self.host.size,
               "hicache_host_write_tokens": self.host_writes.tokens,
               "hicache_host_write_bytes": self.host_writes.bytes,
               "hicache_host_write_seconds": self.host_writes.seconds,
               "hicache_host_load_tokens": self.host_loads.tokens, "hicache_host_load_bytes": self.host_loads.bytes,
               "hicache_host_load_seconds": self.host_loads.seconds, "hicache_host_dropped_tokens": self.host_drops}
        if self.storage is not None:
            out.update(self.storage.stats())
        return out

    def check_integrity(self, num_free_kv: int, pool_size: int) -> None:
        evictable = protected = host_held = 0
        device_indices: list[int] = []
        host_indices: list[int] = []
        for parent, first, child in self._edges():
            _check_edge(parent, first, child, parent is self.root)
            if child.value is None and child.host_value is None:
                raise CacheIntegrityError(f"{child} has its KV in no tier")
            if child.value is not None:
                if parent is not self.root and parent.value is None:
                    raise CacheIntegrityError(f"{child} is in L1 below {parent}, which is not")
                device_indices.extend(child.value)
                if child.lock_ref > 0:
                    protected += len(child.key)
                else:
                    evictable += len(child.key)
            elif child.lock_ref:
                raise CacheIntegrityError(f"{child} is locked but not in L1")
            if child.host_value is not None:
                host_indices.extend(child.host_value)
                host_held += len(child.key)
        duplicates = sorted(i for i, n in Counter(host_indices).items() if n > 1)
        if duplicates:
            raise CacheIntegrityError(f"host KV indices stored more than once in the tree: {duplicates}")
        self._check_accounts(device_indices, evictable, protected, num_free_kv, pool_size, tier="device ")
        if self.host.free_count() + host_held != self.host.size:
            raise CacheIntegrityError(f"host KV leak or double count: free {self.host.free_count()} + held "
                                      f"{host_held} != host pool size {self.host.size}")


def _values(nodes: list[TreeNode]) -> list[int]:
    return [i for n in nodes for i in n.value]


def _host_values(nodes: list[TreeNode]) -> list[int]:
    return [i for n in nodes for i in n.host_value]
