"""The server on the real embedded SmolLM2-135M-Instruct: answers that mean something, through the OpenAI SDK."""

from __future__ import annotations

import openai
import pytest

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smol(smol_server):
    sdk = openai.OpenAI(base_url=f"{smol_server.url}/v1", api_key="unused", timeout=60, max_retries=0)
    return sdk, sdk.models.list().data[0].id


def test_chat_answers_and_ends_at_eos(smol):
    sdk, model = smol
    out = sdk.chat.completions.create(model=model, messages=QUESTION, max_tokens=48, temperature=0)
    answer = out.choices[0].message.content
    assert "Paris" in answer
    assert out.choices[0].finish_reason == "stop"  # the model's <|im_end|>, which is not in the text
    assert "<|im_end|>" not in answer
    streamed = sdk.chat.completions.create(model=model, messages=QUESTION, max_tokens=48, temperature=0,
                                           stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == answer


def test_stop_string_on_real_text(smol):
    sdk, model = smol
    out = sdk.chat.completions.create(model=model, messages=QUESTION, max_tokens=48, temperature=0, stop=["Paris"])
    choice = out.choices[0]
    assert choice.finish_reason == "stop"
    assert "Paris" not in choice.message.content and choice.message.content.strip()
