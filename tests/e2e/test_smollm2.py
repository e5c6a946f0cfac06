"""Behaviour on the real embedded model: chat template, EOS, answers a 135M model gets right."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_chat_answer_ends_with_eos(smol_engine):
    prompt = smol_engine.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    assert prompt.endswith("<|im_start|>assistant\n")
    out = smol_engine.generate(prompt, {"max_new_tokens": 64, "temperature": 0})
    assert "Paris" in out["text"]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": 2}  # <|im_end|>
    assert "<|im_end|>" not in out["text"]


def test_ignore_eos_runs_to_length(smol_engine):
    prompt = smol_engine.apply_chat_template([{"role": "user", "content": "Say hi."}])
    out = smol_engine.generate(prompt, {"max_new_tokens": 48, "temperature": 0, "ignore_eos": True})
    assert out["meta_info"]["finish_reason"]["type"] == "length"
    assert out["meta_info"]["completion_tokens"] == 48


def test_repeated_prompt_hits_the_cache(smol_engine):
    prompt = "A long shared preamble about cooking pasta. " * 20 + "Question: how long to boil spaghetti?"
    first = smol_engine.generate(prompt, {"max_new_tokens": 8, "temperature": 0})
    second = smol_engine.generate(prompt, {"max_new_tokens": 8, "temperature": 0})
    assert second["meta_info"]["cached_tokens"] >= second["meta_info"]["prompt_tokens"] - 1
    assert first["output_ids"] == second["output_ids"]
