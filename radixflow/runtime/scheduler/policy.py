"""Scheduling policy: waiting-queue orderings chosen by name (`--schedule-policy`), and which running request
to preempt when memory runs out.

An ordering is a small function `(waiting, ctx) -> ordered list`. Mechanism (budgets, memory, batches) lives in
`scheduler.py`; the starvation guard there runs before any ordering, so no ordering can starve a request.
"""

from __future__ import annotations

import random as _random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from radixflow.runtime.cache.prefix_cache import MatchResult
from radixflow.runtime.request import Req

# Matching every waiting request against the tree costs O(queue x prompt); past this length the cache-aware
# policies fall back to FCFS (the queue is long enough that arrival order is a fine proxy).
MAX_MATCHED_QUEUE = 128


@dataclass
class PolicyContext:
    """Prefix matches computed at most once per request per step, for ordering. (Admission matches again:
    admitting an earlier request may evict what an ordering saw cached.)"""

    match_fn: Callable[[Req], MatchResult]
    rng: _random.Random = field(default_factory=lambda: _random.Random(0))
    _matches: dict[str, MatchResult] = field(default_factory=dict)

    def match(self, req: Req) -> MatchResult:
        if req.rid not in self._matches:
            self._matches[req.rid] = self.match_fn(req)
        return self._matches[req.rid]


def fcfs(waiting: list[Req], ctx: PolicyContext) -> list[Req]:
    return sorted(waiting, key=lambda r: r.arrival)


def lof(waiting: list[Req], ctx: PolicyContext) -> list[Req]:
    """Longest output first (by max_new_tokens), FCFS among equals."""
    return sorted(waiting, key=lambda r: (-r.params.max_new_tokens, r.arrival))


def random_order(waiting: list[Req], ctx: PolicyContext) -> list[Req]:
    order = list(waiting)
    ctx.rng.shuffle(order)
    return order


def ltr(waiting: list[Req], ctx: PolicyContext) -> list[Req]:
    """Shortest predicted output first (learning to rank: `Req.length_score` from ranker.py), FCFS among equals.
    A cached prefix does not enter the order: it shortens a request's prefill, not its decode, which dominates a
    job's time here; `lpm` is the policy for prefix reuse."""
    return sorted(waiting, key=lambda r: (r.length_score, r.arrival))


def by_priority(order: list[Req]) -> list[Req]:
    """`order` regrouped by `priority`, lower values first; the order within a priority is kept (stable sort)."""
    return sorted(order, key=lambda r: r.priority)


def lpm(waiting: list[Req], ctx: PolicyContext) -> list[Req]:
    """Longest cached prefix first: requests that reuse the most KV run while it is still cached."""
    if len(waiting) > MAX_MATCHED_QUEUE:
        return fcfs(waiting, ctx)
    return sorted(waiting, key=lambda r: (-len(ctx.match(r).kv_indices), r.arrival))


def dfs_weight(waiting: list[Req], ctx: PolicyContext) -> list[Req]:
    """Depth-first over the radix tree, heavier subtrees (more waiting requests) first, so requests sharing a
    prefix run back to back (the paper's cache-aware order)."""
    if len(waiting) > MAX_MATCHED_QUEUE:
        return fcfs(waiting, ctx)
    at_node: dict[int, list[Req]] = defaultdict(list)
    weight: dict[int, int] = defaultdict(int)
    nodes = {}
    ordered = sorted(waiting, key=lambda r: r.arrival)
    # Match everything before walking parents: a later match may split an edge, adding a node above earlier ones.
    last_nodes = [ctx.match(req).last_node for req in ordered]
    for req, node in zip(ordered, last_nodes):
        at_node[id(node)].append(req)
        while node is not None:
            weight[id(node)] += 1
            nodes[id(node)] = node
            node = node.parent
    if not nodes:  # a cache without a tree (--disable-radix-cache): nothing to group by
        return ordered
    root = next(n for n in nodes.values() if n.parent is None)
    order: list[Req] = []
    stack = [root]
    while stack:
        node = stack.pop()
        order.extend(at_node.get(id(node), []))
        children = [c for c in node.children.values() if weight.get(id(c))]
        # Pushed lightest first so the heaviest is popped next.
        stack.extend(sorted(children, key=lambda c: weight[id(c)]))
    return order


POLICIES: dict[str, Callable[[list[Req], PolicyContext], list[Req]]] = {
    "lpm": lpm,
    "dfs-weight": dfs_weight,
    "fcfs": fcfs,
    "lof": lof,
    "random": random_order,
    "ltr": ltr,
    "priority": fcfs,  # with priority scheduling on (the scheduler turns it on for this name): priority, then FCFS
}


def priority_victim(running: list[Req], req: Req, protected_before: float) -> Req | None:
    """The running request to preempt so `req` can start under priority scheduling: the lowest priority (largest
    value) strictly below `req`'s, least output on ties; None if there is none. Requests that arrived before
    `protected_before` (admitted by the starvation guard) are never preempted for priority."""
    candidates = [r for r in running if r.priority > req.priority and r.arrival >= protected_before]
    if not candidates:
        return None
    return max(candidates, key=lambda r: (r.priority, -r.num_output, r.arrival))


def retraction_victim(running: list[Req]) -> Req:
    """The running request to preempt when a decode finds no KV: the one with the least output (the newest on
    ties), so the least work is lost; it keeps its output and resumes mostly from the cache."""
    return min(running, key=lambda r: (r.num_output, -r.arrival))


def get_policy(name: str):
    if name not in POLICIES:
        raise ValueError(f"schedule_policy: unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    return POLICIES[name]
