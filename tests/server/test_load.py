"""Many clients at once: complete and correct streams, and no KV left behind by clients that hang up."""

from __future__ import annotations

import asyncio
import json

import httpx

from tests.helpers.server import assert_no_kv_leak, wait_idle

NUM_CLIENTS = 64
NEW_TOKENS = 16
GREEDY = {"temperature": 0.0, "ignore_eos": True}


async def _stream_events(client: httpx.AsyncClient, path: str, body: dict, keep: int | None = None) -> list:
    """SSE payloads of one streamed request; with `keep`, hang up after that many events."""
    events = []
    async with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            payload = line.removeprefix("data: ")
            events.append(payload if payload == "[DONE]" else json.loads(payload))
            if keep is not None and len(events) >= keep:
                break  # leaving the block closes the connection mid-stream
    return events


async def _native(client, prompt: str) -> str:
    events = await _stream_events(client, "/generate", {"text": prompt, "stream": True,
                                                        "sampling_params": {**GREEDY, "max_new_tokens": NEW_TOKENS}})
    assert events[-1] == "[DONE]"
    final = events[-2]
    assert final["meta_info"]["finish_reason"]["type"] == "length"
    assert final["meta_info"]["completion_tokens"] == NEW_TOKENS
    return final["text"]


async def _openai(client, prompt: str, model: str) -> str:
    events = await _stream_events(client, "/v1/completions", {"model": model, "prompt": prompt, "stream": True,
                                                              "max_tokens": NEW_TOKENS, **GREEDY})
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    return "".join(e["choices"][0]["text"] for e in events[:-1])


def _async_client(server) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=server.url, timeout=httpx.Timeout(60, connect=10),
                             limits=httpx.Limits(max_connections=2 * NUM_CLIENTS))


def test_concurrent_streams_match_greedy_reference(tiny_server, client, model_name):
    # Shared prefixes in groups, so the radix cache is hit while the streams run.
    prompts = [f"Client number {i % 8} asks question {i}: what comes next?" for i in range(NUM_CLIENTS)]
    reference = client.post("/generate", json={"text": prompts, "sampling_params": {**GREEDY,
                                                                                   "max_new_tokens": NEW_TOKENS}})
    assert reference.status_code == 200
    expected = [r["text"] for r in reference.json()]

    async def run_all():
        async with _async_client(tiny_server) as aclient:
            jobs = [_native(aclient, p) if i % 2 == 0 else _openai(aclient, p, model_name)
                    for i, p in enumerate(prompts)]
            return await asyncio.wait_for(asyncio.gather(*jobs), timeout=120)

    streamed = asyncio.run(run_all())
    mismatches = [(i, want, got) for i, (want, got) in enumerate(zip(expected, streamed)) if want != got]
    assert not mismatches, mismatches[:3]
    assert_no_kv_leak(client)


def test_clients_that_hang_up_leave_no_kv(tiny_server, client, model_name):
    before = wait_idle(client)
    long = {**GREEDY, "max_new_tokens": 1500}

    async def hang_up_non_streaming(aclient, i):
        # A non-streamed request whose client gives up: the server must notice and abort it.
        try:
            await aclient.post("/generate", json={"text": f"impatient {i}", "sampling_params": long}, timeout=0.5)
        except httpx.ReadTimeout:
            return
        raise AssertionError("a 1500-token request finished within 0.5 s: the test no longer tests a hang-up")

    async def run_all():
        async with _async_client(tiny_server) as aclient:
            jobs = []
            for i in range(16):
                if i % 2:
                    body = {"model": model_name, "stream": True, "max_tokens": 1500, "n": 2, **GREEDY,
                            "messages": [{"role": "user", "content": f"chat that stops {i}"}]}
                    jobs.append(_stream_events(aclient, "/v1/chat/completions", body, keep=3))
                else:
                    body = {"text": f"stream that stops {i}", "stream": True, "sampling_params": long}
                    jobs.append(_stream_events(aclient, "/generate", body, keep=3))
            jobs += [hang_up_non_streaming(aclient, i) for i in range(2)]
            await asyncio.wait_for(asyncio.gather(*jobs), timeout=60)

    asyncio.run(run_all())
    after = wait_idle(client, timeout_s=30)
    # 26 requests of 1500 tokens would generate 39000 tokens; aborted ones stop after a few.
    assert after["generated_tokens"] - before["generated_tokens"] < 3000, (before, after)
    assert_no_kv_leak(client)
    ok = client.post("/generate", json={"text": "still fine", "sampling_params": {"max_new_tokens": 2}})
    assert ok.status_code == 200
