"""Router options, named and defaulted as SGLang's router names them (`python -m sglang_router.launch_router`)."""

from __future__ import annotations

from dataclasses import dataclass

from radixflow.runtime.config import _help


@dataclass(frozen=True)
class RouterConfig:
    policy: str = _help("cache_aware, round_robin, random, power_of_two", default="cache_aware")
    cache_threshold: float = _help(
        "cache_aware: route to the worker with the longest cached prefix when that prefix covers more than this "
        "share of the request's text; else to the least loaded worker", default=0.3)
    balance_abs_threshold: int = _help(
        "cache_aware: loads count as imbalanced (route to the least loaded) when the busiest worker has more than "
        "this many requests in flight beyond the idlest...", default=64)
    balance_rel_threshold: float = _help("...and more than this many times as many", default=1.5)
    eviction_interval_secs: float = _help("cache_aware: how often each worker's tree is trimmed to --max-tree-size",
                                          default=120.0)
    max_tree_size: int = _help("cache_aware: characters kept per worker's tree (least recently used go first)",
                               default=2**26)
    tree_source: str = _help(
        "cache_aware: requests (each worker's tree holds the texts routed to it) or events (the prefixes each "
        "worker reports it cached and evicted, polled from its /cache_events)", default="requests")
    cache_events_interval_secs: float = _help("tree source events: how often each worker is polled", default=0.5)
    health_check_interval_secs: float = _help("how often every worker's /health is checked", default=60.0)
    health_check_timeout_secs: float = _help("a health check slower than this failed", default=5.0)
    health_failure_threshold: int = _help("consecutive failed checks that take a worker out of rotation", default=3)
    health_success_threshold: int = _help("consecutive passed checks that bring it back", default=2)
    retry_max_retries: int = _help(
        "times a request that did not start (connection refused, or 503 from the worker) is tried on another "
        "worker", default=5)
    request_timeout_secs: float = _help("a request to a worker that takes longer fails (504)", default=1800.0)
    worker_startup_timeout_secs: float = _help("/add_worker waits this long for the new worker to be healthy",
                                               default=600.0)
