"""Attention over the KV pool against a per-request reference: padded groups, grouped-query heads, causal
extends after a cached prefix, and shared-prefix (cascade) attention merged through log-sum-exps."""

from __future__ import annotations

import pytest
import torch

from radixflow.runtime.cache.kv_pool import ReqToTokenPool
from radixflow.runtime.model import attention as attention_module
from radixflow.runtime.model import blockq
from radixflow.runtime.model.attention import (
    AttentionInputs,
    AttentionPlanner,
    QuerySpan,
    paged_attention,
    shared_prefixes,
)

HEADS, KV_HEADS, DIM, POOL = 6, 2, 16, 4096
CPU = torch.device("cpu")
# Groups on torch's SDPA, and on the paged kernels (decode_attention.cpp) where this CPU runs them.
NO_KERNEL = pytest.mark.skipif(blockq.cpu_isa() is None, reason="the paged kernels need an x86 CPU with AVX2")
PAGED = [False, pytest.param(True, marks=NO_KERNEL)]


def build(contexts: list[list[int]], news: list[int]):
    """A planner over a request-to-token table whose slot rows hold `contexts` (pool indices, new tokens last),
    and one query span per request with `news[i]` new tokens."""
    req_to_token = ReqToTokenPool(len(contexts), max(map(len, contexts)), CPU)
    planner = AttentionPlanner(req_to_token, HEADS, KV_HEADS, None, torch.float32, CPU)
    spans = []
    for slot, (ctx, n) in enumerate(zip(contexts, news)):
        req_to_token.write(slot, 0, ctx)
        spans.append(QuerySpan(slot, len(ctx) - n, n))
    return planner, req_to_token.table, spans


def reference(q, k_cache, v_cache, contexts, news):
    """Each new token attends to its request's keys up to its own position, one request at a time."""
    out, row = [], 0
    for ctx, n in zip(contexts, news):
        keys = k_cache[torch.tensor(ctx)].repeat_interleave(HEADS // KV_HEADS, dim=1)  # [L, H, D]
        values = v_cache[torch.tensor(ctx)].repeat_interleave(HEADS // KV_HEADS, dim=1)
        for j in range(n):
            pos = len(ctx) - n + j
            scores = torch.einsum("hd,lhd->hl", q[row], keys[: pos + 1]) * DIM ** -0.5
            out.append(torch.einsum("hl,lhd->hd", scores.softmax(-1), values[: pos + 1]))
            row += 1
    return torch.stack(out)


def run(contexts, news, shared_min: int, monkeypatch, paged: bool = False):
    # The runner lays decodes out first (the planner relies on it).
    order = sorted(range(len(news)), key=lambda i: news[i] != 1)
    contexts, news = [contexts[i] for i in order], [news[i] for i in order]
    monkeypatch.setattr(attention_module, "MIN_SHARED_GATHER", shared_min)
    planner, table, spans = build(contexts, news)
    gen = torch.Generator().manual_seed(0)
    k_cache, v_cache = torch.randn(POOL, KV_HEADS, DIM, generator=gen), torch.randn(POOL, KV_HEADS, DIM, generator=gen)
    total = sum(news)
    q = torch.randn(total, HEADS, DIM, generator=gen)
    k_new, v_new = torch.randn(total, KV_HEADS, DIM, generator=gen), torch.randn(total, KV_HEADS, DIM, generator=gen)
    out_loc = torch.cat([table[s.slot, s.start:s.end] for s in spans])
    groups = planner.plan(spans)
    attn = AttentionInputs([k_cache.clone()], [v_cache.clone()], out_loc, groups, None, paged and blockq.available())
    got = paged_attention(q, k_new, v_new, 0, attn)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    k_ref[out_loc], v_ref[out_loc] = k_new, v_new
    return got, reference(q, k_ref, v_ref, contexts, news), groups


def shared_workload(gen_seed: int = 1):
    """Two families of requests behind two different cached prefixes (100 and 60 tokens), one loner; each with
    its own tail. Pool indices are distinct except where prefixes are shared."""
    gen = torch.Generator().manual_seed(gen_seed)
    free = torch.randperm(POOL, generator=gen).tolist()
    take = lambda n: [free.pop() for _ in range(n)]  # noqa: E731
    first, second = take(100), take(60)
    contexts = [first + take(n) for n in (5, 17, 1)] + [second + take(n) for n in (9, 30)] + [take(40)]
    return contexts


@pytest.mark.parametrize("paged", PAGED)
@pytest.mark.parametrize("decode", [True, False])
@pytest.mark.parametrize("shared_min", [1, 10**9])
def test_matches_reference_with_and_without_shared_prefix_attention(decode, shared_min, paged, monkeypatch):
    contexts = shared_workload()
    news = [1] * len(contexts) if decode else [1, 4, 1, 7, 3, 12]
    got, want, groups = run(contexts, news, shared_min, monkeypatch, paged)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    used = [len(p.kv_indices) for g in groups for p in g.prefixes]
    assert sorted(used) == ([] if shared_min > 1 else ([60, 100] if decode else [60, 100]))


@pytest.mark.parametrize("paged", PAGED)
def test_mixed_decode_and_extend_batch_with_a_fresh_prompt(paged, monkeypatch):
    contexts = shared_workload(2)
    news = [1, 1, 5, 1, 2, 40]  # the last is a whole fresh prompt
    got, want, groups = run(contexts, news, 1, monkeypatch, paged)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    assert len(groups) == 2 and any(g.prefixes for g in groups)


@NO_KERNEL
def test_extends_run_on_the_kernel_up_to_its_work_limit(monkeypatch):
    """Extend groups without a shared prefix go to the extend kernel while a request's queries x keys stay within
    EXTEND_KERNEL_MAX_WORK, and to gather + SDPA above it; both match the reference."""
    calls = []
    kernel = attention_module.extend_kernel
    monkeypatch.setattr(attention_module, "extend_kernel", lambda q, *args: calls.append(q.shape) or kernel(q, *args))
    news = [1, 4, 1, 7, 3, 12]
    for limit, on_kernel in ((attention_module.EXTEND_KERNEL_MAX_WORK, True), (10, False)):
        calls.clear()
        monkeypatch.setattr(attention_module, "EXTEND_KERNEL_MAX_WORK", limit)
        got, want, _ = run(shared_workload(), news, 10**9, monkeypatch, paged=True)
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
        assert bool(calls) == on_kernel


def test_shared_prefixes_found_by_pool_slots():
    kv = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 1, 2], [5, 6, 3, 4, 0], [7, 6, 7, 8, 9], [7, 6, 7, 8, 0],
                       [11, 12, 13, 14, 15]])
    starts = torch.tensor([4, 4, 4, 4, 3, 4])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attention_module, "MIN_SHARED_GATHER", 1)
        prefixes, skip = shared_prefixes(kv, starts)
    found = sorted((p.members.tolist(), p.kv_indices.tolist()) for p in prefixes)
    # Rows 0-2 share slots 5, 6 (row 2 diverges at the third key); rows 3-4 share four slots but row 4's new
    # token is at position 3, so only three are context for both.
    assert found == [([0, 1, 2], [5, 6]), ([3, 4], [7, 6, 7])]
    assert skip.tolist() == [2, 2, 2, 3, 3, 0]
    assert shared_prefixes(kv, starts)[0] == []  # default threshold: sharing 2-3 keys saves too little


def test_log_sum_exp_paths_agree():
    """The plain-matmul path (devices without torch's CPU flash kernel) gives the same output and log-sum-exp."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, KV_HEADS, n, DIM, generator=gen) for n in (9, 30, 30))
    mask = torch.zeros(2, 1, 9, 30).masked_fill_(torch.rand(2, 1, 9, 30, generator=gen) < 0.3, float("-inf"))
    mask[..., 0] = 0.0
    for m in (None, mask):
        out, lse = attention_module._attend(q, k, v, m)
        ref_out, ref_lse = attention_module._attend_matmul(q, k, v, m, DIM ** -0.5)
        assert torch.allclose(out, ref_out, atol=1e-5) and torch.allclose(lse, ref_lse, atol=1e-5)


@pytest.mark.parametrize("paged", PAGED)
@pytest.mark.parametrize("news", [[1] * 7, [1, 1, 6, 1, 3, 1, 9]])
def test_a_long_context_gets_its_own_group(news, paged, monkeypatch):
    """One long request among short ones is not padded against: decodes and extends split by context length
    (flat rows mapped back correctly), shared prefixes still found within a group."""
    contexts = shared_workload(4)
    gen = torch.Generator().manual_seed(5)
    used = {i for ctx in contexts for i in ctx}
    contexts.append([i for i in torch.randperm(POOL, generator=gen).tolist() if i not in used][:900])
    got, want, groups = run(contexts, news, 1, monkeypatch, paged)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    assert any(g.kv_indices.shape[1] >= 900 and g.kv_indices.shape[0] == 1 for g in groups)
    assert max(g.kv_indices.shape[1] for g in groups if g.kv_indices.shape[0] > 1) < 200
    assert any(g.prefixes for g in groups)
