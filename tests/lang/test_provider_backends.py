"""The backends for providers that cannot run here (Gemini through `google-genai`, LiteLLM), and the SDKs' retries,
against a loopback fake of each provider's documented wire format that records the requests: well-formed requests,
role / stop / sampling / schema / image mapping, streaming, errors that carry the provider's message, retries."""

from __future__ import annotations

import base64

import pytest

import radixflow as sgl
from radixflow.backends.api.base import APIBackendError
from tests.helpers.fake_provider import FakeProvider

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


@sgl.function
def chat_program(s):
    s += sgl.system("You are terse.")
    s += sgl.user("Hello")
    s += sgl.assistant("Hi.")
    s += sgl.user("Name a city.")
    s += sgl.assistant(sgl.gen("city", max_tokens=12, stop=["\n", "."], temperature=0.5, top_p=0.9))


def gemini_answer(text: str, finish: str = "STOP") -> dict:
    return {"candidates": [{"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": finish,
                            "index": 0}],
            "usageMetadata": {"promptTokenCount": 11, "candidatesTokenCount": 3, "totalTokenCount": 14,
                              "cachedContentTokenCount": 4}}


@pytest.fixture
def gemini_fake():
    def answer(path, body):
        if ":streamGenerateContent" in path:
            return 200, [gemini_answer("Ro"), gemini_answer("me")]
        return 200, gemini_answer("Rome")

    fake = FakeProvider(answer)
    yield fake
    fake.close()


def gemini(fake: FakeProvider, **kwargs):
    return sgl.VertexAI("gemini-test", api_key="g-key", http_options={"base_url": fake.url}, **kwargs)


def test_gemini_request_maps_roles_system_stops_and_sampling(gemini_fake):
    backend = gemini(gemini_fake)
    state = chat_program.run(backend=backend)
    assert state["city"] == "Rome"
    [request] = gemini_fake.requests
    assert request.path.endswith("/models/gemini-test:generateContent")
    assert request.headers["x-goog-api-key"] == "g-key"
    body = request.body
    assert body["systemInstruction"]["parts"] == [{"text": "You are terse."}]
    assert [(c["role"], c["parts"][0]["text"]) for c in body["contents"]] == [
        ("user", "Hello"), ("model", "Hi."), ("user", "Name a city.")]
    config = body["generationConfig"]
    assert config["maxOutputTokens"] == 12 and config["stopSequences"] == ["\n", "."]
    assert config["temperature"] == 0.5 and config["topP"] == 0.9 and config["candidateCount"] == 1
    usage = backend.token_usage
    assert (usage.calls, usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens) == (1, 11, 3, 4)


def test_gemini_schema_images_and_streaming(gemini_fake, tmp_path):
    image = tmp_path / "dot.png"
    image.write_bytes(b"\x89PNG dot")

    @sgl.function
    def program(s):
        s += sgl.user(sgl.image(str(image)) + "Which city?")
        s += sgl.assistant(sgl.gen("city", json_schema=SCHEMA))

    backend = gemini(gemini_fake)
    program.run(backend=backend)
    body = gemini_fake.requests[-1].body
    parts = body["contents"][0]["parts"]
    inline = parts[0]["inlineData"]
    assert inline["data"] == base64.b64encode(b"\x89PNG dot").decode()
    assert (inline.get("mimeType") or inline.get("mime_type")) == "image/png"  # the API takes either spelling
    assert parts[1] == {"text": "Which city?"}
    assert body["generationConfig"]["responseMimeType"] == "application/json"
    assert body["generationConfig"]["responseJsonSchema"] == SCHEMA
    state = chat_program.run(backend=backend, stream=True)
    assert list(state.text_iter("city")) == ["Ro", "me"]
    assert "streamGenerateContent" in gemini_fake.requests[-1].path


def test_gemini_errors_carry_the_providers_message_and_5xx_is_retried(gemini_fake):
    gemini_fake.fail_next(400, {"error": {"code": 400, "message": "API key not valid.", "status": "INVALID_ARGUMENT"}})
    with pytest.warns(RuntimeWarning, match="primitive failed"):
        state = chat_program.run(backend=gemini(gemini_fake))
    assert isinstance(state.error(), APIBackendError) and state.error().status == 400
    assert "API key not valid." in str(state.error()) and len(gemini_fake.requests) == 1  # a 400 is not retried
    gemini_fake.fail_next(503, {"error": {"code": 503, "message": "overloaded", "status": "UNAVAILABLE"}}, times=2)
    assert chat_program.run(backend=gemini(gemini_fake, max_retries=2))["city"] == "Rome"
    assert len(gemini_fake.requests) == 4  # 1 + two failures + the answer
    gemini_fake.fail_next(429, {"error": {"code": 429, "message": "quota", "status": "RESOURCE_EXHAUSTED"}})
    with pytest.warns(RuntimeWarning, match="primitive failed"):
        state = chat_program.run(backend=gemini(gemini_fake, max_retries=0))
    assert state.error().status == 429 and "quota" in str(state.error())


def openai_answer(text: str) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "fake-model",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}}


@pytest.fixture
def openai_fake():
    def answer(path, body):
        if body.get("stream"):
            chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "fake-model"}
            return 200, [{**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": piece},
                                                "finish_reason": None}]} for piece in ("Li", "ma")] + [
                {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}]
        return 200, openai_answer("Lima")

    fake = FakeProvider(answer)
    yield fake
    fake.close()


def test_litellm_sends_openai_format_and_retries(openai_fake):
    backend = sgl.LiteLLM("openai/fake-model", base_url=f"{openai_fake.url}/v1", api_key="l-key", max_retries=2)
    assert chat_program.run(backend=backend)["city"] == "Lima"
    request = openai_fake.requests[0]
    assert request.path == "/v1/chat/completions" and request.headers["authorization"] == "Bearer l-key"
    assert request.body["model"] == "fake-model" and request.body["stop"] == ["\n", "."]
    assert request.body["max_tokens"] == 12 and request.body["temperature"] == 0.5
    assert [m["role"] for m in request.body["messages"]] == ["system", "user", "assistant", "user"]
    assert backend.token_usage.calls == 1 and backend.token_usage.prompt_tokens == 9
    openai_fake.fail_next(429, {"error": {"message": "slow down", "type": "rate_limit_error"}})
    assert chat_program.run(backend=backend)["city"] == "Lima"
    assert len(openai_fake.requests) == 3
    streamed = chat_program.run(backend=backend, stream=True)
    assert list(streamed.text_iter("city")) == ["Li", "ma"]
    openai_fake.fail_next(400, {"error": {"message": "bad stop", "type": "invalid_request_error"}})
    with pytest.warns(RuntimeWarning, match="primitive failed"):
        state = chat_program.run(backend=backend)
    assert isinstance(state.error(), APIBackendError) and "bad stop" in str(state.error())


def test_the_openai_sdk_retries_5xx_and_reports_the_last_failure(openai_fake):
    backend = sgl.OpenAI("fake-model", base_url=f"{openai_fake.url}/v1", api_key="o-key", max_retries=2)
    openai_fake.fail_next(500, {"error": {"message": "boom", "type": "server_error"}}, times=2)
    assert chat_program.run(backend=backend)["city"] == "Lima" and len(openai_fake.requests) == 3
    body = openai_fake.requests[-1].body
    assert body["max_completion_tokens"] == 12 and body["stop"] == ["\n", "."] and body["top_p"] == 0.9
    impatient = sgl.OpenAI("fake-model", base_url=f"{openai_fake.url}/v1", api_key="o-key", max_retries=0)
    openai_fake.fail_next(503, {"error": {"message": "overloaded", "type": "server_error"}})
    with pytest.warns(RuntimeWarning, match="primitive failed"):
        state = chat_program.run(backend=impatient)
    assert state.error().status == 503 and "overloaded" in str(state.error())


def test_the_anthropic_sdk_retries_429():
    def answer(path, body):
        return 200, {"id": "msg_1", "type": "message", "role": "assistant", "model": body["model"],
                     "content": [{"type": "text", "text": "Oslo"}], "stop_reason": "stop_sequence",
                     "stop_sequence": ".", "usage": {"input_tokens": 7, "output_tokens": 1}}

    fake = FakeProvider(answer)
    try:
        backend = sgl.Anthropic("claude-test", base_url=fake.url, api_key="a-key", max_retries=1)
        fake.fail_next(429, {"type": "error", "error": {"type": "rate_limit_error", "message": "slow"}})
        state = chat_program.run(backend=backend)
        assert state["city"] == "Oslo" and state.get_meta_info("city")["finish_reason"]["matched"] == "."
        headers = fake.requests[1].headers  # this SDK sends the key as a bearer token; older ones as x-api-key
        sent = {headers.get("x-api-key"), headers.get("authorization")}
        assert len(fake.requests) == 2 and sent & {"a-key", "Bearer a-key"}
        body = fake.requests[1].body
        assert body["system"] == "You are terse." and body["stop_sequences"] == ["\n", "."]
        assert body["temperature"] == 0.5 and body["top_p"] == 0.9 and "top_k" not in body
        assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    finally:
        fake.close()
