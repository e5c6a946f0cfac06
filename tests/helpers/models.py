"""Tiny randomly initialised models saved as Hugging Face directories, with SmolLM2's tokenizer."""

from __future__ import annotations

import functools
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


def build_tiny_gguf(path, linear_type, embed_type=None, hidden: int = 64, intermediate: int = 128, layers: int = 2,
                    heads: int = 4, kv_heads: int = 2, tied: bool = True, seed: int = 0):
    """Write a tiny random Llama as a GGUF file, its linear weights in `linear_type` (a `GGMLQuantizationType`)
    and the embedding in `embed_type` (default: the same), with SmolLM2's tokenizer cut to its first
    SMALL_VOCAB tokens (see _small_tokenizer_fields).
    Q and K rows are permuted as llama.cpp's converter does. Returns the dequantized weights as the file holds them
    (Q and K rows permuted), by GGUF tensor name without `.weight`. K-quant types (which the gguf package cannot
    quantize) get random blocks with sane scales."""
    import gguf
    import numpy as np
    from gguf import GGMLQuantizationType as Q

    gen = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    tokenizer_fields = _small_tokenizer_fields()
    for key, (value, kind, sub) in tokenizer_fields.items():
        writer.add_key_value(key, value, kind, sub)
    vocab = len(tokenizer_fields["tokenizer.ggml.tokens"][0])
    for key, value in {"block_count": layers, "context_length": 2048, "embedding_length": hidden,
                       "feed_forward_length": intermediate, "attention.head_count": heads,
                       "attention.head_count_kv": kv_heads, "vocab_size": vocab,
                       "rope.dimension_count": hidden // heads}.items():
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.rope.freq_base", 10000.0)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    head_dim = hidden // heads
    shapes = {"token_embd": (vocab, hidden)}
    if not tied:
        shapes["output"] = (vocab, hidden)
    for i in range(layers):
        shapes |= {f"blk.{i}.attn_q": (hidden, hidden), f"blk.{i}.attn_k": (kv_heads * head_dim, hidden),
                   f"blk.{i}.attn_v": (kv_heads * head_dim, hidden), f"blk.{i}.attn_output": (hidden, hidden),
                   f"blk.{i}.ffn_gate": (intermediate, hidden), f"blk.{i}.ffn_up": (intermediate, hidden),
                   f"blk.{i}.ffn_down": (hidden, intermediate)}
    weights = {}
    for name, shape in shapes.items():
        kind = (embed_type or linear_type) if name in ("token_embd", "output") else linear_type
        w = gen.normal(0, 0.3, size=shape).astype(np.float32)
        if name.endswith(("attn_q", "attn_k")):  # llama.cpp stores RoPE pairs interleaved
            n = heads if name.endswith("attn_q") else kv_heads
            w = w.reshape(n, 2, shape[0] // n // 2, shape[1]).swapaxes(1, 2).reshape(shape)
        if kind in (Q.F32, Q.F16, Q.Q4_0, Q.Q4_1, Q.Q8_0):
            data = gguf.quants.quantize(w, kind)
        else:
            data = _random_kquant_blocks(gen, kind, shape)
        writer.add_tensor(f"{name}.weight", data, raw_dtype=kind)
        weights[name] = torch.from_numpy(np.array(gguf.quants.dequantize(data, kind), dtype=np.float32).reshape(shape))
    for i in range(layers):
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{i}.{norm}.weight", (1 + 0.1 * gen.normal(size=hidden)).astype(np.float32))
    writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


SMALL_VOCAB = 1024


@functools.cache
def _small_tokenizer_fields() -> dict:
    """SmolLM2's GGUF tokenizer fields cut to its first SMALL_VOCAB tokens: (value, type, array element type) by key.

    Its vocabulary is 17 special tokens, the byte symbols, then one token per BPE merge in merge order, so the
    first N tokens with their merges are a complete byte-level BPE that still encodes any text. Reading
    (and, in the engine, converting) the full 49,152-token vocabulary took about 5 s per file and per load, most
    of these tests' time; the shipped file is read once per process."""
    import gguf

    source = gguf.GGUFReader(str(resolve_model(None).path))
    fields = {}
    for key, field in source.fields.items():
        if key.startswith("tokenizer."):
            fields[key] = [field.contents(), field.types[0], field.types[1] if len(field.types) > 1 else None]
    tokens, merges = fields["tokenizer.ggml.tokens"][0], fields["tokenizer.ggml.merges"][0]
    first_merged = len(tokens) - len(merges)  # 252: the specials and the byte symbols
    kept = merges[:SMALL_VOCAB - first_merged]
    assert all(tokens[first_merged + i] == merge.replace(" ", "") for i, merge in enumerate(kept))
    fields["tokenizer.ggml.tokens"][0] = tokens[:SMALL_VOCAB]
    fields["tokenizer.ggml.token_type"][0] = fields["tokenizer.ggml.token_type"][0][:SMALL_VOCAB]
    fields["tokenizer.ggml.merges"][0] = kept
    return {key: tuple(value) for key, value in fields.items()}


def _random_kquant_blocks(gen, kind, shape):
    """Random K-quant blocks whose fp16 super-block scales are small and finite (random bytes would hold NaNs)."""
    import gguf
    import numpy as np

    block_size, type_size = gguf.GGML_QUANT_SIZES[kind]
    rows, cols = shape
    blocks = gen.integers(0, 256, size=(rows, cols // block_size, type_size), dtype=np.uint8)
    scales = gen.uniform(0.001, 0.01, size=(rows, cols // block_size, 2)).astype(np.float16).view(np.uint8)
    if kind == gguf.GGMLQuantizationType.Q6_K:  # d is the block's last two bytes; its 16 scales are signed bytes
        blocks[..., -2:] = scales[..., :2]
    else:  # Q4_K, Q5_K: d and dmin lead the block
        blocks[..., :4] = scales.reshape(rows, cols // block_size, 4)
    return blocks.reshape(rows, -1)
