"""Attention over the token-level KV pool, with shared-prefix (cascade) attention for requests that share cached
tokens.

A batch's tokens are flat (`[num_tokens, heads, dim]`). Requests fall into two groups, each handled by one
attention call per layer (plus one per shared prefix):

* decode: one query token per request, keys = the request's whole context;
* extend: several new tokens per request (prefill, chunked prefill, or the suffix after a cached prefix),
  keys = cached prefix + new tokens, causal.

Each group gathers its requests' keys and values from the pool with one `index_select` over a padded
`[requests, max_context]` index table (index_select is ~7x faster than advanced indexing on CPU) and masks the
padding. New K/V are written to the pool before the gather, so a request's own new tokens come back through the
same path as its cached prefix.

Shared prefixes: requests that sit under the same radix-tree path have the same pool slots for those tokens.
Gathering them once per request per layer is what dominated decoding behind a long few-shot prefix (64 requests
x 1,000 shared tokens: 45 ms of copying per layer). Instead the runner splits each such request's context in two:
the shared prefix, attended by all its requests' queries in one call against one gathered copy, and the
request's own suffix. The two partial results are merged exactly with their log-sum-exps (the FlashAttention
rescaling), so the output equals attention over the whole context.

For that merge the queries are laid out with the query heads that share a KV head folded into the query axis
(`[B, kv_heads, queries * group, D]`), which torch's CPU flash kernel takes with no copies of K/V per query head
and which lets all members of a prefix share one call. Groups without a shared prefix keep SDPA's layout, whose
masks are `group` times smaller (a 512-token chunk over a 4,000-token context: 2 MB rather than 24).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class SharedPrefix:
    """Requests of a group whose contexts begin with the same pool slots (the same cached tokens)."""

    members: torch.Tensor     # [m] indices of the requests within their group
    kv_indices: torch.Tensor  # [P] pool indices of the shared tokens


@dataclass
class AttentionGroup:
    """Requests that share one attention call.

    rows: for each (request, query slot), the flat token row it reads/writes; `None` means the group is the
      whole batch with one query per row in order (the pure-decode fast path: no scatter needed).
    valid: [requests, max_queries] bool, False on query padding (extend only).
    kv_indices: [requests, max_context] pool indices of each request's keys not covered by a shared prefix
      (padding points at index 0 and is masked).
    mask: None when nothing is masked. Without shared prefixes: [requests, 1, max_queries, max_context] bool
      (True = attend), for SDPA. With them, the folded layout (below): additive float (0 = attend, -inf = not),
      [requests, 1, max_queries * group, max_context], each query's row repeated for the `group` query heads that
      share a KV head.
    is_causal: a single fresh prompt (no prefix, no padding) uses SDPA's own causal mode (mask is None).
    prefixes: shared prefixes attended separately and merged (see the module docstring).
    """

    rows: torch.Tensor | None
    valid: torch.Tensor | None
    kv_indices: torch.Tensor
    mask: torch.Tensor | None
    is_causal: bool = False
    prefixes: list[SharedPrefix] = field(default_factory=list)


@dataclass
class AttentionInputs:
    k_cache: list[torch.Tensor]  # per layer: [pool_size, kv_heads, head_dim]
    v_cache: list[torch.Tensor]
    out_cache_loc: torch.Tensor  # [num_tokens] pool index each new token's K/V is written to
    groups: list[AttentionGroup]
    logits_rows: torch.Tensor | None  # rows whose logits are needed; None = all rows


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, inp: AttentionInputs):
    """q: [T, H, D]; k, v: [T, Hkv, D] (new tokens). Returns [T, H, D]."""
    k_cache, v_cache = inp.k_cache[layer], inp.v_cache[layer]
    k_cache.index_copy_(0, inp.out_cache_loc, k)
    v_cache.index_copy_(0, inp.out_cache_loc, v)
    if len(inp.groups) == 1 and inp.groups[0].rows is None:
        return _group_attention(q.unsqueeze(1), k_cache, v_cache, inp.groups[0]).squeeze(1)
    out = torch.empty_like(q)
    for group in inp.groups:
        rows = group.rows
        group_out = _group_attention(q[rows], k_cache, v_cache, group)
        if group.valid is None:
            out[rows] = group_out
        else:
            out[rows[group.valid]] = group_out[group.valid]
    return out


def _group_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: AttentionGroup):
    """q: [B, Q, H, D] -> [B, Q, H, D]."""
    keys, values = _gather(k_cache, v_cache, group.kv_indices)
    if not group.prefixes:
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=group.mask,
                                             is_causal=group.is_causal, enable_gqa=True)
        return out.transpose(1, 2)
    batch, queries, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    per_kv = heads // kv_heads
    # [B, Q, Hkv, g, D] -> [B, Hkv, Q * g, D]: the g query heads of a KV head become extra query rows.
    folded = q.view(batch, queries, kv_heads, per_kv, dim).permute(0, 2, 1, 3, 4).reshape(
        batch, kv_heads, queries * per_kv, dim)
    out, lse = _attend(folded, keys, values, group.mask)
    for prefix in group.prefixes:
        out, lse = _merge_prefix(folded, out, lse, k_cache, v_cache, prefix)
    return out.view(batch, kv_heads, queries, per_kv, dim).permute(0, 2, 1, 3, 4).reshape(batch, queries, heads, dim)


def _gather(k_cache: torch.Tensor, v_cache: torch.Tensor, kv_indices: torch.Tensor):
    """[B, L] pool indices -> keys, values as [B, Hkv, L, D]."""
    batch, ctx = kv_indices.shape
    flat = kv_indices.reshape(-1)
    keys = k_cache.index_select(0, flat).view(batch, ctx, *k_cache.shape[1:]).transpose(1, 2)
    values = v_cache.index_select(0, flat).view(batch, ctx, *v_cache.shape[1:]).transpose(1, 2)
    return keys, values


def _merge_prefix(folded, out, lse, k_cache, v_cache, prefix: SharedPrefix):
    """Attend the members' queries to their shared prefix (one gathered copy, one call) and fold the result into
    their suffix attention: softmax over the union = the two partial softmaxes weighted by exp(lse)."""
    members = prefix.members
    member_q = folded[members]
    m, kv_heads, rows, dim = member_q.shape
    keys, values = _gather(k_cache, v_cache, prefix.kv_indices[None, :])
    # All members' query rows against the one prefix: [1, Hkv, m * rows, D].
    queries = member_q.transpose(0, 1).reshape(1, kv_heads, m * rows, dim)
    p_out, p_lse = _attend(queries, keys, values, None)
    p_out = p_out.view(kv_heads, m, rows, dim).transpose(0, 1)
    p_lse = p_lse.view(kv_heads, m, rows).transpose(0, 1)
    s_out, s_lse = out[members], lse[members]
    new_lse = torch.logaddexp(s_lse, p_lse)
    merged = s_out * (s_lse - new_lse).exp().unsqueeze(-1) + p_out * (p_lse - new_lse).exp().unsqueeze(-1)
    out = out.index_copy(0, members, merged.to(out.dtype))
    lse = lse.index_copy(0, members, new_lse)
    return out, lse


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None):
    """Softmax attention and the log-sum-exp of each query row's scores. q: [B, Hkv, N, D]; k, v: [B, Hkv, L, D];
    mask additive, broadcast over heads. On CPU, torch's flash kernel returns both at once; elsewhere plain
    matmuls (correct on any device)."""
    scale = q.shape[-1] ** -0.5
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=mask, scale=scale)
    return _attend_matmul(q, k, v, mask, scale)


def _attend_matmul(q, k, v, mask, scale):
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    if mask is not None:
        scores = scores + mask
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul((scores - lse.unsqueeze(-1)).exp().to(v.dtype), v), lse
