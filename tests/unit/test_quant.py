"""GGUF 4-bit blocks as the int4 kernel's groups: the decoding is exact, and the kernel computes the same matmul as
the dequantized weight at bf16 precision (what it computes in)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from radixflow.runtime.model.quant import Int4Groups, Int4Weight, int4_groups, int4_kernel_available

BF16_REL = 1e-2  # the kernel's error relative to the largest output: bf16 inputs, scales and outputs


def _quantized(kind, shape, seed=0):
    w = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    blocks = gguf.quants.quantize(w, kind)
    return blocks, torch.from_numpy(np.array(gguf.quants.dequantize(blocks, kind), dtype=np.float32).reshape(shape))


@pytest.mark.parametrize("kind", [Q.Q4_0, Q.Q4_1, Q.Q8_0])
def test_groups_decode_gguf_blocks_exactly(kind):
    blocks, reference = _quantized(kind, (48, 96))
    groups = int4_groups(blocks, kind, (48, 96))
    assert groups.repeat == (2 if kind == Q.Q8_0 else 1)
    assert int(groups.codes.max()) <= 15
    assert torch.equal(groups.dequantize(), reference)


def test_fused_groups_of_mixed_types_stay_exact():
    parts = [_quantized(kind, (16 * (i + 1), 64), seed=i) for i, kind in enumerate([Q.Q4_1, Q.Q8_0, Q.Q4_0])]
    fused = Int4Groups.cat([int4_groups(b, k, ref.shape) for (b, ref), k in zip(parts, [Q.Q4_1, Q.Q8_0, Q.Q4_0])])
    assert fused.repeat == 2
    assert torch.equal(fused.dequantize(), torch.cat([ref for _, ref in parts]))


@pytest.mark.parametrize("kind, shape", [(Q.Q4_1, (96, 128)), (Q.Q4_0, (40, 64)), (Q.Q8_0, (100, 96))])
@pytest.mark.parametrize("rows", [1, 3, 10])
def test_kernel_matches_the_dequantized_matmul(kind, shape, rows):
    assert int4_kernel_available(torch.device("cpu"))
    blocks, reference = _quantized(kind, shape)
    x = torch.randn(rows, shape[1], generator=torch.Generator().manual_seed(1))
    out = Int4Weight(int4_groups(blocks, kind, shape))(x)
    expected = x @ reference.t()
    assert out.dtype == torch.float32 and out.shape == expected.shape  # odd output sizes are padded and cut
    assert float((out - expected).abs().max()) <= BF16_REL * float(expected.abs().max())


def test_groups_refuse_types_without_a_4bit_layout():
    with pytest.raises(ValueError, match="Q6_K"):
        int4_groups(np.zeros((4, 210), dtype=np.uint8), Q.Q6_K, (4, 256))
