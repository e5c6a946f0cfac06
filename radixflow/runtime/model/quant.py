"""GGUF block-quantized linear weights kept 4-bit, for torch's int4 weight-only matmul.

GGUF's Q4_0, Q4_1 and Q8_0 store a weight row in blocks of 32 with one fp16 scale (and for Q4_1 a minimum) per
block. torch's CPU kernel `_weight_int4pack_mm_for_cpu` computes with 4-bit codes in groups of 32 and one
(scale, zero) per group, `w = (code - 8) * scale + zero`, so:

- Q4_1 (`w = d * q + m`): code q, scale d, zero m + 8d;
- Q4_0 (`w = d * (q - 8)`): code q, scale d, zero 0;
- Q8_0 (`w = d * q`, q a signed byte): q = 16 * hi + lo with lo in [0, 15] and hi in [-8, 7], so the row becomes
  two 4-bit rows laid end to end along the input: codes lo (scale d, zero 8d), then codes hi + 8 (scale 16d,
  zero 0), multiplied by the input repeated twice. Exact, and 8 bits a weight as in the file.

The kernel takes bf16 activations and bf16 scales (its fp32 path in torch 2.13 is a scalar fallback, about 20x
slower; bench/RESULTS.md), so its products are as close to the dequantized fp32 model as bf16 is: about 3
significant digits, where llama.cpp itself rounds activations to 8 bits for its dot products. `Int4Weight`
converts the input and output, so callers see fp32.

Why this kernel: measured on the 2-core CPU here, it runs SmolLM2's linear layers about 2x faster than fp32 MKL at
1 to 8 rows (decode); whole engine steps cross over at 10 to 12 rows, and at 128 to 512 rows (prefill) it takes
twice fp32's time, so `Linear` keeps the fp32 weight for calls of more than `Int4Weight.max_rows` rows. On x86 CPUs
with AVX2 or AVX512-VNNI, blockq.py's kernel takes the same groups instead (faster, and closer to fp32); this one
is the fallback and `weight_format="int4"`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

GROUP = 32
_OUT_MULTIPLE = 16  # the kernel's packing needs the output size in multiples of 16
INT4_TYPES = frozenset({Q.Q4_0, Q.Q4_1, Q.Q8_0})


@dataclass
class Int4Groups:
    """A weight [out, in] as 4-bit codes (one per byte, 0..15) with a scale and a zero per group of 32 along the
    input, for an input repeated `repeat` times (1 for 4-bit types, 2 for Q8_0): codes are [out, repeat * in]."""

    codes: torch.Tensor  # uint8 [out, repeat * in]
    scales: torch.Tensor  # fp32 [out, repeat * in / 32]
    zeros: torch.Tensor  # fp32 [out, repeat * in / 32]
    repeat: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.codes.shape[1] // self.repeat

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight [out, in] these groups encode (the sum over the repeats)."""
        out, wide = self.codes.shape
        w = (self.codes.view(out, -1, GROUP).float() - 8) * self.scales[..., None] + self.zeros[..., None]
        return w.reshape(out, self.repeat, wide // self.repeat).sum(dim=1)

    def widened(self, repeat: int) -> "Int4Groups":
        """The same weight laid out for an input repeated `repeat` times; the added copies encode zero."""
        if repeat == self.repeat:
            return self
        out, wide = self.codes.shape
        pad = Int4Groups.zero(out, wide // self.repeat * (repeat - self.repeat), repeat)
        return Int4Groups(torch.cat([self.codes, pad.codes], 1), torch.cat([self.scales, pad.scales], 1),
                          torch.cat([self.zeros, pad.zeros], 1), repeat)

    @staticmethod
    def zero(out: int, wide: int, repeat: int) -> "Int4Groups":
        """`out` rows of `wide` codes that encode zero weights (code 8, scale 0, zero 0)."""
        return Int4Groups(torch.full((out, wide), 8, dtype=torch.uint8), torch.zeros(out, wide // GROUP),
                          torch.zeros(out, wide // GROUP), repeat)

    def rows(self, index) -> "Int4Groups":
        return Int4Groups(self.codes[index], self.scales[index], self.zeros[index], self.repeat)

    @staticmethod
    def cat(parts: list["Int4Groups"]) -> "Int4Groups":
        """Stack along the output (fused q/k/v, gate/up), widening to the largest repeat."""
        repeat = max(p.repeat for p in parts)
        parts = [p.widened(repeat) for p in parts]
        return Int4Groups(torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]),
                          torch.cat([p.zeros for p in parts]), repeat)


def int4_groups(blocks: np.ndarray, kind: Q, shape: tuple[int, int]) -> Int4Groups:
    """Decode GGUF blocks (uint8, as the file stores them) of a [out, in] weight into 4-bit groups."""
    out, inp = shape
    if kind not in INT4_TYPES:
        raise ValueError(f"no 4-bit layout for GGUF type {kind.name}")
    if inp % GROUP:
        raise ValueError(f"input size {inp} is not a multiple of {GROUP}")
    raw = np.ascontiguousarray(blocks, dtype=np.uint8).reshape(out, inp // GROUP, -1)
    d = raw[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    if kind == Q.Q8_0:
        q = raw[..., 2:].view(np.int8).astype(np.int16)
        lo, hi = (q & 0x0F).astype(np.uint8), ((q >> 4) + 8).astype(np.uint8)
        codes = np.concatenate([lo.reshape(out, inp), hi.reshape(out, inp)], axis=1)
        scales = np.concatenate([d, 16 * d], axis=1)
        zeros = np.concatenate([8 * d, np.zeros_like(d)], axis=1)
        return Int4Groups(_t(codes), _t(scales), _t(zeros), 2)
    qs = raw[..., 4:] if kind == Q.Q4_1 else raw[..., 2:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # ggml: the low nibbles hold the first 16
    if kind == Q.Q4_1:
        zeros = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) + 8 * d
    else:
        zeros = np.zeros_like(d)
    return Int4Groups(_t(codes.reshape(out, inp)), _t(d), _t(zeros), 1)


def _t(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array))


def int4_kernel_available(device: torch.device) -> bool:
    """Whether torch has the CPU int4 kernel and it computes what `Int4Weight` expects on this build."""
    if device.type != "cpu" or not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        groups = Int4Groups(torch.randint(0, 16, (48, 64), dtype=torch.uint8, generator=gen),
                            torch.rand(48, 2, generator=gen), torch.randn(48, 2, generator=gen), 1)
        x = torch.randn(3, 64, generator=gen)
        expected = x @ groups.dequantize().t()
        return bool((Int4Weight(groups)(x) - expected).abs().max() <= 1e-2 * expected.abs().max())
    except (RuntimeError, AttributeError):
        return False


class Int4Weight:
    """`x @ W^T` for fp32 x through torch's int4 CPU kernel (bf16 inside)."""

    # Calls with more rows than this (prefill chunks, large decode batches) use the fp32 weight: the kernel's
    # dequantization costs more than it saves there (the crossover above; bench/RESULTS.md).
    max_rows = 10

    def __init__(self, groups: Int4Groups):
        out = groups.codes.shape[0]
        self.repeat = groups.repeat
        self.out_features = out
        padded = -(-out // _OUT_MULTIPLE) * _OUT_MULTIPLE
        if padded != out:  # zero rows; their outputs are dropped
            groups = Int4Groups.cat([groups, Int4Groups.zero(padded - out, groups.codes.shape[1], groups.repeat)])
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(groups.codes.to(torch.int32), 1)
        # The kernel wants [groups, out, 2] with the scale first.
        self.scale_zeros = torch.stack([groups.scales.t(), groups.zeros.t()], dim=-1).to(torch.bfloat16).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xb = x.to(torch.bfloat16)
        if self.repeat > 1:
            xb = xb.repeat(1, self.repeat)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.packed, GROUP, self.scale_zeros)
        return (out if out.shape[1] == self.out_features else out[:, :self.out_features]).float()

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.packed, self.scale_zeros

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())
