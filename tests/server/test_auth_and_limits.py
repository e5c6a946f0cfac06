"""A server started with --api-key and a deliberately small KV pool (64 tokens, under the 2048-token context)."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.helpers.server import API_KEY
from tests.helpers.server import KEYED_POOL as POOL


def test_health_needs_no_key(keyed_server):
    assert httpx.get(f"{keyed_server.url}/health", timeout=10).status_code == 200


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}])
@pytest.mark.parametrize("method,path", [("GET", "/v1/models"), ("POST", "/generate"), ("GET", "/metrics"),
                                         ("GET", "/get_server_info"), ("POST", "/flush_cache")])
def test_missing_or_wrong_key_is_401(keyed_server, headers, method, path):
    response = httpx.request(method, f"{keyed_server.url}{path}", headers=headers, json={"text": "x"}, timeout=10)
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["type"] == "authentication_error" and "API key" in error["message"]


def test_sdk_with_key(keyed_server):
    sdk = openai.OpenAI(base_url=f"{keyed_server.url}/v1", api_key=API_KEY, timeout=30, max_retries=0)
    name = sdk.models.list().data[0].id
    out = sdk.completions.create(model=name, prompt="hello", max_tokens=3, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 3
    wrong = openai.OpenAI(base_url=f"{keyed_server.url}/v1", api_key="sk-wrong", timeout=30, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model=name, prompt="hello", max_tokens=3)


def test_request_larger_than_the_kv_pool_is_refused(keyed_server):
    response = httpx.post(f"{keyed_server.url}/generate", headers=keyed_server.headers, timeout=30,
                          json={"text": "x", "sampling_params": {"max_new_tokens": POOL + 10}})
    assert response.status_code == 400
    assert "KV pool" in response.json()["error"]["message"]


def test_chat_without_max_tokens_fits_the_kv_pool(keyed_server):
    """With no max_tokens, chat generates as much as fits: that must be bounded by the pool, not the context."""
    sdk = openai.OpenAI(base_url=f"{keyed_server.url}/v1", api_key=API_KEY, timeout=60, max_retries=0)
    name = sdk.models.list().data[0].id
    out = sdk.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], temperature=0,
                                      extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length"
    assert out.usage.total_tokens == POOL
