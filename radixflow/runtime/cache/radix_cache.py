"""RadixAttention's prefix cache: a radix tree from token ids to KV-pool indices.

Each edge holds a run of tokens (`key`) and the KV-pool index of every one of them (`value`),
so the KV of any cached prefix can be reused by a new request. Running requests lock the path
they use; everything unlocked may be evicted, least recently used leaves first.

Ownership of KV indices: the tree owns every index stored in it and returns them to the pool
(through `free_kv`) only when it evicts them (the rule of `PrefixCache`, prefix_cache.py). Pure Python,
so it can be tested without a model.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from radixflow.runtime.cache.events import CacheEventLog
from radixflow.runtime.cache.prefix_cache import CacheIntegrityError, MatchResult, PrefixCache


@dataclass(eq=False)
class TreeNode:
    """One edge of the tree: a run of tokens and the KV indices that hold them.

    `key` and `value` have equal length and are non-empty except at the root. `children` are keyed
    by their first token. `lock_ref` counts the users of this node (and, through them, of its
    path); `session_ref` counts the open sessions whose last turn ends at or below it (their prefixes are
    evicted last); `last_access` is a logical clock value for LRU eviction.

    The hierarchical cache (hiradix_cache.py) adds a second home for the KV: `host_value`, the node's
    indices in the host pool (L2), or None; `value` is then None while the KV lives only there.
    """

    key: list[int] = field(default_factory=list)
    value: list[int] | None = field(default_factory=list)
    host_value: list[int] | None = None
    # Excluded from repr: parent/children links would make it recurse through the whole tree.
    parent: TreeNode | None = field(default=None, repr=False)
    children: dict[int, TreeNode] = field(default_factory=dict, repr=False)
    lock_ref: int = 0
    session_ref: int = 0
    last_access: int = 0
    hit_count: int = 0  # matches that went through this node (write_through_selective backs up hot nodes)


class RadixCache(PrefixCache):
    """Prefix cache over token ids with reference-count locking and LRU eviction.

    `free_kv` returns KV indices to the pool; it is called by `evict` and nowhere else. A match's
    `last_node` is the deepest `TreeNode` of the match (the root if nothing matched).
    """

    def __init__(self, free_kv: Callable[[list[int]], None], events: CacheEventLog | None = None) -> None:
        self._free_kv = free_kv
        self.events = events  # inserted and evicted prefixes, for a router (events.py)
        # A counter rather than wall time: ties and orderings are then reproducible in tests.
        self._clock = itertools.count(1)
        self.reset()

    def reset(self) -> None:
        """Drop every cached entry without freeing it (the caller resets the pool as well)."""
        self.root = TreeNode()
        self._sessions: dict[str, TreeNode] = {}  # open session -> the end of its last finished turn
        if self.events is not None:
            self.events.record("clear", ())
        self._evictable = 0
        self._protected = 0

    # ---- lookup and insertion ----

    def match_prefix(self, tokens: Sequence[int]) -> MatchResult:
        """Find the longest cached prefix of `tokens` and mark its path as just used.

        If the match ends inside an edge, that edge is split so `last_node` ends exactly there.
        """
        node, _, kv_indices = self._walk(tokens, next(self._clock))
        return MatchResult(kv_indices=kv_indices, last_node=node)

    def insert(self, tokens: Sequence[int], kv_indices: Sequence[int]) -> MatchResult:
        """Cache `tokens` with their KV indices; return the entry for all of `tokens`.

        For the prefix that was already cached the tree keeps its own indices (the caller's are
        duplicates, still the caller's to free); it takes the caller's indices for the rest.
        """
        if len(tokens) != len(kv_indices):
            raise ValueError(
                f"insert got {len(tokens)} tokens but {len(kv_indices)} KV indices; they must match"
            )
        now = next(self._clock)
        node, cached, held = self._walk(tokens, now)
        if cached < len(tokens):
            leaf = TreeNode(
                key=list(tokens[cached:]),
                value=list(kv_indices[cached:]),
                parent=node,
                last_access=now,
            )
            node.children[leaf.key[0]] = leaf
            self._evictable += len(leaf.key)
            node, held = leaf, held + leaf.value
            if self.events is not None:
                self.events.record("insert", tokens)
        return MatchResult(kv_indices=held, last_node=node)

    def continuation(self, node: TreeNode | None, tokens: Sequence[int], max_tokens: int) -> list[int]:
        node, offset = node or self.root, len((node or self.root).key)  # at the end of `node`'s edge
        for token in tokens:
            if offset == len(node.key):
                node, offset = node.children.get(token), 0
                if node is None:
                    return []
            if node.key[offset] != token:
                return []
            offset += 1
        out = node.key[offset:offset + max_tokens]
        while len(out) < max_tokens and node.children:
            node = max(node.children.values(), key=lambda child: child.last_access)
            out = out + node.key[:max_tokens - len(out)]
        return out

    def _walk(self, tokens: Sequence[int], now: int) -> tuple[TreeNode, int, list[int]]:
        """Follow `tokens` as far as the tree has them, stamping the path with `now`.

        Splits the last edge if the path ends inside it. Returns the deepest matched node,
        the number of matched tokens and their KV indices.
        """
        node, matched, kv_indices = self.root, 0, []
        while matched < len(tokens) and (child := node.children.get(tokens[matched])) is not None:
            shared = _shared_prefix_len(child.key, tokens, matched)
            if shared < len(child.key):
                child = self._split(child, shared)
            child.last_access = now
            kv_indices.extend(child.value)
            node, matched = child, matched + shared
        return node, matched, kv_indices

    def _split(self, node: TreeNode, at: int) -> TreeNode:
        """Cut `node`'s edge after `at` tokens and return the new upper node.

        The original object keeps the lower part, so a handle a caller holds (a `last_node`,
        perhaps locked) still ends at the same token and its lock path stays the same.
        """
        parent = node.parent
        upper = TreeNode(
            key=node.key[:at],
            value=_head(node.value, at),
            host_value=_head(node.host_value, at),
            parent=parent,
            lock_ref=node.lock_ref,
            session_ref=node.session_ref,
            last_access=node.last_access,
            hit_count=node.hit_count,
        )
        parent.children[upper.key[0]] = upper
        node.key, node.value, node.host_value = node.key[at:], _tail(node.value, at), _tail(node.host_value, at)
        node.parent = upper
        upper.children[node.key[0]] = node
        return upper

    # ---- locking ----

    def lock(self, node: TreeNode) -> None:
        """Protect the path from `node` up to the root from eviction (one more reference)."""
        for n in self._path_to_root(node):
            if n.lock_ref == 0:
                self._evictable -= len(n.key)
                self._protected += len(n.key)
            n.lock_ref += 1

    def unlock(self, node: TreeNode) -> None:
        """Release one reference taken by `lock` on the same node."""
        path = self._path_to_root(node)
        if any(n.lock_ref == 0 for n in path):
            raise RuntimeError("unlock without a matching lock: a reference count would go below 0")
        for n in path:
            n.lock_ref -= 1
            if n.lock_ref == 0:
                self._evictable += len(n.key)
                self._protected -= len(n.key)

    # ---- sessions ----

    def pin_session(self, session_id: str, node: TreeNode | None) -> None:
        """Make `node` the end of session `session_id`'s retained prefix (replacing its earlier one; None: none).
        Soft protection: eviction takes every other entry before a session's (hiradix_cache.py: it is demoted to
        the host tier before anything else is dropped)."""
        old = self._sessions.pop(session_id, None)
        if node is not None and node is not self.root:
            for n in self._path_to_root(node):
                n.session_ref += 1
            self._sessions[session_id] = node
        if old is not None:
            for n in self._path_to_root(old):
                n.session_ref -= 1

    def session_sizes(self) -> dict[str, int]:
        """Open sessions with a retained prefix, and its length in tokens."""
        return {sid: sum(len(n.key) for n in self._path_to_root(node)) for sid, node in self._sessions.items()}

    def _drop_leaf_pins(self, leaf: TreeNode) -> None:
        """`leaf` leaves the tree: the sessions that ended there now end at its parent (which already counts them)."""
        if leaf.session_ref == 0:
            return
        for sid, node in list(self._sessions.items()):
            if node is leaf:
                if leaf.parent is self.root:
                    del self._sessions[sid]
                else:
                    self._sessions[sid] = leaf.parent

    def _eviction_key(self, node: TreeNode) -> tuple[bool, int]:
        """Sessions' prefixes last, then least recently used first."""
        return node.session_ref > 0, node.last_access

    def _path_to_root(self, node: TreeNode) -> list[TreeNode]:
        """Nodes from `node` up to the root (root excluded), checking `node` is still in this tree."""
        path = []
        while node is not self.root:
            parent = node.parent
            # A stale handle would silently corrupt the counters, so refuse it loudly.
            if parent is None or parent.children.get(node.key[0]) is not node:
                raise ValueError("node is not in this cache (evicted, or created before reset)")
            path.append(node)
            node = parent
        return path

    # ---- eviction ----

    def evict(self, num_tokens: int) -> int:
        """Free at least `num_tokens` cached tokens if possible; return how many were freed.

        Removes whole unlocked leaves, least recently used first; a parent left without children
        becomes a candidate in turn. May free more than asked, or less if too little is unlocked.
        """
        tiebreak = itertools.count()
        heap = [(self._eviction_key(n), next(tiebreak), n) for n in self._nodes() if self._is_evictable_leaf(n)]
        heapq.heapify(heap)
        freed: list[int] = []
        while len(freed) < num_tokens and heap:
            _, _, leaf = heapq.heappop(heap)
            self._remove_leaf(leaf)
            self._evictable -= len(leaf.key)
            freed.extend(leaf.value)
            if self._is_evictable_leaf(leaf.parent):
                heapq.heappush(heap, (self._eviction_key(leaf.parent), next(tiebreak), leaf.parent))
        if freed:
            self._free_kv(freed)
        return len(freed)

    def _remove_leaf(self, leaf: TreeNode) -> None:
        """Unlink a childless node (its `parent` link is kept, for the caller); its KV is the caller's to free."""
        if self.events is not None:
            self.events.record("evict", self._path_tokens(leaf))
        del leaf.parent.children[leaf.key[0]]
        self._drop_leaf_pins(leaf)

    def _path_tokens(self, node: TreeNode) -> list[int]:
        parts = []
        while node is not self.root:
            parts.append(node.key)
            node = node.parent
        return [t for key in reversed(parts) for t in key]

    def _is_evictable_leaf(self, node: TreeNode) -> bool:
        return node is not self.root and not node.children and node.lock_ref == 0

    # ---- sizes ----

    def evictable_size(self) -> int:
        """Cached tokens no running request holds (reclaimable by `evict`)."""
        return self._evictable

    def protected_size(self) -> int:
        """Cached tokens locked by at least one user."""
        return self._protected

    # ---- debugging ----

    def check_integrity(self, num_free_kv: int, pool_size: int) -> None:
        """Raise `CacheIntegrityError` unless the tree is well formed and accounts for the pool.

        `num_free_kv` must already include KV that running requests hold outside the tree, so
        that free + evictable + protected == pool_size holds exactly when nothing leaked.
        """
        evictable = protected = 0
        indices: list[int] = []
        for parent, first, child in self._edges():
            _check_edge(parent, first, child, parent is self.root)
            indices.extend(child.value)
            if child.lock_ref > 0:
                protected += len(child.key)
            else:
                evictable += len(child.key)
        self._check_accounts(indices, evictable, protected, num_free_kv, pool_size)

    def _check_accounts(self, indices: list[int], evictable: int, protected: int, num_free_kv: int,
                        pool_size: int, tier: str = "") -> None:
        """The checks a recount of the tree must pass: each index once, the session counts, the size counters, and
        free + evictable + protected == pool size."""
        duplicates = sorted(i for i, n in Counter(indices).items() if n > 1)
        if duplicates:
            raise CacheIntegrityError(f"{tier}KV indices stored more than once in the tree: {duplicates}")
        self._check_session_refs()
        if (evictable, protected) != (self._evictable, self._protected):
            raise CacheIntegrityError(
                f"size counters (evictable={self._evictable}, protected={self._protected}) differ "
                f"from a recount (evictable={evictable}, protected={protected})"
            )
        if num_free_kv + evictable + protected != pool_size:
            raise CacheIntegrityError(
                f"KV leak or double count: free {num_free_kv} + evictable {evictable} + "
                f"protected {protected} = {num_free_kv + evictable + protected} != pool size {pool_size}"
            )

    def _check_session_refs(self) -> None:
        expected: Counter[int] = Counter()
        for node in self._sessions.values():
            for n in self._path_to_root(node):  # raises if a session points at a node no longer in the tree
                expected[id(n)] += 1
        for n in self._nodes():
            if n.session_ref != expected[id(n)]:
                raise CacheIntegrityError(f"{n} counts {n.session_ref} sessions, but {expected[id(n)]} end at or "
                                          f"below it")

    def _edges(self) -> Iterator[tuple[TreeNode, int, TreeNode]]:
        """Every (parent, dict key, child) link, depth first; fails instead of looping on a cycle."""
        if self.root.key or self.root.value or self.root.parent is not None or self.root.lock_ref:
            raise CacheIntegrityError("root must have no key, value, parent or lock")
        seen = {id(self.root)}
        stack = [self.root]
        while stack:
            parent = stack.pop()
            for first, child in parent.children.items():
                if id(child) in seen:
                    raise CacheIntegrityError(f"node {child} is reachable twice (cycle or shared child)")
                seen.add(id(child))
                yield parent, first, child
                stack.append(child)

    def _nodes(self) -> Iterator[TreeNode]:
        return (child for _, _, child in self._edges())

    def pretty(self) -> str:
        """A small indented dump of the tree, for debugging."""
        lines = [f"root (evictable={self._evictable}, protected={self._protected})"]
        stack = [(child, 1) for child in self.root.children.values()]
        while stack:
            node, depth = stack.pop()
            lines.append(
                f"{'  ' * depth}{node.key} -> {node.value} host={node.host_value} ref={node.lock_ref} "
                f"sessions={node.session_ref} t={node.last_access}"
            )
            stack.extend((child, depth + 1) for child in node.children.values())
        return "\n".join(lines)


def _shared_prefix_len(key: list[int], tokens: Sequence[int], start: int) -> int:
    """Length of the common prefix of `key` and `tokens[start:]`."""
    limit = min(len(key), len(tokens) - start)
    for i in range(limit):
        if key[i] != tokens[start + i]:
            return i
    return limit


def _head(values: list[int] | None, at: int) -> list[int] | None:
    return None if values is None else values[:at]


def _tail(values: list[int] | None, at: int) -> list[int] | None:
    return None if values is None else values[at:]


def _check_edge(parent: TreeNode, first: int, child: TreeNode, parent_is_root: bool) -> None:
    """Structural checks on one parent-child link."""
    if not child.key:
        raise CacheIntegrityError(f"non-root node with an empty key under {parent}")
    for tier, values in (("KV", child.value), ("host KV", child.host_value)):
        if values is not None and len(child.key) != len(values):
            raise CacheIntegrityError(f"{child} has {len(child.key)} tokens but {len(values)} {tier} indices")
    if first != child.key[0] or child.parent is not parent:
        raise CacheIntegrityError(f"{child} is linked under key {first} of {parent} inconsistently")
    if child.lock_ref < 0:
        raise CacheIntegrityError(f"{child} has a negative reference count")
    if not parent_is_root and parent.lock_ref < child.lock_ref:
        raise CacheIntegrityError(f"{child} holds more references than its parent {parent}")
