"""Attention over the token-level KV pool.

A batch's tokens are flat (`[num_tokens, heads, dim]`). Requests fall into two groups, each handled by one
SDPA call per layer:

* decode: one query token per request, keys = the request's whole context;
* extend: several new tokens per request (prefill, chunked prefill, or the suffix after a cached prefix),
  keys = cached prefix + new tokens, causal.

Each group gathers its requests' keys and values from the pool with one `index_select` over a padded
`[requests, max_context]` index table (index_select is ~7x faster than advanced indexing on CPU) and masks the
padding. New K/V are written to the pool before the gather, so a request's own new tokens come back through the
same path as its cached prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionGroup:
    """Requests that share one SDPA call.

    rows: for each (request, query slot), the flat token row it reads/writes; `None` means the group is the
      whole batch with one query per row in order (the pure-decode fast path: no scatter needed).
    valid: [requests, max_queries] bool, False on query padding (extend only).
    kv_indices: [requests, max_context] pool indices (padding points at index 0 and is masked).
    mask: [requests, 1, max_queries, max_context] bool (True = attend), or None when nothing is masked.
    is_causal: a single fresh prompt (no prefix, no padding) uses SDPA's own causal mode.
    """

    rows: torch.Tensor | None
    valid: torch.Tensor | None
    kv_indices: torch.Tensor
    mask: torch.Tensor | None
    is_causal: bool = False


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


def _group_attention(q: torch.Tensor, k_cache, v_cache, group: AttentionGroup) -> torch.Tensor:
    """q: [B, Q, H, D] -> [B, Q, H, D]."""
    batch, ctx = group.kv_indices.shape
    flat = group.kv_indices.reshape(-1)
    keys = k_cache.index_select(0, flat).view(batch, ctx, *k_cache.shape[1:]).transpose(1, 2)
    values = v_cache.index_select(0, flat).view(batch, ctx, *v_cache.shape[1:]).transpose(1, 2)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), keys, values, attn_mask=group.mask, is_causal=group.is_causal, enable_gqa=True
    )
    return out.transpose(1, 2)
