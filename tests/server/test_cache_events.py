"""`GET /cache_events` on a server started without `--enable-cache-events` (the router tests use it with)."""

from __future__ import annotations

import httpx


def test_cache_events_need_the_flag(tiny_server):
    r = httpx.get(f"{tiny_server.url}/cache_events", timeout=10)
    assert r.status_code == 400 and "--enable-cache-events" in r.json()["error"]["message"]
    assert httpx.get(f"{tiny_server.url}/health").status_code == 200
