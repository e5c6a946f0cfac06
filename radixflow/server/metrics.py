"""Prometheus metrics (`/metrics`): request and token counts, latency histograms, and scheduler gauges."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("radixflow_requests", "finished requests by finish reason", ["reason"], registry=r)
        self.prompt_tokens = Counter("radixflow_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("radixflow_generation_tokens", "generated tokens", registry=r)
        self.cached_tokens = Counter("radixflow_cached_tokens", "prompt tokens served from the radix cache", registry=r)
        self.ttft = Histogram("radixflow_time_to_first_token_seconds", "time to first token", registry=r,
                              buckets=_LATENCY_BUCKETS)
        self.itl = Histogram("radixflow_inter_token_latency_seconds", "time between streamed outputs", registry=r,
                             buckets=_LATENCY_BUCKETS)
        self.e2e = Histogram("radixflow_e2e_request_latency_seconds", "request latency", registry=r,
                             buckets=_LATENCY_BUCKETS)
        self.gauges = {name: Gauge(f"radixflow_{name}", help_text, registry=r) for name, help_text in (
            ("num_running_reqs", "requests running"), ("num_waiting_reqs", "requests waiting"),
            ("kv_used_tokens", "KV pool tokens in use"), ("kv_total_tokens", "KV pool size"),
            ("cache_hit_rate", "prompt tokens served from the cache / prompt tokens"),
            ("spec_accept_length", "speculative decoding: tokens per verify step (1 = no draft accepted)"),
            ("spec_accepted_tokens", "speculative decoding: draft tokens accepted so far"),
            ("spec_draft_tokens", "speculative decoding: draft tokens verified so far"),
            ("num_receiving_reqs", "disaggregated decode: requests waiting for their KV from a prefill server"),
            ("kv_transfers", "disaggregation: KV transfers done so far"),
            ("kv_transfer_failures", "disaggregation: KV transfers failed so far"),
            ("kv_transfer_bytes", "disaggregation: KV bytes sent or received so far"),
            ("kv_transfer_seconds", "disaggregation: seconds spent moving KV so far"),
            *_TIER_GAUGES.items(),
        )}

    def observe_finished(self, meta: dict) -> None:
        self.requests.labels(meta["finish_reason"]["type"] if meta.get("finish_reason") else "unknown").inc()
        self.prompt_tokens.inc(meta["prompt_tokens"])
        self.generation_tokens.inc(meta["completion_tokens"])
        self.cached_tokens.inc(meta["cached_tokens"])
        self.e2e.observe(meta["e2e_latency"])

    def render(self, stats: dict) -> bytes:
        mapping = {"num_running_reqs": "num_running", "num_waiting_reqs": "num_waiting",
                   "kv_used_tokens": "kv_used_tokens", "kv_total_tokens": "kv_total_tokens",
                   "cache_hit_rate": "cache_hit_rate", "spec_accept_length": "spec_accept_length",
                   "spec_accepted_tokens": "spec_accepted_tokens", "spec_draft_tokens": "spec_draft_tokens",
                   "num_receiving_reqs": "num_receiving", **{k: k for k in (
                       "kv_transfers", "kv_transfer_failures", "kv_transfer_bytes", "kv_transfer_seconds",
                       *_TIER_GAUGES)}}
        for gauge, key in mapping.items():
            self.gauges[gauge].set(stats.get(key, 0))
        return generate_latest(self.registry)


# The hierarchical cache and sessions, by tier (0 where that tier is not configured).
_TIER_GAUGES = {
    "cache_hit_tokens": "prompt tokens served from the cache (every tier)",
    "cache_hit_host_tokens": "prompt tokens served from the cache's host tier (L2)",
    "cache_hit_storage_tokens": "prompt tokens served from the cache's storage tier (L3)",
    "hicache_host_tokens": "tokens with a copy in the host tier",
    "hicache_host_only_tokens": "tokens only in the host tier (evicted from the device pool)",
    "hicache_host_write_bytes": "bytes copied into the host tier so far",
    "hicache_host_write_seconds": "seconds spent copying into the host tier so far",
    "hicache_host_load_bytes": "bytes loaded from the host tier so far",
    "hicache_host_load_seconds": "seconds spent loading from the host tier so far",
    "hicache_storage_pages_written": "pages written to storage so far",
    "hicache_storage_write_bytes": "bytes written to storage so far",
    "hicache_storage_pages_loaded": "pages loaded from storage so far",
    "hicache_storage_load_bytes": "bytes loaded from storage so far",
    "hicache_storage_load_seconds": "seconds spent loading from storage so far",
    "hicache_storage_corrupt_pages": "storage pages refused (checksum, size or model mismatch)",
    "sessions_open": "open sessions",
    "session_retained_tokens": "tokens the open sessions retain",
}
