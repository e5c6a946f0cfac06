"""The OpenAI API through the real `openai` Python SDK, on the tiny random model.

The model's text is noise, so correctness is checked by consistency: greedy streaming equals greedy
non-streaming, a stop string cuts a known greedy output at a known place, token counts add up.
"""

from __future__ import annotations

import openai
import pytest

GREEDY = {"temperature": 0.0}
NO_EOS = {"extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def sdk(tiny_server):
    return openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="unused", timeout=30, max_retries=0)


def test_models_lists_the_served_model(sdk, model_name, tiny_model_dir):
    models = sdk.models.list().data
    assert [m.id for m in models] == [model_name]
    assert model_name == tiny_model_dir.name  # default served name: the model directory's name


def test_completion_greedy_is_deterministic_and_counts_tokens(sdk, model_name):
    first = sdk.completions.create(model=model_name, prompt="The quick brown fox", max_tokens=12, **GREEDY, **NO_EOS)
    second = sdk.completions.create(model=model_name, prompt="The quick brown fox", max_tokens=12, **GREEDY, **NO_EOS)
    choice = first.choices[0]
    assert choice.text and choice.text == second.choices[0].text
    assert choice.finish_reason == "length"
    assert first.object == "text_completion" and first.model == model_name
    assert first.usage.completion_tokens == 12
    assert first.usage.total_tokens == first.usage.prompt_tokens + 12


def test_completion_stream_equals_non_stream(sdk, model_name):
    kwargs = dict(model=model_name, prompt="Streaming should not change", max_tokens=16, **GREEDY, **NO_EOS)
    full = sdk.completions.create(**kwargs).choices[0].text
    chunks = list(sdk.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks) == full
    assert len(chunks) > 1  # streamed, not one chunk at the end
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_completion_n_samples(sdk, model_name):
    out = sdk.completions.create(model=model_name, prompt="Sample me", n=3, max_tokens=6, temperature=1.0,
                                 seed=7, **NO_EOS)
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in out.choices)
    assert out.usage.completion_tokens == 18
    single = sdk.completions.create(model=model_name, prompt="Sample me", max_tokens=1)
    assert out.usage.prompt_tokens == single.usage.prompt_tokens  # the shared prompt is counted once


def test_chat_n_samples(sdk, model_name):
    out = sdk.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "hi"}], n=2,
                                      max_tokens=4, seed=3, **NO_EOS)
    assert [c.index for c in out.choices] == [0, 1]
    assert all(c.finish_reason == "length" and c.message.content for c in out.choices)
    assert out.usage.completion_tokens == 8


def test_chat_n_samples_stream(sdk, model_name):
    stream = sdk.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "hi"}], n=2,
                                         max_tokens=5, stream=True, stream_options={"include_usage": True}, **NO_EOS)
    texts, finish = {0: "", 1: ""}, {}
    usage = None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert finish == {0: "length", 1: "length"}
    assert all(texts.values())
    assert usage.completion_tokens == 10


def test_completion_stop_string_cuts_the_greedy_output(sdk, model_name):
    kwargs = dict(model=model_name, prompt="Stop somewhere in here", max_tokens=24, **GREEDY, **NO_EOS)
    full = sdk.completions.create(**kwargs).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip(), f"pick another prompt: {full!r}"
    cut = sdk.completions.create(stop=[stop], **kwargs).choices[0]
    assert cut.text == full[:full.index(stop)]
    assert cut.finish_reason == "stop"
    streamed = list(sdk.completions.create(stop=stop, stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in streamed) == cut.text
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_chat_stop_string(sdk, model_name):
    kwargs = dict(model=model_name, messages=[{"role": "user", "content": "Tell me"}], max_tokens=20, **GREEDY,
                  **NO_EOS)
    full = sdk.chat.completions.create(**kwargs).choices[0].message.content
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip(), f"pick another prompt: {full!r}"
    cut = sdk.chat.completions.create(stop=[stop], **kwargs).choices[0]
    assert cut.message.content == full[:full.index(stop)]
    assert cut.finish_reason == "stop"


def test_completion_logprobs(sdk, model_name):
    out = sdk.completions.create(model=model_name, prompt="Log my probs", max_tokens=5, logprobs=2, **GREEDY,
                                 **NO_EOS).choices[0]
    lp = out.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == out.text
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0
        assert len(top) == 2
        # Greedy picks the most likely token, so it is the first of the top two, with the same logprob.
        best = max(top, key=top.get)
        assert best == token and top[best] == pytest.approx(logprob, abs=1e-5)


def test_chat_logprobs(sdk, model_name):
    kwargs = dict(model=model_name, messages=[{"role": "user", "content": "Log my chat"}], max_tokens=4,
                  logprobs=True, top_logprobs=2, **GREEDY, **NO_EOS)
    choice = sdk.chat.completions.create(**kwargs).choices[0]
    content = choice.logprobs.content
    assert len(content) == 4
    assert "".join(t.token for t in content) == choice.message.content
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert bytes(entry.bytes).decode() == entry.token
    streamed = [t for chunk in sdk.chat.completions.create(stream=True, **kwargs) for c in chunk.choices
                if c.logprobs for t in c.logprobs.content]
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == [(t.token, round(t.logprob, 4)) for t in content]


def test_repeated_prompt_reports_cached_tokens(sdk, model_name):
    prompt = "A prompt long enough to be worth caching: " + "one two three four five six seven eight " * 4
    first = sdk.completions.create(model=model_name, prompt=prompt, max_tokens=2)
    second = sdk.completions.create(model=model_name, prompt=prompt, max_tokens=2)
    assert second.usage.prompt_tokens == first.usage.prompt_tokens > 40
    assert first.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens_details.cached_tokens
    # Everything but the last prompt token (which must be run to get logits) comes from the radix cache.
    assert second.usage.prompt_tokens_details.cached_tokens == second.usage.prompt_tokens - 1

    chat_messages = [{"role": "system", "content": prompt}, {"role": "user", "content": "again"}]
    sdk.chat.completions.create(model=model_name, messages=chat_messages, max_tokens=2)
    chat = sdk.chat.completions.create(model=model_name, messages=chat_messages, max_tokens=2)
    assert chat.usage.prompt_tokens_details.cached_tokens == chat.usage.prompt_tokens - 1


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_stream_include_usage(sdk, model_name, endpoint):
    if endpoint == "completions":
        stream = sdk.completions.create(model=model_name, prompt="usage please", max_tokens=7, stream=True,
                                        stream_options={"include_usage": True}, **NO_EOS)
    else:
        stream = sdk.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "usage"}],
                                             max_tokens=7, stream=True, stream_options={"include_usage": True},
                                             **NO_EOS)
    chunks = list(stream)
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 7
    assert last.usage.total_tokens == last.usage.prompt_tokens + 7
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_non_stream_and_stream_agree(sdk, model_name):
    kwargs = dict(model=model_name, messages=[{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": "Hello there"}], max_tokens=10, **GREEDY,
                  **NO_EOS)
    full = sdk.chat.completions.create(**kwargs)
    assert full.object == "chat.completion"
    assert full.choices[0].message.role == "assistant"
    chunks = list(sdk.chat.completions.create(stream=True, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_unknown_model_is_not_found(sdk):
    with pytest.raises(openai.NotFoundError) as err:
        sdk.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    assert "no-such-model" in err.value.message
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
