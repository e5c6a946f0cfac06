"""Bad requests: each is answered 4xx in OpenAI's error shape with a message naming the field, and the server
goes on serving (the next request on the same connection succeeds)."""

from __future__ import annotations

import pytest

MODEL = "<served>"  # replaced by the served model's name
CHAT = [{"role": "user", "content": "hi"}]
LONG_TEXT = "hello " * 3000  # ~3000 tokens: past the tiny model's 2048-token context


@pytest.fixture(autouse=True)
def still_serving(client, model_name):
    """After each bad request the same connection still gets a good answer, and nothing was left running."""
    yield
    good = client.post("/v1/completions", json={"model": model_name, "prompt": "ok", "max_tokens": 2})
    assert good.status_code == 200, good.text
    assert good.json()["usage"]["completion_tokens"] >= 1
    assert client.get("/health").status_code == 200


def with_model(body, model_name):
    return {**body, "model": model_name} if isinstance(body, dict) and body.get("model") == MODEL else body


def assert_error(response, status: int, field: str):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert field in error["message"], error
    return error


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/generate"])
@pytest.mark.parametrize("raw", [b'{"model": "x", "prompt": "hi",', b"not json at all", b"\xff\xfe"])
def test_malformed_json(client, path, raw):
    response = client.post(path, content=raw, headers={"content-type": "application/json"})
    assert_error(response, 400, "JSON")


BAD_BODIES = [
    # (path, body, status, field named in the message, param)
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens", "max_tokens"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "temperature": "hot"}, 400, "temperature",
     "temperature"),
    ("/v1/completions", {"model": "gpt-17", "prompt": "x"}, 404, "gpt-17", "model"),
    ("/v1/chat/completions", {"model": "gpt-17", "messages": CHAT}, 404, "gpt-17", "model"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": -1}, 400, "max_tokens", "max_tokens"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": -5}, 400, "max_tokens", "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 10**6}, 400, "max_tokens", "max_tokens"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": 10**6}, 400, "max_tokens",
     "max_tokens"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_completion_tokens": 10**6}, 400,
     "max_completion_tokens", "max_completion_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": LONG_TEXT}, 400, "context length", "prompt"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": LONG_TEXT}]}, 400,
     "context length", "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stream": True, "max_tokens": 10**6}, 400, "max_tokens",
     "max_tokens"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages", "messages"),
    ("/v1/chat/completions", {"model": MODEL}, 400, "messages", "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages.0.role", "messages.0.role"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": [""]}, 400, "stop", "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": 5}, 400, "stop", "stop"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "stop": ""}, 400, "stop", "stop"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "stop": [5]}, 400, "stop", "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": ["a"] * 17}, 400, "16", "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": []}, 400, "prompt", "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [10**7]}, 400, "prompt", "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "min_tokens": 5, "max_tokens": 2}, 400, "min_tokens",
     "min_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 10}, 400, "logprobs", "logprobs"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "logprobs": True, "top_logprobs": 50}, 400,
     "top_logprobs", "top_logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 0}, 400, "n", "n"),
    ("/v1/completions", [1, 2], 400, "body", None),
    ("/generate", {"text": "x", "sampling_params": {"max_new_tokens": "ten"}}, 400, "max_new_tokens",
     "max_new_tokens"),
    ("/generate", {"text": "x", "sampling_params": {"max_new_tokens": -3}}, 400, "max_new_tokens", "max_new_tokens"),
    ("/generate", {"text": "x", "sampling_params": {"max_new_tokens": 10**6}}, 400, "max_new_tokens",
     "max_new_tokens"),
    ("/generate", {"text": LONG_TEXT}, 400, "prompt", "prompt"),
    ("/generate", {"text": "x", "sampling_params": {"max_new_token": 3}}, 400, "max_new_token", "max_new_token"),
    ("/generate", {"text": "x", "sampling_params": {"stop": 5}}, 400, "stop", "stop"),
    ("/generate", {"text": "x", "sampling_params": {"stop": [""]}}, 400, "stop", "stop"),
    ("/generate", {"text": "x", "sampling_params": {"stop_token_ids": 7}}, 400, "stop_token_ids", "stop_token_ids"),
    ("/generate", {"sampling_params": {}}, 400, "text", "text"),
    ("/generate", {"text": []}, 400, "text", "text"),
    ("/generate", {"input_ids": [1, -5]}, 400, "input_ids", "input_ids"),
    ("/generate", {"text": "x", "return_logprob": True, "top_logprobs_num": 99}, 400, "top_logprobs_num",
     "top_logprobs_num"),
    ("/generate", {"text": "x", "return_logprob": True, "logprob_start_len": 10}, 400, "logprob_start_len",
     "logprob_start_len"),
    ("/generate", {"text": ["x", "y"], "stream": True}, 400, "stream", "stream"),
    ("/generate", {"text": "x", "rid": 5}, 400, "rid", "rid"),
    ("/generate", {"text": ["x", "y", "z"], "rid": ["a", "b"]}, 400, "rid", "rid"),  # never a silent truncation
    ("/generate", {"text": ["x", "y"], "sampling_params": [{}]}, 400, "sampling_params", "sampling_params"),
    ("/generate", {"text": "x", "sampling_params": "max_new_tokens"}, 400, "sampling_params", "sampling_params"),
    ("/generate", ["x"], 400, "body", None),
]


_ENDPOINT = {"/v1/completions": "cmpl", "/v1/chat/completions": "chat", "/generate": "native"}


@pytest.mark.parametrize("path,body,status,named,param", BAD_BODIES,
                         ids=[f"{_ENDPOINT[p]}-{named}-{i}" for i, (p, _, _, named, _) in enumerate(BAD_BODIES)])
def test_bad_request(client, model_name, path, body, status, named, param):
    error = assert_error(client.post(path, json=with_model(body, model_name)), status, named)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


def test_unknown_model_has_openai_code(client):
    error = assert_error(client.post("/v1/completions", json={"model": "gpt-17", "prompt": "x"}), 404, "model")
    assert error["code"] == "model_not_found"


def test_wrong_method_and_path(client):
    assert client.get("/v1/completions").status_code == 405
    assert client.post("/v1/no-such-endpoint", json={}).status_code == 404


def test_body_over_the_limit_is_413(client, model_name):
    from radixflow.server.errors import MAX_BODY_BYTES

    big = {"model": model_name, "prompt": "x", "user": "u" * (MAX_BODY_BYTES + 1)}
    assert_error(client.post("/v1/completions", json=big), 413, "limit")

    def chunks():  # no Content-Length: the server must count what it reads
        for _ in range(MAX_BODY_BYTES // 2**20 + 1):
            yield b" " * 2**20
        yield b"{}"
    response = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert_error(response, 413, "limit")
