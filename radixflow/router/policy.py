"""Routing policies: which worker gets a request. No I/O here; the app (`app.py`) counts load and health.

`cache_aware` is SGLang router's policy: when the workers' loads are balanced, send a request to the worker whose
tree holds the longest prefix of its text if that prefix covers more than `cache_threshold` of it, else to the
least loaded worker (which then caches this text); when loads are imbalanced (the busiest worker has more than
`balance_abs_threshold` requests in flight beyond the idlest, and more than `balance_rel_threshold` times as
many), send it to the least loaded worker whatever the trees say.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from radixflow.router.tree import PrefixTree

POLICIES = ("cache_aware", "round_robin", "random", "power_of_two")


@dataclass(eq=False)
class Worker:
    """One worker as the router sees it. `load` is the router's own count of its requests in flight there."""

    url: str
    load: int = 0
    healthy: bool = True
    failures: int = 0   # consecutive failed health checks (or a refused connection)
    successes: int = 0  # consecutive passed health checks while unhealthy
    tree: PrefixTree = field(default_factory=PrefixTree)
    role: str = "worker"  # or, behind --pd-disaggregation, prefill / decode
    bootstrap_port: int | None = None  # a prefill server's --disaggregation-bootstrap-port


@dataclass
class Decision:
    worker: Worker
    reason: str  # cache_hit, cache_miss, imbalanced, round_robin, random, power_of_two
    matched_chars: int = 0


class Policy:
    name = ""

    def select(self, workers: Sequence[Worker], text: str) -> Decision:
        """Pick one of `workers` (healthy, not empty) for a request whose routing text is `text`."""
        raise NotImplementedError


class RoundRobin(Policy):
    name = "round_robin"

    def __init__(self):
        self._counter = itertools.count()

    def select(self, workers: Sequence[Worker], text: str) -> Decision:
        return Decision(workers[next(self._counter) % len(workers)], "round_robin")


class Random(Policy):
    name = "random"

    def __init__(self, seed: int | None = None):
        self._rng = random.Random(seed)

    def select(self, workers: Sequence[Worker], text: str) -> Decision:
        return Decision(self._rng.choice(workers), "random")


class PowerOfTwo(Policy):
    """Two workers drawn at random; the less loaded one gets the request."""

    name = "power_of_two"

    def __init__(self, seed: int | None = None):
        self._rng = random.Random(seed)

    def select(self, workers: Sequence[Worker], text: str) -> Decision:
        if len(workers) == 1:
            return Decision(workers[0], "power_of_two")
        a, b = self._rng.sample(list(workers), 2)
        return Decision(a if a.load <= b.load else b, "power_of_two")


class CacheAware(Policy):
    name = "cache_aware"

    def __init__(self, cache_threshold: float = 0.3, balance_abs_threshold: int = 64,
                 balance_rel_threshold: float = 1.5, learn_from_requests: bool = True):
        self.cache_threshold = cache_threshold
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold
        # False when the trees are built from the workers' cache events instead of from the texts routed.
        self.learn_from_requests = learn_from_requests

    def select(self, workers: Sequence[Worker], text: str) -> Decision:
        least = min(workers, key=lambda w: (w.load, w.tree.size))
        busiest = max(w.load for w in workers)
        if (busiest - least.load > self.balance_abs_threshold
                and busiest > least.load * self.balance_rel_threshold):
            decision = Decision(least, "imbalanced")
        else:
            matches = [(w.tree.match(text), -w.load, -i) for i, w in enumerate(workers)]
            matched, _, neg_index = max(matches)
            if text and matched / len(text) > self.cache_threshold:
                decision = Decision(workers[-neg_index], "cache_hit", matched)
            else:
                decision = Decision(least, "cache_miss", matched)
        if self.learn_from_requests and text:
            decision.worker.tree.insert(text)
        return decision


def make_policy(name: str, cache_threshold: float = 0.3, balance_abs_threshold: int = 64,
                balance_rel_threshold: float = 1.5, learn_from_requests: bool = True) -> Policy:
    match name:
        case "cache_aware":
            return CacheAware(cache_threshold, balance_abs_threshold, balance_rel_threshold, learn_from_requests)
        case "round_robin":
            return RoundRobin()
        case "random":
            return Random()
        case "power_of_two":
            return PowerOfTwo()
    raise ValueError(f"policy: {name!r} is not one of {', '.join(POLICIES)}")
