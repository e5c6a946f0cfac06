"""Tiny randomly initialised models saved as Hugging Face directories, with SmolLM2's tokenizer."""

from __future__ import annotations

import json

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from radixflow.runtime.model_source import resolve_model
from radixflow.runtime.tokenizer import load_tokenizer

GREEDY = {"temperature": 0.0}


def build_tiny_model(directory, architecture: str = "llama", **overrides):
    """Save a tiny randomly initialised HF model (with SmolLM2's tokenizer) into `directory`.

    The initialiser range is large so logits are peaked: greedy choices then have clear margins and do not flip
    on the last-bit differences between batched and unbatched matmuls.
    """
    tokenizer = load_tokenizer(resolve_model(None))
    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  initializer_range=0.3, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    common.update(overrides)
    torch.manual_seed(0)
    if architecture == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif architecture == "mistral-window":  # a real Mistral config, for its sliding window
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
