"""Cache manager: the one owner of KV memory (request slots, the KV pool, the radix cache).

Ownership rule: a running request's KV indices `table[slot, :kv_len]` are split in two. The first
`req.tree_len` belong to the radix tree (the request holds a lock on that path, so they cannot be evicted); the
rest belong to the request alone. When a request finishes or is retracted, its computed tokens are inserted
into the tree; indices that duplicate what the tree already held are freed, the rest pass to the tree. With the
radix cache disabled the tree keeps nothing and every private index is freed.

Invariant (checked by `check_integrity`, run by tests and whenever the scheduler is idle):
    free + private (held by running requests) + evictable + protected == pool size
"""

from __future__ import annotations

import torch

from radixflow.runtime.cache.kv_pool import KVPool, ReqToTokenPool
from radixflow.runtime.cache.radix_cache import MatchResult, RadixCache
from radixflow.runtime.request import Req


class CacheManager:
    def __init__(self, kv: KVPool, req_to_token: ReqToTokenPool, disable_radix_cache: bool = False):
        self.kv = kv
        self.slots = req_to_token
        self.table = req_to_token.table
        self.tree = RadixCache(free_kv=kv.free, disable=disable_radix_cache)
        self.disabled = disable_radix_cache

    # -- figures ---------------------------------------------------------------------------------------------
    def available(self) -> int:
        """Tokens that can be allocated now, evicting unlocked cache entries if needed."""
        return self.kv.free_count() + self.tree.evictable_size()

    def used(self) -> int:
        return self.kv.size - self.kv.free_count()

    # -- request lifecycle -----------------------------------------------------------------------------------
    def match(self, req: Req) -> MatchResult:
        """Longest cached prefix of the request's known tokens, leaving at least one token to compute (the
        model must see the last token to produce logits) and recomputing prompt positions whose logprobs the
        request still needs."""
        tokens = req.all_ids(0, req.num_tokens - 1)
        first = req.logprob.prompt_start
        if first is not None and max(first, 1) + len(req.prompt_logprobs) < len(req.prompt_ids):
            tokens = tokens[:max(first - 1, 0)]
        return self.tree.match_prefix(tokens)

    def admit(self, req: Req, match: MatchResult) -> None:
        """Give the request a slot and the matched prefix (locked)."""
        req.slot = self.slots.alloc()
        prefix = len(match.kv_indices)
        if prefix:
            self.table[req.slot, :prefix] = torch.tensor(match.kv_indices, dtype=torch.int64)
        self.tree.lock(match.last_node)
        req.tree_node, req.tree_len, req.num_computed, req.kv_len = match.last_node, prefix, prefix, prefix

    def alloc(self, req: Req, start: int, num: int) -> bool:
        """KV for positions [start, start + num) of a running request; evicts LRU cache entries if needed."""
        shortfall = num - self.kv.free_count()
        if shortfall > 0:
            self.tree.evict(shortfall)
        indices = self.kv.alloc(num)
        if indices is None:
            return False
        self.table[req.slot, start:start + num] = indices.to(self.table.device)
        req.kv_len = start + num
        return True

    def cache_progress(self, req: Req) -> None:
        """After a partial chunk: hand the computed tokens to the tree now so other requests can share them."""
        if self.disabled:
            return
        self._insert(req)
        match = self.tree.match_prefix(req.all_ids(0, req.num_computed))
        self.table[req.slot, :len(match.kv_indices)] = torch.tensor(match.kv_indices, dtype=torch.int64)
        self.tree.lock(match.last_node)
        self.tree.unlock(req.tree_node)
        req.tree_node, req.tree_len = match.last_node, len(match.kv_indices)

    def release(self, req: Req) -> None:
        """The request finished, was retracted or aborted: cache what it computed, free the rest (including KV
        allocated for a step that never completed), give up the slot."""
        if self.disabled:
            self.kv.free(self.table[req.slot, req.tree_len:req.kv_len])
        else:
            self.kv.free(self.table[req.slot, req.num_computed:req.kv_len])
            self._insert(req)
        self.tree.unlock(req.tree_node)
        self.slots.free(req.slot)
        req.slot, req.tree_node, req.tree_len, req.kv_len = None, None, 0, 0

    def _insert(self, req: Req) -> None:
        tokens = req.all_ids(0, req.num_computed)
        indices = self.table[req.slot, :req.num_computed].tolist()
        already = self.tree.insert(tokens, indices)
        # Indices in [tree_len, already) duplicate entries another request put in the tree meanwhile.
        if already > req.tree_len:
            self.kv.free(indices[req.tree_len:already])

    def private_tokens(self, running: list[Req]) -> int:
        return sum(r.kv_len - r.tree_len for r in running if r.slot is not None)

    def check_integrity(self, running: list[Req]) -> None:
        """Raise `CacheIntegrityError` if any KV index leaked or is owned twice."""
        self.tree.check_integrity(self.kv.free_count() + self.private_tokens(running), self.kv.size)

    def flush(self) -> None:
        """Drop the whole cache. Only valid when no request holds KV (the scheduler checks)."""
        self.tree.evict(self.tree.total_size())
