"""Llama-family decoder (Llama 2/3, SmolLM/SmolLM2, Mistral, Qwen2) over a token-level KV pool.

Reads top to bottom: the model's arguments, then the modules. Every linear layer runs on the flattened tokens
of the whole batch (no padding); only attention looks at per-request structure, through `AttentionInputs`
(see `attention.py`). The same forward serves extend (prefill, possibly after a cached prefix), decode and a
mix of both.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from radixflow.runtime.model import blockq
from radixflow.runtime.model.attention import AttentionInputs, DecodeStepInputs
from radixflow.runtime.model.blockq import BlockWeight
from radixflow.runtime.model.quant import Int4Groups, Int4Weight

if TYPE_CHECKING:
    from radixflow.runtime.model.parallel import TensorParallel

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    rope_scaling: dict | None = None
    architecture: str = "llama"
    sliding_window: int | None = None  # Mistral: a token attends to itself and the window - 1 tokens before it

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        archs = cfg.get("architectures") or ["LlamaForCausalLM"]
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {arch!r}; supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        family = SUPPORTED_ARCHITECTURES[arch]
        num_heads = cfg["num_attention_heads"]
        rope = cfg.get("rope_scaling") or cfg.get("rope_parameters")
        rope_theta = cfg.get("rope_theta") or (rope or {}).get("rope_theta", 10000.0)
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            max_position=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", family == "qwen2"),
            rope_scaling=rope if rope and rope.get("rope_type", rope.get("type")) not in (None, "default") else None,
            architecture=family,
            sliding_window=_sliding_window(cfg, family),
        )


def _sliding_window(cfg: dict, family: str) -> int | None:
    """Mistral's window (v0.1: 4,096; later versions set none). Qwen2 checkpoints may declare one per layer
    (`use_sliding_window` with `max_window_layers`); that variant is refused rather than silently computed as full
    attention."""
    if family == "mistral":
        return cfg.get("sliding_window") or None
    if family == "qwen2" and cfg.get("use_sliding_window"):
        raise ValueError("unsupported: Qwen2 with use_sliding_window=true (per-layer sliding windows)")
    return None


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies, with the rope scaling variants Llama 3.x and linear-scaled models use; on the CPU (under
    the loader's meta device too: a meta arange imports torch._dynamo, seconds of a server's start)."""
    dim = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim))
    scaling = args.rope_scaling
    if scaling is None:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        return torch.where(mid, smoothed, scaled)
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: linear, llama3)")


class Linear(nn.Module):
    """y = x W^T + b with W stored transposed, [in, out] contiguous.

    On CPU, MKL's skinny GEMM (decode: a handful of rows) streams an [in, out] weight faster than the [out, in]
    layout `nn.Linear` keeps (bench/RESULTS.md); large prefill GEMMs run at the same speed either way.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features = in_features
        self.weight_t = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.packed = None  # int8 weights packed for fbgemm, after quantize_int8()
        self.onednn = None  # fp32 weights in oneDNN's blocked layout, after prepack_onednn()
        # The checkpoint's 4-bit weights on a block-quant kernel, for calls of few rows (use_int4).
        self.int4: Int4Weight | BlockWeight | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.int4 is not None and x.shape[0] <= self.int4.max_rows:
            out = self.int4(x)
            return out if self.bias is None else out + self.bias
        if self.packed is not None:
            return torch.ops.quantized.linear_dynamic(x, self.packed, False)  # 8-bit activations
        # Inductor lowers oneDNN's linear only for weights it froze itself, so a compiled step uses the matmul.
        if self.onednn is not None and x.shape[0] > 1 and not torch.compiler.is_compiling():
            return torch.ops.mkldnn._linear_pointwise(x, self.onednn, self.bias, "none", [], "")
        if self.bias is None:
            return x @ self.weight_t
        return torch.addmm(self.bias, x, self.weight_t)

    def prepack_onednn(self) -> None:
        """Keep a copy of the weight in oneDNN's blocked layout for calls with more than one row (prefill,
        batched decode); a single row stays on MKL's [in, out] GEMV, which is faster for it."""
        with torch.no_grad():
            self.onednn = torch.ops.mkldnn._reorder_linear_weight(self.weight_t.t().contiguous(), _PACK_ROWS)

    def quantize_int8(self) -> None:
        """Opt-in W8A8 dynamic: int8 weights with one scale per output channel (7 bits of them without VNNI:
        _WEIGHT_MAX); each call quantizes its input per tensor to 8 bits and runs fbgemm's int8 GEMM, then rescales
        to fp32. The fp32 weight is dropped."""
        with torch.no_grad():
            weight = self.weight_t.t().contiguous()
            scales = (weight.abs().amax(dim=1) / _WEIGHT_MAX).clamp(min=1e-8).double()
            zero_points = torch.zeros(scales.shape, dtype=torch.int64)
            with warnings.catch_warnings():
                # torch marks its quantized tensor types deprecated (to go in a later release); 2.13 has them, and
                # quantize_int8() turns their absence into a clear error.
                warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
                qweight = torch.quantize_per_channel(weight, scales, zero_points, 0, torch.qint8)
            bias = None if self.bias is None else self.bias.detach().clone()
            self.packed = torch.ops.quantized.linear_prepack(qweight, bias)
        self.weight_t = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        qkv_out = (args.num_heads + 2 * args.num_kv_heads) * args.head_dim
        # q, k and v share one matmul: one large GEMM beats three small ones on every device.
        self.qkv_proj = Linear(args.hidden_size, qkv_out, bias=args.attention_bias)
        self.o_proj = Linear(args.num_heads * args.head_dim, args.hidden_size)

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
                attn: AttentionInputs | DecodeStepInputs):
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x).view(num_tokens, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        rotated = apply_rope(qkv[:, : self.num_heads + self.num_kv_heads], *cos_sin)
        q = rotated[:, : self.num_heads]
        k = rotated[:, self.num_heads:]
        v = qkv[:, self.num_heads + self.num_kv_heads:]
        out = attn.attend(q, k, v, self.layer_id)
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (the Hugging Face layout). x: [tokens, heads, dim]; cos/sin: [tokens, 1, dim/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_up_proj = Linear(args.hidden_size, 2 * args.intermediate_size)
        self.down_proj = Linear(args.intermediate_size, args.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int, tp: TensorParallel | None = None):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, layer_id)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)
        # Tensor parallelism: o_proj and down_proj produce partial sums of the hidden state on each rank.
        self.reduce = tp.all_reduce if tp is not None else _identity

    def forward(self, x, cos_sin, attn: AttentionInputs):
        x = x + self.reduce(self.self_attn(self.input_layernorm(x), cos_sin, attn))
        return x + self.reduce(self.mlp(self.post_attention_layernorm(x)))


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class LlamaModel(nn.Module):
    """Causal LM. `forward` returns logits only for the rows in `attn.logits_rows`.

    With tensor parallelism (`tp`, parallel.py) `args` are this rank's: its heads, KV heads and MLP columns; the
    vocabulary stays whole in `args` while the embedding and lm_head hold this rank's rows of it.
    """

    def __init__(self, args: ModelArgs, tp: TensorParallel | None = None):
        super().__init__()
        self.args = args
        self.tp = tp
        self.vocab_start, vocab_end = tp.vocab_range(args.vocab_size) if tp else (0, args.vocab_size)
        vocab_rows = vocab_end - self.vocab_start
        # `_weight`: no random init (the checkpoint fills it; under the loader's meta device the init would import
        # torch._dynamo, seconds of a server's start).
        self.embed_tokens = nn.Embedding(vocab_rows, args.hidden_size,
                                         _weight=torch.empty(vocab_rows, args.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(args, i, tp) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = Linear(args.hidden_size, vocab_rows)
        self.register_buffer("inv_freq", rope_inv_freq(args).float(), persistent=False)
        # Attention on the paged kernels (attention.decode_kernel, extend_kernel) for groups without a shared prefix;
        # load_model turns it on where they run (--attention-backend auto).
        self.paged_kernels = False

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionInputs) -> torch.Tensor:
        return self.logits(input_ids, positions, attn)

    def logits(self, input_ids: torch.Tensor, positions: torch.Tensor,
               attn: AttentionInputs | DecodeStepInputs) -> torch.Tensor:
        """The forward without its inference-mode guard, for torch.compile to trace (compiled.py): the caller
        holds the guard, which the compiler does not trace into."""
        freqs = positions.to(self.inv_freq.dtype)[:, None] * self.inv_freq[None, :]
        cos_sin = (freqs.cos().to(self.embed_tokens.weight.dtype)[:, None, :],
                   freqs.sin().to(self.embed_tokens.weight.dtype)[:, None, :])
        x = self._embed(input_ids)
        for layer in self.layers:
            x = layer(x, cos_sin, attn)
        if attn.logits_rows is not None:
            x = x[attn.logits_rows]
        logits = self.lm_head(self.norm(x))
        if self.tp is not None:
            logits = self.tp.gather_last_dim(logits)[:, :self.args.vocab_size]
        return logits.float()

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return self.embed_tokens(input_ids)
        local = input_ids - self.vocab_start  # ids of other ranks' rows look up row 0 and are zeroed
        outside = (local < 0) | (local >= self.embed_tokens.num_embeddings)
        x = self.embed_tokens(local.masked_fill(outside, 0)).masked_fill(outside[:, None], 0.0)
        return self.tp.all_reduce(x)

    def use_int4(self, groups: dict[str, Int4Groups], kernel: str = "int4") -> int:
        """Give each linear layer whose checkpoint weight has 4-bit groups (Hugging Face names) a block-quant
        kernel, fused as the fp32 weights are; a fused layer needs groups for all its parts. `kernel` is "blockq"
        (blockq.py, for the layouts it holds; torch's int4 kernel for the rest) or "int4" (torch's for all).
        Returns how many layers."""
        fused = _fuse_hf_weights(groups, self.args, Int4Groups.cat)
        if "lm_head.weight" not in fused and self.args.tie_word_embeddings and "embed_tokens.weight" in fused:
            fused["lm_head.weight"] = fused["embed_tokens.weight"]
        count = 0
        for name, module in self.named_modules():
            if isinstance(module, Linear) and f"{name}.weight" in fused:
                g = fused[f"{name}.weight"]
                expected = tuple(module.weight_t.shape[::-1])
                if g.shape != expected:
                    raise ValueError(f"tensor {name}: 4-bit shape {g.shape} != model {expected}")
                module.int4 = BlockWeight(g) if kernel == "blockq" and blockq.supports(g) else Int4Weight(g)
                count += 1
        return count

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Load Hugging Face-named weights, fusing q/k/v and gate/up. Raises on a missing or misshapen tensor."""
        own = dict(self.named_parameters())
        fused = _fuse_hf_weights(weights, self.args)
        if self.args.tie_word_embeddings or "lm_head.weight" not in fused:
            # A transposed copy, not a shared tensor: the embedding lookup wants [vocab, hidden] rows.
            fused["lm_head.weight"] = fused["embed_tokens.weight"]
        fused = {_own_name(name): tensor.t() if name.endswith(".weight") and _own_name(name) != name else tensor
                 for name, tensor in fused.items()}
        missing = sorted(set(own) - set(fused))
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensor(s), e.g. {missing[:3]}")
        with torch.no_grad():
            for name, param in own.items():
                tensor = fused[name]
                if tuple(tensor.shape) != tuple(param.shape):
                    raise ValueError(f"tensor {name}: checkpoint shape {tuple(tensor.shape)} != model "
                                     f"{tuple(param.shape)}")
                param.copy_(tensor)


_LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head")


_PACK_ROWS = 512  # the row count oneDNN tunes the packed layout for; any row count works

def prepack_onednn(model: nn.Module) -> bool:
    """Pack every fp32 linear weight for oneDNN (CPU): faster multi-row GEMMs than MKL's sgemm where MKL does not
    use AVX-512 (AMD CPUs; bench/RESULTS.md), with results that agree with fp64 to 1e-6 relative, as MKL's do.
    Returns False (and packs nothing) where this torch build cannot do it correctly."""
    if not _onednn_linear_works():
        return False
    for module in model.modules():
        if isinstance(module, Linear) and module.packed is None:
            module.prepack_onednn()
    return True


def _onednn_linear_works() -> bool:
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        gen = torch.Generator().manual_seed(0)
        weight, bias = torch.randn(48, 40, generator=gen), torch.randn(48, generator=gen)
        x = torch.randn(7, 40, generator=gen)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, _PACK_ROWS)
        out = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        return bool(torch.allclose(out, torch.addmm(bias, x, weight.t()), rtol=1e-4, atol=1e-4))
    except (RuntimeError, AttributeError):
        return False


def _has_vnni() -> bool:
    return bool({"avx512_vnni", "avx_vnni"} & blockq.cpu_flags())


# Without VNNI, fbgemm multiplies through vpmaddubsw, whose sums of two byte products saturate at 16 bits (2 * 255 *
# 127 does, 2 * 255 * 63 does not), so one operand gives up a bit there. torch's default drops it from the
# activations (reduce_range: 7 bits per tensor); radixflow drops it from the weights (7 bits per output channel),
# which costs less: on SmolLM2 (a 2-core AMD EPYC Zen 3), prompt logprobs moved by up to 0.45 / 0.83 nat on two
# prompts, against 1.19 / 2.79 with 7-bit activations.
_WEIGHT_MAX = 127.0 if _has_vnni() else 63.0

# down_proj stays fp32: its input (the gated MLP activation) has outliers that one int8 scale per tensor cannot
# represent. On SmolLM2, quantizing it too moved prompt logprobs by up to 2.1 nats; without it, 0.4.
_KEEP_FP32 = ("down_proj",)


def quantize_int8(model: nn.Module) -> None:
    """Turn the linear layers of `model` (qkv, o, gate/up, lm_head; not down_proj) into int8 dynamic ones;
    embeddings and norms stay fp32. CPU only (fbgemm)."""
    if "fbgemm" not in torch.backends.quantized.supported_engines or not hasattr(torch.ops.quantized,
                                                                                   "linear_dynamic"):
        raise ValueError("quantization: int8 needs torch's fbgemm quantized ops (x86 CPU), which this build lacks")
    torch.backends.quantized.engine = "fbgemm"
    for name, module in model.named_modules():
        if isinstance(module, Linear) and not name.endswith(_KEEP_FP32):
            module.quantize_int8()


def _own_name(name: str) -> str:
    """`...qkv_proj.weight` -> `...qkv_proj.weight_t` for our transposed linears; other names unchanged."""
    module = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
    if name.endswith(".weight") and module in _LINEARS:
        return name[: -len("weight")] + "weight_t"
    return name


def _fuse_hf_weights(weights: dict, args: ModelArgs, cat=lambda parts: torch.cat(parts, dim=0)) -> dict:
    """Map HF names (model.layers.N.self_attn.q_proj.weight, ...) onto this module's fused parameters; `cat`
    stacks parts along the output (tensors by default, or `Int4Groups.cat`)."""
    out = {}
    for name, tensor in weights.items():
        out[name.removeprefix("model.")] = tensor
    for i in range(args.num_layers):
        attn, mlp = f"layers.{i}.self_attn", f"layers.{i}.mlp"
        for kind in ("weight", "bias"):
            parts = [out.pop(f"{attn}.{p}_proj.{kind}", None) for p in "qkv"]
            if all(p is not None for p in parts):
                out[f"{attn}.qkv_proj.{kind}"] = cat(parts)
        gate, up = out.pop(f"{mlp}.gate_proj.weight", None), out.pop(f"{mlp}.up_proj.weight", None)
        if gate is not None and up is not None:
            out[f"{mlp}.gate_up_proj.weight"] = cat([gate, up])
    return out
