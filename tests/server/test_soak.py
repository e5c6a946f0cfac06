"""A bounded soak on the tiny model (slow tier): 256 concurrent streaming clients send 1,000 requests of mixed
lengths, a third of them hanging up mid-stream. Every stream that runs to its end must equal the greedy reference
(nothing lost, nothing truncated), the KV integrity must hold, and the server's memory (RSS of its processes) must
come back within 10% of where it started (after a warm-up of two such runs: the C heap grows to its working size
over the first few thousand requests, then stays; the engine gives free heap pages back when it goes idle)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import psutil
import pytest

from tests.helpers.server import assert_no_kv_leak

pytestmark = pytest.mark.slow

CLIENTS = 256
REQUESTS = 1000
LENGTHS = (8, 24, 48, 96)
PROMPTS = [f"Soak client {i % 12} says: item {i} of the list is" for i in range(40)]
GREEDY = {"temperature": 0.0, "ignore_eos": True}


def family_rss(server) -> int:
    procs = [psutil.Process(server.proc.pid), *server.descendants()]
    return sum(p.memory_info().rss for p in procs if p.is_running())


async def one(client: httpx.AsyncClient, i: int, reference: dict, counts: dict) -> None:
    prompt, length = PROMPTS[i % len(PROMPTS)], LENGTHS[i % len(LENGTHS)]
    hang_up = i % 3 == 0
    body = {"text": prompt, "stream": True, "sampling_params": {**GREEDY, "max_new_tokens": length}}
    events = []
    try:
        async with client.stream("POST", "/generate", json=body) as response:
            if response.status_code != 200:
                counts["errors"].append((response.status_code, (await response.aread())[:200]))
                return
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    payload = line.removeprefix("data: ")
                    events.append(payload if payload == "[DONE]" else json.loads(payload))
                    if hang_up and len(events) >= 3:
                        counts["hung_up"] += 1
                        return  # leaving the block closes the connection mid-stream
    except httpx.HTTPError as exc:
        counts["errors"].append(("transport", repr(exc)))
        return
    if not events or events[-1] != "[DONE]":
        counts["dropped"] += 1
        return
    final = events[-2]
    if final["meta_info"]["completion_tokens"] != length or final["text"] != reference[(prompt, length)]:
        counts["truncated_or_wrong"].append((prompt, length, final["meta_info"]["finish_reason"]))
        return
    counts["completed"] += 1


async def soak(url: str, reference: dict) -> dict:
    counts = {"completed": 0, "hung_up": 0, "dropped": 0, "truncated_or_wrong": [], "errors": []}
    gate = asyncio.Semaphore(CLIENTS)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(300, connect=30),
                                 limits=httpx.Limits(max_connections=CLIENTS)) as client:
        async def gated(i: int) -> None:
            async with gate:
                await one(client, i, reference, counts)

        await asyncio.gather(*(gated(i) for i in range(REQUESTS)))
    return counts


def test_soak(soak_server):
    with httpx.Client(base_url=soak_server.url, timeout=120) as client:
        reference = {}
        for length in LENGTHS:  # the greedy reference, one batched request per length
            out = client.post("/generate", json={"text": PROMPTS, "sampling_params": {**GREEDY,
                                                                                      "max_new_tokens": length}})
            reference |= {(p, length): r["text"] for p, r in zip(PROMPTS, out.json())}
        for _ in range(2):  # warm-up: the C heap settles after a few thousand requests of every batch shape
            asyncio.run(soak(soak_server.url, reference))
        assert_no_kv_leak(client)
        before = family_rss(soak_server)
        started = time.monotonic()
        counts = asyncio.run(soak(soak_server.url, reference))
        elapsed = time.monotonic() - started
        assert_no_kv_leak(client)
        time.sleep(2)
        after = family_rss(soak_server)
    print(f"\nsoak: {REQUESTS} requests, {CLIENTS} clients, {elapsed:.1f} s: {counts['completed']} completed, "
          f"{counts['hung_up']} hung up, {counts['dropped']} dropped, {len(counts['truncated_or_wrong'])} truncated "
          f"or wrong, {len(counts['errors'])} errors; RSS {before / 2**20:.0f} MiB -> {after / 2**20:.0f} MiB")
    assert not counts["errors"] and not counts["truncated_or_wrong"] and counts["dropped"] == 0, counts
    assert counts["hung_up"] == REQUESTS // 3 + 1 and counts["completed"] == REQUESTS - counts["hung_up"]
    assert after <= before * 1.10, (before, after)
