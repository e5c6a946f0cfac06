"""Shared fixtures: a tiny random Llama saved as a Hugging Face directory (fast), and the embedded SmolLM2."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)


def build_tiny_model(directory, architecture: str = "llama", **overrides):
    """Save a tiny randomly initialised HF model (with SmolLM2's tokenizer) into `directory`.

    The initialiser range is large so logits are peaked: greedy choices then have clear margins and do not flip
    on the last-bit differences between batched and unbatched matmuls.
    """
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from radixflow.runtime.model.loader import resolve_model
    from radixflow.runtime.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(resolve_model(None))
    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  initializer_range=0.3, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    common.update(overrides)
    torch.manual_seed(0)
    if architecture == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif architecture == "mistral-window":  # a real Mistral config, for its sliding window
        from transformers import MistralConfig, MistralForCausalLM

        model = MistralForCausalLM(MistralConfig(**common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
        if architecture == "mistral":
            model.config.architectures = ["MistralForCausalLM"]
    model.save_pretrained(str(directory), safe_serialization=True)
    if architecture == "mistral":
        config = json.loads((directory / "config.json").read_text())
        config["architectures"] = ["MistralForCausalLM"]
        (directory / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def tiny_engine(tiny_model_dir):
    from radixflow import Engine

    engine = Engine(model_path=str(tiny_model_dir), max_total_tokens=8192, chunked_prefill_size=64)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def smol_engine():
    from radixflow import Engine

    engine = Engine(max_total_tokens=16384)
    yield engine
    engine.shutdown()


GREEDY = {"temperature": 0.0}
