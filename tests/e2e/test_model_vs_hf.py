"""Our model against Hugging Face transformers' implementation on the same weights.

Tolerance: prompt logprobs (log-softmax of the logits, every position) agree within 2e-3 absolute on the tiny
models and 2e-2 on SmolLM2 (30 layers of fp32 with different op order and fused matmuls); greedy continuations
are identical.
"""

from __future__ import annotations

import pytest
import torch

from radixflow import Engine
from tests.helpers.models import GREEDY, build_tiny_model

PROMPT = "The quick brown fox jumps over the lazy dog. In the beginning there was"


def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def our_prompt_logprobs(engine: Engine, ids: list[int]) -> list[float]:
    out = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 1, **GREEDY}, return_logprob=True,
                          logprob_start_len=0)
    lps = out["meta_info"]["input_token_logprobs"]
    assert lps[0][0] is None and len(lps) == len(ids)
    return [lp for lp, _, _ in lps[1:]]


def assert_logprobs_close(engine: Engine, hf, ids: list[int], tolerance: float) -> None:
    expected = hf_logprobs(hf, ids)
    ours = our_prompt_logprobs(engine, ids)
    reference = [float(expected[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert max(abs(a - b) for a, b in zip(ours, reference)) < tolerance


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "mistral"])
def test_tiny_model_matches_transformers(tmp_path, architecture):
    from transformers import AutoModelForCausalLM

    directory = build_tiny_model(tmp_path / architecture, architecture)
    hf = AutoModelForCausalLM.from_pretrained(str(directory), torch_dtype=torch.float32).eval()
    engine = Engine(model_path=str(directory), max_total_tokens=4096)
    try:
        ids = engine.tokenizer.encode(PROMPT)
        assert_logprobs_close(engine, hf, ids, 2e-3)
        out = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 24, "ignore_eos": True, **GREEDY})
        assert out["output_ids"] == hf_greedy(hf, ids, 24)
    finally:
        engine.shutdown()


@pytest.mark.parametrize("chunk", [512, 16])
def test_mistral_sliding_window_matches_transformers(tmp_path, chunk):
    """A window of 8 on a 60-token prompt: the fresh prompt, chunks of 16 (each attending to part of the one
    before), decodes, and a second request behind the cached prompt all see only the last 8 keys."""
    from transformers import AutoModelForCausalLM

    directory = build_tiny_model(tmp_path / "mistral", "mistral-window", sliding_window=8)
    hf = AutoModelForCausalLM.from_pretrained(str(directory), torch_dtype=torch.float32).eval()
    assert hf.config.sliding_window == 8
    engine = Engine(model_path=str(directory), max_total_tokens=4096, chunked_prefill_size=chunk)
    try:
        assert engine.core.loaded.args.sliding_window == 8
        ids = engine.tokenizer.encode(PROMPT)[:12] * 5
        assert_logprobs_close(engine, hf, ids, 2e-3)
        out = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 24, "ignore_eos": True, **GREEDY})
        assert out["output_ids"] == hf_greedy(hf, ids, 24)
        longer = ids + out["output_ids"][:10]  # hits the cache for the prompt, then extends and decodes
        again = engine.generate(input_ids=[longer, ids], sampling_params={"max_new_tokens": 8, "ignore_eos": True,
                                                                           **GREEDY})
        assert again[0]["meta_info"]["cached_tokens"] >= len(ids) - 1
        assert again[0]["output_ids"] == hf_greedy(hf, longer, 8)
        assert again[1]["output_ids"] == out["output_ids"][:8]
    finally:
        engine.shutdown()


def test_qwen2_per_layer_sliding_window_is_refused():
    from radixflow.runtime.model.llama import ModelArgs

    cfg = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
           "num_hidden_layers": 1, "num_attention_heads": 2, "use_sliding_window": True}
    with pytest.raises(ValueError, match="use_sliding_window"):
        ModelArgs.from_hf_config(cfg)
    assert ModelArgs.from_hf_config({**cfg, "use_sliding_window": False}).sliding_window is None


def test_llama3_rope_scaling_matches_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 500000.0}
    directory = build_tiny_model(tmp_path / "llama3", rope_scaling=scaling, rope_theta=500000.0)
    hf = AutoModelForCausalLM.from_pretrained(str(directory), torch_dtype=torch.float32).eval()
    engine = Engine(model_path=str(directory), max_total_tokens=4096)
    try:
        ids = engine.tokenizer.encode(PROMPT * 6)  # long enough for the low-frequency bands to matter
        assert_logprobs_close(engine, hf, ids, 2e-3)
    finally:
        engine.shutdown()


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers():
    """The dequantized path (`weight_format="fp32"`) is transformers' model; the default int4 decode path is
    held to it in test_int4.py."""
    from transformers import AutoModelForCausalLM

    from radixflow.runtime.model_source import resolve_model

    path = resolve_model(None).path
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, torch_dtype=torch.float32).eval()
    with Engine(max_total_tokens=4096, weight_format="fp32") as engine:
        ids = engine.tokenizer.encode("The capital of France is Paris. The capital of Germany is")
        assert_logprobs_close(engine, hf, ids, 2e-2)
        out = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 32, "ignore_eos": True, **GREEDY})
        assert out["output_ids"] == hf_greedy(hf, ids, 32)
