"""Cache manager: the one owner of KV memory (request-to-token slots, the KV pool, the prefix cache).

Ownership rule: a running request's KV indices `req_to_token[slot, :num_allocated]` are split in two. The first
`req.num_in_tree` belong to the prefix cache (the request holds a lock on that path, so they cannot be evicted);
the rest belong to the request alone. Its computed tokens (prompt and output) are offered to the cache after
every prefill chunk and when the request finishes or is retracted (`PrefixCache.insert`): indices the cache
takes pass to it, indices duplicating what it already held are freed, and the rest stay the request's until it
releases them.

    positions:   [0, num_in_tree)   [num_in_tree, num_computed)   [num_computed, num_allocated)
    owned by:    prefix cache       the request                   the request (allocated for this step)

Invariant (checked by `check_integrity`, run by tests and whenever the scheduler is idle):
    free + private (held by running requests) + evictable + protected == pool size

Sessions: a request may carry a `session_id`. When it finishes, the cache retains what it computed for that
session (`PrefixCache.pin_session`: evicted after everything else; demoted to the host tier first where there is
one) until the session is closed or idle for longer than its TTL. An id that is not open opens a session with the
default TTL (a session is a hint, as vLLM's session RFCs have it: a request is never refused for its id);
`close_session` of an id that is not open says so.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from radixflow.runtime.cache.kv_pool import KVPool, ReqToTokenPool
from radixflow.runtime.cache.prefix_cache import MatchResult, PrefixCache
from radixflow.runtime.request import Req


@dataclass
class Session:
    ttl_s: float
    expires: float  # time.monotonic() past which it is closed (pushed back by each of its requests)


class CacheManager:
    def __init__(self, kv: KVPool, req_to_token: ReqToTokenPool, prefix_cache: PrefixCache,
                 session_ttl_s: float = 600.0):
        self.kv = kv
        self.req_to_token = req_to_token
        self.prefix_cache = prefix_cache
        self.session_ttl_s = session_ttl_s
        self.sessions: dict[str, Session] = {}

    # -- figures ---------------------------------------------------------------------------------------------
    def available(self) -> int:
        """Tokens that can be allocated now, evicting unlocked cache entries if needed."""
        return self.kv.free_count() + self.prefix_cache.evictable_size()

    def used(self) -> int:
        return self.kv.size - self.kv.free_count()

    # -- request lifecycle -----------------------------------------------------------------------------------
    def _match_tokens(self, req: Req) -> list[int]:
        tokens = req.all_ids(0, req.num_tokens - 1)
        first = req.logprob_options.prompt_start
        if first is not None and max(first, 1) + len(req.prompt_logprobs) < len(req.prompt_ids):
            tokens = tokens[:max(first - 1, 0)]
        return tokens

    def prefetch(self, req: Req) -> None:
        """Start reading the request's prefix from storage while it waits (hierarchical cache with storage)."""
        req.storage_prefetch = self.prefix_cache.prefetch(self._match_tokens(req))

    def match(self, req: Req, load: bool = False) -> MatchResult:
        """Longest cached prefix of the request's known tokens, leaving at least one token to compute (the
        model must see the last token to produce logits) and recomputing prompt positions whose logprobs the
        request still needs. `load`: the request is being admitted, so what slower tiers hold comes back to the
        device pool (ordering the queue only looks)."""
        tokens = self._match_tokens(req)
        if load:
            prefetched, req.storage_prefetch = req.storage_prefetch, None  # consumed by this admission attempt
            return self.prefix_cache.match_and_load(tokens, prefetched)
        return self.prefix_cache.match_prefix(tokens)

    def admit(self, req: Req, match: MatchResult) -> None:
        """Give the request a slot and the matched prefix (locked)."""
        req.slot = self.req_to_token.alloc()
        self.req_to_token.write(req.slot, 0, match.kv_indices)
        self.prefix_cache.lock(match.last_node)
        req.tree_node = match.last_node
        req.num_in_tree = req.num_computed = req.num_allocated = len(match)

    def alloc(self, req: Req, start: int, num: int) -> bool:
        """KV for positions [start, start + num) of a running request; evicts LRU cache entries if needed."""
        shortfall = num - self.kv.free_count()
        if shortfall > 0:
            self.prefix_cache.evict(shortfall)
        indices = self.kv.alloc(num)
        if indices is None:
            return False
        self.req_to_token.write(req.slot, start, indices)
        req.num_allocated = start + num
        return True

    def trim(self, req: Req) -> None:
        """Free the KV allocated past the computed tokens (the drafts a verify step rejected)."""
        self.kv.free(self.req_to_token.table[req.slot, req.num_computed:req.num_allocated])
        req.num_allocated = req.num_computed

    def share_computed_prefix(self, req: Req) -> None:
        """After a prefill chunk: offer the computed tokens to the cache now so other requests can share them,
        and move the request's lock to the end of what the cache holds."""
        held = self._offer_computed(req)
        self.req_to_token.write(req.slot, 0, held.kv_indices)
        self.prefix_cache.lock(held.last_node)
        self.prefix_cache.unlock(req.tree_node)
        req.tree_node, req.num_in_tree = held.last_node, len(held)

    def release(self, req: Req) -> None:
        """The request finished, was retracted or aborted: cache what it computed, free the rest (including KV
        allocated for a step that never completed), give up the slot."""
        table = self.req_to_token.table
        self.kv.free(table[req.slot, req.num_computed:req.num_allocated])
        held = self._offer_computed(req)
        self.kv.free(table[req.slot, max(len(held), req.num_in_tree):req.num_computed])
        if req.session_id is not None and req.num_computed:
            self.open_session(req.session_id, touch_only=True)
            self.prefix_cache.pin_session(req.session_id, held.last_node)
        self.prefix_cache.unlock(req.tree_node)
        self.req_to_token.free(req.slot)
        req.slot, req.tree_node, req.num_in_tree, req.num_allocated = None, None, 0, 0

    def _offer_computed(self, req: Req) -> MatchResult:
        """Insert the computed tokens; free the request's indices that duplicate what the cache already held."""
        ours = self.req_to_token.table[req.slot, :req.num_computed].tolist()
        held = self.prefix_cache.insert(req.all_ids(0, req.num_computed), ours)
        start = req.num_in_tree  # before it the indices are the cache's own already
        duplicates = [mine for mine, kept in zip(ours[start:], held.kv_indices[start:]) if mine != kept]
        self.kv.free(duplicates)
        return held

    def private_tokens(self, running: list[Req]) -> int:
        return sum(r.num_allocated - r.num_in_tree for r in running if r.slot is not None)

    def check_integrity(self, running: list[Req]) -> None:
        """Raise `CacheIntegrityError` if any KV index leaked or is owned twice."""
        self.prefix_cache.check_integrity(self.kv.free_count() + self.private_tokens(running), self.kv.size)

    def flush(self) -> None:
        """Drop the whole cache. Only valid when no request holds KV (the scheduler checks)."""
        self.prefix_cache.flush()

    # -- sessions --------------------------------------------------------------------------------------------
    def open_session(self, session_id: str | None = None, ttl_s: float | None = None,
                     touch_only: bool = False) -> str:
        """Open `session_id` (a new id if None) or push back its expiry if it is open (`ttl_s` then replaces its
        TTL unless `touch_only`); returns the id."""
        session_id = session_id or f"session-{uuid.uuid4().hex}"
        session = self.sessions.get(session_id)
        if session is None:
            session = self.sessions[session_id] = Session(self.session_ttl_s if ttl_s is None else ttl_s, 0.0)
        elif ttl_s is not None and not touch_only:
            session.ttl_s = ttl_s
        session.expires = time.monotonic() + session.ttl_s
        return session_id

    def close_session(self, session_id: str) -> bool:
        """Release the session's retained prefix (it stays cached as any other entry); False if it is not open."""
        if self.sessions.pop(session_id, None) is None:
            return False
        self.prefix_cache.pin_session(session_id, None)
        return True

    def expire_sessions(self, now: float | None = None) -> list[str]:
        """Close the sessions idle past their TTL; returns their ids."""
        now = time.monotonic() if now is None else now
        expired = [sid for sid, s in self.sessions.items() if s.expires <= now]
        for sid in expired:
            self.close_session(sid)
        return expired
