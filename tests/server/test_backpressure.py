"""Work the server cannot take is refused, not queued without bound; work that runs too long is ended; a drain
that runs out of time aborts what is left. On the tiny model: `bounded_server` runs one request at a time and
lets two queue (300 prompt tokens at most), ends requests after 1 s unless they ask for longer, and drains for 1 s
(its last test stops it).
"""

from __future__ import annotations

import threading
import time

import anthropic
import httpx
import openai
import pytest

from tests.helpers.server import assert_no_kv_leak, sse_events, wait_idle

# Longer than the server's 1 s default timeout allows: its own `timeout` overrides it.
RUNNING = {"text": "keep going", "stream": True, "timeout": 60,
           "sampling_params": {"max_new_tokens": 1500, "ignore_eos": True}}


class Occupied:
    """One streamed request running (the server runs one at a time) and `queued` more waiting behind it."""

    def __init__(self, url: str, queued_prompts: list[str]):
        self.url, self.prompts = url, queued_prompts
        self.results: list[httpx.Response] = []

    def __enter__(self):
        self.client = httpx.Client(base_url=self.url, timeout=30)
        self.stream = self.client.stream("POST", "/generate", json=RUNNING)
        response = self.stream.__enter__()
        self.lines = response.iter_lines()
        next(line for line in self.lines if line.startswith("data: "))  # it runs
        self.threads = [threading.Thread(target=self._post, args=(p,)) for p in self.prompts]
        for thread in self.threads:
            thread.start()
        deadline = time.monotonic() + 5
        while self.client.get("/get_server_info").json()["stats"]["num_waiting"] < len(self.prompts):
            assert time.monotonic() < deadline, "the queued requests never queued"
            time.sleep(0.01)
        return self

    def _post(self, prompt: str) -> None:
        self.results.append(httpx.post(f"{self.url}/generate", timeout=30,
                                       json={"text": prompt, "timeout": 60, "sampling_params": {"max_new_tokens": 2}}))

    def __exit__(self, *exc):
        self.stream.__exit__(None, None, None)  # its client leaves: the running request is aborted
        for thread in self.threads:
            thread.join(timeout=30)
        self.client.close()


def assert_unavailable(response: httpx.Response, limit: str) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "1"
    assert limit in response.json()["error"]["message"]


def test_past_max_queued_requests_new_work_gets_503_with_retry_after(bounded_server):
    with Occupied(bounded_server.url, ["first", "second"]) as occupied:
        assert_unavailable(httpx.post(f"{bounded_server.url}/generate", json={"text": "third"}),
                           "--max-queued-requests")
        model = httpx.get(f"{bounded_server.url}/v1/models").json()["data"][0]["id"]
        streamed = httpx.post(f"{bounded_server.url}/v1/chat/completions", json={
            "model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]})
        assert_unavailable(streamed, "--max-queued-requests")  # refused before any 200
    assert [r.status_code for r in occupied.results] == [200, 200]  # the queued ones were served
    with httpx.Client(base_url=bounded_server.url) as client:
        assert_no_kv_leak(client)
        assert client.post("/generate", json={"text": "now there is room"}).status_code == 200


def test_past_max_queued_tokens_new_work_gets_503(bounded_server):
    long_prompt = "word " * 250  # ~250 tokens queued; 300 is the bound
    with Occupied(bounded_server.url, [long_prompt]):
        assert_unavailable(httpx.post(f"{bounded_server.url}/generate", json={"text": "word " * 80}),
                           "--max-queued-tokens")
        model = httpx.get(f"{bounded_server.url}/v1/models").json()["data"][0]["id"]
        sdk = openai.OpenAI(base_url=f"{bounded_server.url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError) as caught:  # the SDK's class for 503
            sdk.completions.create(model=model, prompt="word " * 80, max_tokens=2)
        assert caught.value.status_code == 503 and caught.value.response.headers["retry-after"] == "1"


def test_the_servers_request_timeout_ends_a_request_and_frees_its_kv(bounded_server):
    started = time.monotonic()
    out = httpx.post(f"{bounded_server.url}/generate", timeout=30, json={  # far more than 1 s of decoding
        "text": "too long", "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True}}).json()
    elapsed = time.monotonic() - started
    reason = out["meta_info"]["finish_reason"]
    assert reason["type"] == "abort" and reason["message"].startswith("timeout"), reason
    assert 0.9 < elapsed < 5 and 0 < out["meta_info"]["completion_tokens"] < 2000
    with httpx.Client(base_url=bounded_server.url) as client:
        assert_no_kv_leak(client)


def test_a_requests_own_timeout_on_every_api(tiny_server, client, model_name):
    long = {"max_new_tokens": 1500, "ignore_eos": True}
    out = client.post("/generate", json={"text": "slow", "sampling_params": long, "timeout": 0.3}).json()
    assert out["meta_info"]["finish_reason"]["message"].startswith("timeout")
    sdk = openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="x", max_retries=0)
    choice = sdk.completions.create(model=model_name, prompt="slow", max_tokens=1500,
                                    extra_body={"ignore_eos": True, "timeout": 0.3}).choices[0]
    assert choice.finish_reason == "abort"
    claude = anthropic.Anthropic(base_url=tiny_server.url, api_key="x", max_retries=0)
    with claude.messages.stream(model=model_name, max_tokens=1500, messages=[{"role": "user", "content": "slow"}],
                                extra_body={"timeout": 0.3}) as stream:
        with pytest.raises(anthropic.APIError, match="timeout"):
            stream.get_final_message()
    bad = client.post("/generate", json={"text": "x", "timeout": -1})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "timeout"
    assert_no_kv_leak(client)


def test_a_drain_that_runs_out_of_time_aborts_what_is_left_with_a_reason(bounded_server):
    """The last test on `bounded_server`: it stops it."""
    server = bounded_server
    with httpx.Client(base_url=server.url, timeout=10) as client:
        wait_idle(client)
        with client.stream("POST", "/generate", json=RUNNING) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            server.terminate()
            stopped = time.monotonic()
            events = sse_events(lines)
    final = events[-2]["meta_info"]["finish_reason"]
    assert final["type"] == "abort" and "grace period" in final["message"], final
    assert time.monotonic() - stopped < 4  # the 1 s grace (the request asked for 60 s)
    server.wait_stopped()
