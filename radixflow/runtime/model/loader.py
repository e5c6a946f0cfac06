"""Find and read model weights: a GGUF file or a Hugging Face style directory.

Both paths produce Hugging Face-named fp32 (or `dtype`) tensors and a `ModelArgs`; the model module fuses them.
GGUF tensors are dequantized with the `gguf` package; the linear weights stored as Q4_0, Q4_1 or Q8_0 are also
decoded into 4-bit groups (`quant.py`) for the int4 kernel. llama.cpp's converter permutes the rows of the Q and K
projections (it stores RoPE pairs interleaved); `_unpermute` restores the Hugging Face rotate-half layout.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf.quants import dequantize
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from radixflow.runtime.model.llama import ModelArgs
from radixflow.runtime.model.quant import INT4_TYPES, Int4Groups, int4_groups
from radixflow.runtime.model_source import ModelLoadError, ModelSource, cache_dir, publish_cache_dir

logger = logging.getLogger(__name__)

_GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}

_GGUF_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


@dataclass
class Checkpoint:
    args: ModelArgs
    weights: dict[str, torch.Tensor]  # Hugging Face names, in the requested dtype
    int4: dict[str, Int4Groups] = field(default_factory=dict)  # the linear weights a GGUF stores in 4-bit groups


def load_weights(source: ModelSource, dtype: torch.dtype) -> Checkpoint:
    if source.kind == "hf":
        return _load_hf_dir(source.path, dtype)
    # Parsing GGUF metadata and dequantizing take seconds in pure Python; the result is cached as safetensors so
    # later starts (every test, every server launch) load in about a second.
    cached = cache_dir(source, "gguf-weights-v2")
    if (cached / "config.json").exists():
        checkpoint = _load_hf_dir(cached, dtype)
        checkpoint.int4 = _load_int4(cached / _INT4_FILE)
        return checkpoint
    config, weights, int4 = _load_gguf(source.path)
    _save_converted(cached, config, weights, int4)
    return Checkpoint(ModelArgs.from_hf_config(config), {k: v.to(dtype) for k, v in weights.items()}, int4)


_INT4_FILE = "int4.safetensors"


def _save_converted(directory: Path, config: dict, weights: dict[str, torch.Tensor],
                    int4: dict[str, Int4Groups]) -> None:
    def write(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"))
        tensors, repeats = {}, {}
        for name, g in int4.items():
            tensors |= {f"{name}.codes": g.codes[:, 0::2] | (g.codes[:, 1::2] << 4),  # two codes a byte
                        f"{name}.scales": g.scales, f"{name}.zeros": g.zeros}
            repeats[name] = str(g.repeat)
        if tensors:  # safetensors cannot read back a file with no tensors
            save_file(tensors, str(tmp / _INT4_FILE), metadata=repeats)
        (tmp / "config.json").write_text(json.dumps(config))

    publish_cache_dir(directory, write)


def _load_int4(path: Path) -> dict[str, Int4Groups]:
    if not path.exists():
        return {}
    with safe_open(str(path), "pt") as f:
        repeats = f.metadata() or {}
        out = {}
        for name, repeat in repeats.items():
            pairs = f.get_tensor(f"{name}.codes")
            codes = torch.stack([pairs & 0x0F, pairs >> 4], dim=-1).reshape(pairs.shape[0], -1)
            out[name] = Int4Groups(codes, f.get_tensor(f"{name}.scales"), f.get_tensor(f"{name}.zeros"), int(repeat))
    return out


def _load_hf_dir(path: Path, dtype: torch.dtype) -> Checkpoint:
    config = json.loads((path / "config.json").read_text())
    args = ModelArgs.from_hf_config(config)
    files = sorted(f for f in path.glob("*.safetensors") if f.name != _INT4_FILE)
    if not files:
        raise ModelLoadError(f"model_path: directory {str(path)!r} has no *.safetensors files")
    weights = {}
    for file in files:
        weights.update({k: v.to(dtype) for k, v in load_file(str(file)).items()})
    return Checkpoint(args, weights)


def _gguf_reader(path: Path):
    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # the gguf package raises assorted errors on a damaged file
        raise ModelLoadError(f"model_path: {str(path)!r} is not a readable GGUF file ({exc})") from exc


def gguf_metadata(reader) -> dict:
    out = {}
    for key, value in reader.fields.items():
        if key.startswith("tokenizer.ggml."):
            continue  # vocabularies are large; the tokenizer loader reads them itself
        try:
            out[key] = value.contents()
        except Exception:  # noqa: BLE001 - a field type the reader cannot decode is not one we need
            continue
    return out


def gguf_hf_config(meta: dict) -> dict:
    arch = meta.get("general.architecture")
    if arch not in _GGUF_ARCHITECTURES:
        raise ModelLoadError(
            f"unsupported architecture {arch!r} in GGUF; supported: {', '.join(sorted(_GGUF_ARCHITECTURES))}"
        )

    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    num_heads = get("attention.head_count")
    hidden = get("embedding_length")
    config = {
        "architectures": [_GGUF_ARCHITECTURES[arch]],
        "vocab_size": get("vocab_size"),
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": get("attention.head_count_kv", num_heads),
        "head_dim": get("attention.key_length") or get("rope.dimension_count") or hidden // num_heads,
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": get("rope.freq_base", 10000.0),
        "max_position_embeddings": get("context_length", 4096),
        "attention_bias": arch == "qwen2",
    }
    scale_type, scale = get("rope.scaling.type"), get("rope.scaling.factor")
    if scale_type == "linear" and scale:
        config["rope_scaling"] = {"rope_type": "linear", "factor": scale}
    return config


def _unpermute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's convert_hf_to_gguf `permute` for Q/K rows."""
    out_dim = weight.shape[0]
    rest = weight.shape[1:]
    return (weight.reshape(num_heads, out_dim // num_heads // 2, 2, *rest)
            .transpose(1, 2).reshape(out_dim, *rest))


def _load_gguf(path: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, Int4Groups]]:
    """Hugging Face-style config, fp32 weights, and the 4-bit groups of the linear weights whose GGUF type has
    them, from a GGUF file."""
    reader = _gguf_reader(path)
    config = gguf_hf_config(gguf_metadata(reader))
    weights, int4 = {}, {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        if name is None:
            continue
        shape = tuple(int(d) for d in reversed(tensor.shape))  # GGML lists dimensions fastest-first
        if tensor.tensor_type in INT4_TYPES and len(shape) == 2 and name.endswith(_LINEAR_WEIGHTS):
            int4[name] = int4_groups(tensor.data, tensor.tensor_type, shape)
        try:
            array = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as exc:
            raise ModelLoadError(f"GGUF tensor {tensor.name}: quantization {tensor.tensor_type.name} "
                                 "unsupported") from exc
        weights[name] = torch.from_numpy(np.array(array, dtype=np.float32).reshape(shape))
    if config["vocab_size"] is None:
        config["vocab_size"] = weights["model.embed_tokens.weight"].shape[0]
    config["tie_word_embeddings"] = "lm_head.weight" not in weights
    if not config["tie_word_embeddings"]:
        int4.pop("model.embed_tokens.weight", None)  # a lookup table only
    args = ModelArgs.from_hf_config(config)
    if args.architecture in ("llama", "mistral"):  # qwen2's converter does not permute
        for i in range(args.num_layers):
            q, k = f"model.layers.{i}.self_attn.q_proj.weight", f"model.layers.{i}.self_attn.k_proj.weight"
            weights[q] = _unpermute(weights[q], args.num_heads)
            weights[k] = _unpermute(weights[k], args.num_kv_heads)
            for name, heads in ((q, args.num_heads), (k, args.num_kv_heads)):
                if name in int4:
                    int4[name] = int4[name].rows(_unpermute(torch.arange(int4[name].shape[0]), heads))
    return config, weights, int4


# The tensors that run as matmuls: every projection, and the embedding, which a tied lm_head reuses.
_LINEAR_WEIGHTS = ("_proj.weight", "lm_head.weight", "embed_tokens.weight")


def _hf_name(gguf_name: str) -> str | None:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        layer, base, kind = parts[1], parts[2], parts[3]
        mapped = _GGUF_NAMES.get(base)
        return f"model.layers.{layer}.{mapped}.{kind}" if mapped else None
    mapped = _GGUF_NAMES.get(parts[0])
    return f"{mapped}.{parts[1]}" if mapped else None
