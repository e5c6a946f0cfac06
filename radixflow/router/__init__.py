"""The router: data parallelism over several radixflow servers, routed by a cache-aware policy (app.py)."""
