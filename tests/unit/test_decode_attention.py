"""The paged kernels (decode_attention.cpp) against softmax attention written out in float64.

Decode: every chunk boundary, grouped-query shapes, masks with holes (a whole chunk masked included), the new token's
K/V taken from new_k / new_v, scores far apart (weights that underflow to exactly 0), and its errors. Extend: query
and key block boundaries, causal and masked (a sliding window, rows with every key masked), batches whose key ranges
are split across tasks, and its errors."""

from __future__ import annotations

import pytest
import torch

from radixflow.runtime.model import blockq
from radixflow.runtime.model.attention import DecodeStepInputs, decode_kernel, extend_kernel

pytestmark = pytest.mark.skipif(blockq.cpu_isa() is None, reason="the paged kernels need an x86 CPU with AVX2")

POOL = 2048


@pytest.fixture(scope="module", autouse=True)
def kernel():
    assert blockq.available()


def reference(q, k_cache, v_cache, kv_indices, mask=None, loc=None, new_k=None, new_v=None):
    """[B, H, D] in float64, one request and head at a time."""
    batch, heads, dim = q.shape
    group = heads // k_cache.shape[1]
    out = torch.zeros(batch, heads, dim, dtype=torch.float64)
    for b in range(batch):
        keep = [j for j in range(kv_indices.shape[1]) if mask is None or bool(mask.reshape(batch, -1)[b, j])]
        rows = kv_indices[b, keep]
        keys, values = k_cache[rows].double(), v_cache[rows].double()  # [L, Hkv, D]
        if loc is not None:
            fresh = rows == loc[b]
            keys[fresh], values[fresh] = new_k[b].double(), new_v[b].double()
        for h in range(heads):
            scores = keys[:, h // group] @ q[b, h].double() * dim ** -0.5
            out[b, h] = scores.softmax(-1) @ values[:, h // group]
    return out


def tensors(batch, heads, kv_heads, dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, dim, generator=gen)
    k_cache, v_cache = (torch.randn(POOL, kv_heads, dim, generator=gen) for _ in range(2))
    return gen, q, k_cache, v_cache


@pytest.mark.parametrize("context", [1, 7, 8, 9, 127, 128, 129, 300, 1000])
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (4, 4, 8), (16, 2, 128), (8, 1, 256)])
def test_matches_float64_softmax_attention(context, heads, kv_heads, dim):
    gen, q, k_cache, v_cache = tensors(2, heads, kv_heads, dim)
    kv_indices = torch.randperm(POOL, generator=gen)[: 2 * context].view(2, context)
    got = decode_kernel(q, k_cache, v_cache, kv_indices, None)
    assert torch.allclose(got.double(), reference(q, k_cache, v_cache, kv_indices), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("context", [5, 200, 400])
def test_masked_keys_are_skipped_and_the_new_tokens_come_from_new_k(context):
    """Rows of different lengths (padding masked), a hole in the middle, a whole chunk of 128 keys masked, and each
    row's new token at `loc`, whose pool row holds stale values."""
    batch = 3
    gen, q, k_cache, v_cache = tensors(batch, 9, 3, 64, seed=1)
    kv_indices = torch.randperm(POOL, generator=gen)[: batch * context].view(batch, context)
    lengths = torch.tensor([context, max(1, context // 2), max(1, context - 3)])
    mask = torch.arange(context)[None, :] < lengths[:, None]
    mask[0, 1: context // 3] = False
    if context > 256:
        mask[2, 128:256] = False
    loc = kv_indices[torch.arange(batch), lengths - 1]
    new_k, new_v = torch.randn(batch, 3, 64, generator=gen), torch.randn(batch, 3, 64, generator=gen)
    got = decode_kernel(q, k_cache, v_cache, kv_indices, mask[:, None, None, :], loc, new_k, new_v)
    want = reference(q, k_cache, v_cache, kv_indices, mask, loc, new_k, new_v)
    assert torch.allclose(got.double(), want, atol=2e-6, rtol=1e-5)
    # The stale pool rows are not read: without the override the answer differs.
    stale = decode_kernel(q, k_cache, v_cache, kv_indices, mask[:, None, None, :])
    assert not torch.allclose(stale, got, atol=1e-3)


def test_far_apart_scores_underflow_to_zero_weight_not_nan():
    """Scores 1e3 apart: e^(s - max) is exactly 0 for all but the largest, in every chunk; a chunk whose best score
    is far below the overall best contributes nothing."""
    gen, q, k_cache, v_cache = tensors(1, 3, 1, 64, seed=2)
    q *= 200
    kv_indices = torch.randperm(POOL, generator=gen)[:400].view(1, 400)
    got = decode_kernel(q, k_cache, v_cache, kv_indices, None)
    assert torch.isfinite(got).all()
    assert torch.allclose(got.double(), reference(q, k_cache, v_cache, kv_indices), atol=1e-5)


def test_the_compiled_steps_inputs_give_the_same_attention_and_new_kv():
    """DecodeStepInputs (the compiled step's attention) on the kernel and on SDPA: the same outputs, and the same
    new K/V handed back for the pool."""
    gen, q, k_cache, v_cache = tensors(2, 9, 3, 64, seed=3)
    buffer = torch.stack([k_cache, v_cache])[:, None]  # [2, layers=1, pool, Hkv, D]
    kv_indices = torch.randperm(POOL, generator=gen)[:60].view(2, 30)
    mask = torch.ones(2, 1, 1, 30, dtype=torch.bool)
    mask[1, ..., 20:] = False
    loc = kv_indices[:, [29, 19]].diagonal()
    k, v = torch.randn(2, 3, 64, generator=gen), torch.randn(2, 3, 64, generator=gen)
    outs = []
    for paged in (False, True):
        inputs = DecodeStepInputs(buffer, kv_indices, loc, mask, paged)
        outs.append((inputs.attend(q, k, v, 0), inputs.new_kv[0]))
    assert torch.allclose(outs[0][0], outs[1][0], atol=2e-6)
    assert torch.equal(outs[0][1], outs[1][1])


def test_a_bad_pool_index_is_an_error_not_a_crash():
    _, q, k_cache, v_cache = tensors(1, 9, 3, 64)
    with pytest.raises(RuntimeError, match=r"pool index 5000 out of range \[0, 2048\)"):
        decode_kernel(q, k_cache, v_cache, torch.tensor([[3, 5000, 7]]), None)
    with pytest.raises(RuntimeError, match="multiple of 8"):
        decode_kernel(q[..., :60], k_cache[..., :60], v_cache[..., :60], torch.tensor([[3, 4]]), None)


# -- extend -------------------------------------------------------------------------------------------------------
def extend_reference(q, k_cache, v_cache, kv_indices, allowed):
    """[B, Q, H, D] in float64; allowed: [B, Q, L] bool. A query with no key allowed gets zeros (the kernel's
    choice; the planner never builds one)."""
    batch, queries, heads, dim = q.shape
    group = heads // k_cache.shape[1]
    out = torch.zeros(batch, queries, heads, dim, dtype=torch.float64)
    for b in range(batch):
        keys, values = k_cache[kv_indices[b]].double(), v_cache[kv_indices[b]].double()  # [L, Hkv, D]
        for i in range(queries):
            keep = allowed[b, i]
            if not bool(keep.any()):
                continue
            for h in range(heads):
                scores = keys[keep, h // group] @ q[b, i, h].double() * dim ** -0.5
                out[b, i, h] = scores.softmax(-1) @ values[keep, h // group]
    return out


def causal(batch, queries, context):
    """[B, Q, L]: query i at position i + L - Q sees keys up to its own."""
    allowed = torch.arange(context)[None, :] <= torch.arange(queries)[:, None] + context - queries
    return allowed[None].expand(batch, queries, context).contiguous()


@pytest.mark.parametrize("queries,context", [(1, 1), (2, 9), (15, 1035), (16, 64), (17, 65), (40, 40), (33, 300),
                                             (130, 130), (100, 228)])
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (4, 4, 8), (16, 1, 128), (8, 2, 256)])
def test_extend_matches_float64_softmax_attention(queries, context, heads, kv_heads, dim):
    """Causal by flag and by mask (130 and 100 queries: whole key blocks no query of a block sees, skipped); batch 1
    with a short extend splits its keys across tasks, batch 2 may not."""
    for batch in (1, 2):
        gen = torch.Generator().manual_seed(queries * 1000 + context)
        q = torch.randn(batch, queries, heads, dim, generator=gen)
        k_cache, v_cache = (torch.randn(POOL, kv_heads, dim, generator=gen) for _ in range(2))
        kv_indices = torch.randint(0, POOL, (batch, context), generator=gen)  # rows may repeat: the same key twice
        allowed = causal(batch, queries, context)
        want = extend_reference(q, k_cache, v_cache, kv_indices, allowed)
        for got in (extend_kernel(q, k_cache, v_cache, kv_indices, None, True),
                    extend_kernel(q, k_cache, v_cache, kv_indices, allowed[:, None], False)):
            assert torch.allclose(got.double(), want, atol=2e-6, rtol=1e-5)


def test_extend_masks_a_window_padding_and_whole_rows():
    """A sliding window of 50 keys, a request padded to the group's longest (its last keys masked for every query),
    and one query with every key masked (zeros, not NaN)."""
    batch, queries, context = 3, 20, 260
    gen, _, k_cache, v_cache = tensors(1, 9, 3, 64, seed=4)
    q = torch.randn(batch, queries, 9, 64, generator=gen)
    kv_indices = torch.randperm(POOL, generator=gen)[: batch * context].view(batch, context)
    allowed = causal(batch, queries, context)
    key, query_pos = torch.arange(context), torch.arange(queries)[:, None] + context - queries
    allowed[0] &= key[None, :] > query_pos - 50
    allowed[1, :, 200:] = False
    allowed[2, 5] = False
    got = extend_kernel(q, k_cache, v_cache, kv_indices, allowed[:, None], False)
    assert torch.isfinite(got).all() and not got[2, 5].any()
    assert torch.allclose(got.double(), extend_reference(q, k_cache, v_cache, kv_indices, allowed), atol=2e-6,
                          rtol=1e-5)
    # Without a mask or causal flag every query sees every key.
    everything = torch.ones(batch, queries, context, dtype=torch.bool)
    assert torch.allclose(extend_kernel(q, k_cache, v_cache, kv_indices, None, False).double(),
                          extend_reference(q, k_cache, v_cache, kv_indices, everything), atol=2e-6, rtol=1e-5)


def test_extend_errors_name_the_problem():
    gen, _, k_cache, v_cache = tensors(1, 9, 3, 64)
    q = torch.randn(1, 3, 9, 64, generator=gen)
    with pytest.raises(RuntimeError, match=r"pool index 5000 out of range \[0, 2048\)"):
        extend_kernel(q, k_cache, v_cache, torch.tensor([[3, 5000, 7]]), None, True)
    with pytest.raises(RuntimeError, match="a mask or causal, not both"):
        extend_kernel(q, k_cache, v_cache, torch.tensor([[3, 4, 7]]), torch.ones(1, 3, 3, dtype=torch.bool), True)
    with pytest.raises(RuntimeError, match=r"fewer keys \(2\) than queries \(3\)"):
        extend_kernel(q, k_cache, v_cache, torch.tensor([[3, 4]]), None, True)
