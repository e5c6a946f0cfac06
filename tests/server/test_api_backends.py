"""The API-model backends (`sgl.OpenAI` in completion and chat mode, `sgl.Anthropic`) against a real radixflow
server on the tiny random model: real SDKs, real round trips. The model's text is noise, so the checks are of
mechanism: what each call sends and counts, scoring that agrees with the native API's, constraints that hold,
errors that carry the server's message."""

from __future__ import annotations

import json
import re
import warnings

import pytest

import radixflow as sgl
from radixflow.backends.api.base import APIBackendError, UnsupportedFeatureError

QUESTION = "Q: What is the capital of France?\nA: "


@pytest.fixture(scope="module")
def completion(tiny_server, model_name):
    return sgl.OpenAI(model_name, is_chat_model=False, base_url=f"{tiny_server.url}/v1", api_key="none",
                      sglang_extensions=True)


@pytest.fixture(scope="module")
def chat(tiny_server, model_name):
    return sgl.OpenAI(model_name, base_url=f"{tiny_server.url}/v1", api_key="none")


@pytest.fixture(scope="module")
def claude(tiny_server, model_name):
    return sgl.Anthropic(model_name, base_url=tiny_server.url, api_key="none", max_retries=0)


@sgl.function
def few_shot(s, question):
    s += "Q: 1+1?\nA: 2\nQ: 2+2?\nA: 4\n"
    s += "Q: " + question + "\nA:" + sgl.gen("answer", stop="\n", max_tokens=6)
    s += "\nQ: 3+3?\nA:" + sgl.gen("second", max_tokens=4)


@sgl.function
def conversation(s, question):
    s += sgl.system("You are terse.")
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=8))
    s += sgl.user("And then?")
    s += sgl.assistant(sgl.gen("more", max_tokens=8))


def test_completion_mode_sends_the_text_and_counts_tokens(completion, client):
    completion.token_usage.reset()
    state = few_shot.run(question="5+5?", temperature=0, backend=completion)
    assert state.error() is None
    native = client.post("/generate", json={"text": "Q: 1+1?\nA: 2\nQ: 2+2?\nA: 4\nQ: 5+5?\nA:", "sampling_params": {
        "max_new_tokens": 6, "stop": ["\n"], "temperature": 0}}).json()
    assert state["answer"] == native["text"]  # the program's text, sent as a completion prompt
    usage = completion.token_usage
    assert usage.calls == 2 and usage.prompt_tokens > 20 and 0 < usage.completion_tokens <= 10
    assert usage.cached_tokens > 0  # the second call's prompt extends the first's: a radix hit
    samples = few_shot.run(question="5+5?", n=1, backend=completion, temperature=1.0)
    assert isinstance(samples["answer"], str)


@pytest.mark.parametrize("method", [sgl.token_length_normalized, sgl.greedy_token_selection,
                                    sgl.unconditional_likelihood_normalized], ids=lambda m: type(m).__name__)
def test_select_on_a_completion_model_scores_like_the_native_api(completion, tiny_server, method):
    @sgl.function
    def capital(s):
        s += QUESTION + sgl.select("city", ["Paris", "London", "Berlin"], choices_method=method)

    by_api = capital.run(backend=completion)
    by_native = capital.run(backend=sgl.RuntimeEndpoint(tiny_server.url))
    assert by_api["city"] == by_native["city"]
    api_meta, native_meta = by_api.get_meta_info("city"), by_native.get_meta_info("city")
    assert api_meta["normalized_prompt_logprobs"] == pytest.approx(native_meta["normalized_prompt_logprobs"],
                                                                   abs=1e-3)
    # The healed boundary: " Paris" (with the prefix's trailing space) is one scored token on both sides.
    assert [[t for *_, t in row] for row in api_meta["input_token_logprobs"]] == \
        [[t for *_, t in row] for row in native_meta["input_token_logprobs"]]


def test_regex_and_dtype_through_sglang_extensions(completion, chat):
    @sgl.function
    def typed(s):
        s += "Number: " + sgl.gen("n", dtype=int, max_tokens=4) + "\nCode: " + sgl.gen("code", regex=r"[A-Z]{3}")

    state = typed.run(backend=completion, temperature=0)
    assert re.fullmatch(r"[-+]?[0-9]+", state["n"]) and re.fullmatch(r"[A-Z]{3}", state["code"])
    plain = sgl.OpenAI(chat.model_name, is_chat_model=False, base_url=str(chat.client.base_url), api_key="none")
    with pytest.warns(RuntimeWarning, match="primitive failed"):
        state = typed.run(backend=plain)
    assert isinstance(state.error(), UnsupportedFeatureError) and "regex" in str(state.error())


def test_chat_mode_sends_the_conversation(chat, client, tokenizer):
    chat.token_usage.reset()
    state = conversation.run(question="Why?", temperature=0, backend=chat)
    assert state.error() is None and chat.token_usage.calls == 2
    messages = state.messages()
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    # The second answer is what the chat endpoint gives for the whole conversation so far.
    prompt = tokenizer.apply_chat_template(messages[:4], tokenize=False, add_generation_prompt=True)
    native = client.post("/generate", json={"text": prompt, "sampling_params": {"max_new_tokens": 8,
                                                                                "temperature": 0}}).json()
    assert state["more"] == native["text"]
    streamed = conversation.run(question="Why?", temperature=0, backend=chat, stream=True)
    assert "".join(streamed.text_iter()) == state.text()


def test_json_schema_and_select_on_a_chat_model(chat, claude):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}},
              "required": ["city"], "additionalProperties": False}

    @sgl.function
    def extract(s):
        s += sgl.user("Paris is in France.")
        s += sgl.assistant(sgl.gen("city", json_schema=schema, max_tokens=32))
        s += sgl.user("Is it big?")
        s += sgl.assistant(sgl.select("verdict", ["yes", "no", "maybe"]))

    for backend in (chat, claude):
        state = extract.run(backend=backend, temperature=0)
        assert state.error() is None, state.error()
        assert set(json.loads(state["city"])) == {"city"}
        assert state["verdict"] in ("yes", "no", "maybe")
        assert state.get_meta_info("verdict")["method"] == "structured_output"


def test_a_partial_assistant_turn(chat, claude, tiny_server, model_name):
    @sgl.function
    def partial(s):
        s += sgl.user("Describe a river.")
        s += sgl.assistant("The river is" + sgl.gen("rest", max_tokens=6))

    continued = partial.run(backend=claude, temperature=0)  # Anthropic continues a prefill
    extended = sgl.OpenAI(model_name, base_url=f"{tiny_server.url}/v1", api_key="none", sglang_extensions=True)
    assert partial.run(backend=extended, temperature=0)["rest"] == continued["rest"]  # continue_final_message
    with pytest.warns(RuntimeWarning, match="cannot continue a partial assistant message"):
        dropped = partial.run(backend=chat, temperature=0)  # as SGLang: the partial text is left out
    assert dropped.error() is None


def test_anthropic_maps_stops_samples_and_usage(claude):
    @sgl.function
    def sampled(s):
        s += sgl.user("Count.")
        s += sgl.assistant(sgl.gen("x", max_tokens=6, n=2, temperature=1.0))

    claude.token_usage.reset()
    state = sampled.run(backend=claude)
    assert len(state["x"]) == 2 and claude.token_usage.calls == 2  # the Messages API has no n: a call each
    assert claude.token_usage.prompt_tokens > 0 and claude.token_usage.completion_tokens <= 12

    @sgl.function
    def regex(s):
        s += sgl.user("Count.")
        s += sgl.assistant(sgl.gen("x", regex="[0-9]+"))

    with pytest.warns(RuntimeWarning, match="primitive failed"):
        state = regex.run(backend=claude)
    assert isinstance(state.error(), UnsupportedFeatureError)
    assert "regex" in str(state.error()) and "Anthropic" in str(state.error())


def test_errors_carry_the_servers_message(tiny_server):
    wrong = sgl.OpenAI("gpt-17", base_url=f"{tiny_server.url}/v1", api_key="none", max_retries=0)
    with pytest.warns(RuntimeWarning, match="primitive failed"):
        state = conversation.run(question="?", backend=wrong)
    error = state.error()
    assert isinstance(error, APIBackendError) and error.status == 404
    assert "'gpt-17' does not exist" in str(error) and "OpenAI('gpt-17')" in str(error)
    claude = sgl.Anthropic("claude-17", base_url=tiny_server.url, api_key="none", max_retries=0)
    with pytest.warns(RuntimeWarning, match="primitive failed"):
        state = conversation.run(question="?", backend=claude)
    assert state.error().status == 404 and "claude-17" in str(state.error())


def test_an_image_reaches_the_server_which_refuses_it_by_name(chat, claude, tmp_path):
    image = tmp_path / "dot.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n")

    @sgl.function
    def look(s):
        s += sgl.user(sgl.image(str(image)) + "What is it?")
        s += sgl.assistant(sgl.gen("answer", max_tokens=4))

    for backend, says in ((chat, "only text parts are supported"), (claude, "messages.0.content.0: image blocks")):
        with warnings.catch_warnings(), pytest.warns(RuntimeWarning, match="primitive failed"):
            state = look.run(backend=backend)
        assert state.error().status == 400 and says in str(state.error()), state.error()


def test_select_on_an_endpoint_without_prompt_logprobs_says_so():
    """llama-server ignores `echo`: its completions carry no prompt logprobs, and `select` must say it needs them
    rather than fail on a missing field. (A stand-in transport: llama-server is not a test dependency.)"""
    import httpx
    import openai

    def handler(request: httpx.Request) -> httpx.Response:
        prompts = json.loads(request.content)["prompt"]
        return httpx.Response(200, json={
            "id": "c", "object": "text_completion", "created": 0, "model": "m",
            "choices": [{"index": i, "text": "", "finish_reason": "length", "logprobs": None}
                        for i, _ in enumerate(prompts)],
            "usage": {"prompt_tokens": 1, "completion_tokens": 0, "total_tokens": 1}})

    backend = sgl.OpenAI("m", is_chat_model=False, base_url="http://llama-server.invalid/v1", api_key="none",
                         http_client=httpx.Client(transport=httpx.MockTransport(handler)))
    assert isinstance(backend.client, openai.OpenAI)

    @sgl.function
    def pick(s):
        s += "Q: yes or no?\nA:" + sgl.select("answer", choices=[" yes", " no"])

    with pytest.warns(RuntimeWarning, match="primitive failed"):
        state = pick.run(backend=backend)
    assert isinstance(state.error(), APIBackendError) and "prompt's token logprobs" in str(state.error())
