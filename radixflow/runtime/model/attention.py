"""Attention over the token-level KV pool, with shared-prefix (cascade) attention for requests that share cached
tokens.

A batch's tokens are flat (`[num_tokens, heads, dim]`). Requests fall into two groups, each handled by one
attention call per layer (plus one per shared prefix):

* decode: one query token per request, keys = the request's whole context;
* extend: several new tokens per request (prefill, chunked prefill, or the suffix after a cached prefix),
  keys = cached prefix + new tokens, causal.

`AttentionPlanner` builds a batch's groups from the request-to-token table (this module's first half); the
attention functions run them (its second half). Requests of very different context lengths go to different
groups, because a group pads every request to its longest context.

Each group gathers its requests' keys and values from the pool with one `index_select` over a padded
`[requests, max_context]` index table (index_select is much faster than advanced indexing on CPU; see
bench/RESULTS.md) and masks the padding. New K/V are written to the pool before the gather, so a request's own
new tokens come back through the same path as its cached prefix.

Groups without a shared prefix skip the gather where the paged kernels run (decode_attention.cpp; `--attention-backend
auto`): `decode_kernel` for decode groups, `extend_kernel` for extend groups (new tokens after a cached prefix, prefill
chunks up to `EXTEND_KERNEL_MAX_WORK`); both read each key and value row where it sits in the pool.

Shared prefixes: requests that sit under the same radix-tree path have the same pool slots for those tokens.
Gathering them once per request per layer is what dominated decoding behind a long few-shot prefix. Instead the
planner splits each such request's context in two: the shared prefix, attended by all its requests' queries in
one call against one gathered copy, and the request's own suffix. The two partial results are merged exactly
with their log-sum-exps (the FlashAttention rescaling), so the output equals attention over the whole context.

For that merge the queries are laid out with the query heads that share a KV head folded into the query axis
(`[B, kv_heads, queries * group, D]`), which torch's CPU flash kernel takes with no copies of K/V per query head
and which lets all members of a prefix share one call. Groups without a shared prefix keep SDPA's layout, whose
masks are `group` times smaller.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from radixflow.runtime.cache.kv_pool import ReqToTokenPool

# A request starts a new attention group when the group's longest context exceeds twice its own plus this many
# tokens; below that, an extra attention call per layer costs more than the padding.
PAD_SLACK = 256

# The extend kernel runs a request's queries x keys up to this; above it gather + SDPA, whose flash kernel works on
# larger blocks and gains on the kernel as the context grows. On a 2-core Zen 3 (2026-12-07, night 3) the kernel ran
# a 15-token extend over 1,035 keys 1.5x faster, a whole causal 1,002-token prompt 1.3x, and the last 512-token
# chunk of a 2,048- / 4,096-token prompt 1.18x / 1.09x; longer was not measured (`python -m bench.bench_attention`,
# bench/RESULTS.md).
EXTEND_KERNEL_MAX_WORK = 512 * 4096

# Shared-prefix attention pays one extra attention call and a merge per prefix and layer; it wins once it saves
# gathering about a thousand tokens per layer (bench/RESULTS.md, "Shared-prefix attention").
MIN_SHARED_GATHER = 1024


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
    paged_kernels: bool = False  # groups without a shared prefix run on the paged kernels (LlamaModel.paged_kernels)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
        return paged_attention(q, k, v, layer, self)


@dataclass
class DecodeStepInputs:
    """A pure-decode batch (one group over every row, no shared prefix) for the compiled decode step
    (`compiled.py`).

    The new tokens' K/V are not written to the pool inside the step: an in-place write into a graph input makes
    the compiler copy the whole pool. Instead each layer gathers the context, puts the new K/V in place of their
    (not yet written) pool rows, attends, and keeps the new K/V in `new_kv`; the caller writes them all to the
    pool with one copy after the step.
    """

    kv_buffer: torch.Tensor  # the pool: [2, layers, pool_size, kv_heads, head_dim]
    kv_indices: torch.Tensor  # [requests, max_context], each row's new token included
    out_cache_loc: torch.Tensor  # [requests]
    mask: torch.Tensor | None  # [requests, 1, 1, max_context] bool, True = attend; None = attend everything
    paged_kernels: bool = False  # attend on the paged decode kernel (LlamaModel.paged_kernels)
    logits_rows: None = None
    new_kv: list[torch.Tensor] = field(default_factory=list)  # per layer: [2, requests, kv_heads, head_dim]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
        if self.paged_kernels:  # the kernel reads the new K/V from k, v where a row's index is out_cache_loc
            self.new_kv.append(torch.stack([k, v]))
            return decode_kernel(q, self.kv_buffer[0, layer], self.kv_buffer[1, layer], self.kv_indices, self.mask,
                                 self.out_cache_loc, k, v)
        keys, values = _gather(self.kv_buffer[0, layer], self.kv_buffer[1, layer], self.kv_indices)
        is_new = (self.kv_indices == self.out_cache_loc[:, None])[:, None, :, None]  # [B, 1, L, 1]
        keys = torch.where(is_new, k[:, :, None], keys)
        values = torch.where(is_new, v[:, :, None], values)
        self.new_kv.append(torch.stack([k, v]))
        out = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=self.mask, enable_gqa=True)
        return out.squeeze(2)


@dataclass(frozen=True)
class QuerySpan:
    """One request's new tokens in a batch: positions [start, start + num_new) of its request-to-token slot."""

    slot: int
    start: int
    num_new: int

    @property
    def end(self) -> int:
        return self.start + self.num_new

    @property
    def is_decode(self) -> bool:
        return self.num_new == 1


class AttentionPlanner:
    """Turns a batch's query spans into attention groups over the request-to-token table."""

    def __init__(self, req_to_token: ReqToTokenPool, num_heads: int, num_kv_heads: int,
                 sliding_window: int | None, dtype: torch.dtype, device: torch.device):
        self.req_to_token = req_to_token
        self.per_kv = num_heads // num_kv_heads
        self.window = sliding_window
        self.dtype = dtype
        self.device = device

    def plan(self, spans: list[QuerySpan]) -> list[AttentionGroup]:
        """`spans` in the batch's flat token order, decodes first (a pure-decode batch is one group over every row
        in order: the fast path with no scatter)."""
        offsets = _offsets([s.num_new for s in spans])
        decodes = _by_length([i for i, s in enumerate(spans) if s.is_decode], spans)
        extends = _by_length([i for i, s in enumerate(spans) if not s.is_decode], spans)
        groups = []
        for part in decodes:
            # Decodes come first, one row each, so decode i is flat row i.
            whole_batch = len(decodes) == 1 and not extends
            groups.append(self._decode_group([spans[i] for i in part], None if whole_batch else part))
        for part in extends:
            groups.append(self._extend_group([spans[i] for i in part], [offsets[i] for i in part]))
        return groups

    def _decode_group(self, spans: list[QuerySpan], flat_rows: list[int] | None) -> AttentionGroup:
        """flat_rows: each request's row in the batch; None when the group is the whole batch in order."""
        starts = torch.tensor([s.start for s in spans], device=self.device)
        rows = None if flat_rows is None else torch.tensor(flat_rows, device=self.device)[:, None]
        kv_indices, mask, prefixes = self._context(spans, starts, starts[:, None])
        return AttentionGroup(rows=rows, valid=None, kv_indices=kv_indices, mask=mask, prefixes=prefixes)

    def _extend_group(self, spans: list[QuerySpan], offsets: list[int]) -> AttentionGroup:
        dev = self.device
        if len(spans) == 1 and spans[0].start == 0 and (self.window is None or spans[0].end <= self.window):
            s = spans[0]
            rows = torch.arange(offsets[0], offsets[0] + s.num_new, device=dev)[None, :]
            kv_indices = self.req_to_token.table[s.slot, : s.end][None, :]
            return AttentionGroup(rows=rows, valid=None, kv_indices=kv_indices, mask=None, is_causal=True)
        starts = torch.tensor([s.start for s in spans], device=dev)
        news = torch.tensor([s.num_new for s in spans], device=dev)
        q_idx = torch.arange(int(news.max()), device=dev)[None, :]
        valid = q_idx < news[:, None]
        # Padded query rows repeat the last real one, so no row is fully masked.
        last = torch.minimum(q_idx, news[:, None] - 1)
        rows = torch.tensor(offsets, device=dev)[:, None] + last
        kv_indices, mask, prefixes = self._context(spans, starts, starts[:, None] + last)
        return AttentionGroup(rows=rows, valid=None if bool(valid.all()) else valid, kv_indices=kv_indices,
                              mask=mask, prefixes=prefixes)

    def _context(self, spans: list[QuerySpan], starts: torch.Tensor, q_pos: torch.Tensor):
        """Each request's keys: the pool indices not covered by a shared prefix, the causal mask over them for
        query positions `q_pos` ([B, Q]) in the layout `AttentionGroup.mask` describes, and the shared prefixes."""
        dev = self.device
        slots = torch.tensor([s.slot for s in spans], device=dev)
        ends = torch.tensor([s.end for s in spans], device=dev)
        full = self.req_to_token.table[slots, : int(ends.max())]
        window = self.window
        if window is None or full.shape[1] <= window:
            prefixes, skip = shared_prefixes(full, starts)
        else:  # some keys fall outside some queries' windows: no key is attended by every query
            prefixes, skip = [], torch.zeros(len(spans), dtype=torch.int64, device=dev)
        if prefixes:
            # Row i keeps its keys from skip[i] on: gather the table shifted left by skip[i] (padding clamped).
            width = int((ends - skip).max())
            cols = (skip[:, None] + torch.arange(width, device=dev)[None, :]).clamp(max=full.shape[1] - 1)
            kv_indices = full.gather(1, cols)
        else:
            kv_indices = full
        key_pos = skip[:, None, None] + torch.arange(kv_indices.shape[1], device=dev)[None, None, :]
        allowed = key_pos <= q_pos[:, :, None]  # [B, Q, L]: causal, which also masks each row's padding
        if window is not None:
            allowed &= key_pos > q_pos[:, :, None] - window
        if bool(allowed.all()):
            return kv_indices, None, prefixes
        if not prefixes:
            return kv_indices, allowed[:, None], prefixes
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=dev).masked_fill_(~allowed, float("-inf"))
        batch, queries, width = allowed.shape
        mask = mask[:, None, :, None, :].expand(batch, 1, queries, self.per_kv, width).reshape(
            batch, 1, queries * self.per_kv, width)
        return kv_indices, mask, prefixes


def _by_length(indices: list[int], spans: list[QuerySpan]) -> list[list[int]]:
    """Split requests into attention groups of similar context length, longest first: one long request among
    many short decodes would otherwise make every decode attend the long context (see PAD_SLACK)."""
    order = sorted(indices, key=lambda i: spans[i].end, reverse=True)
    parts: list[list[int]] = []
    for i in order:
        if parts and spans[parts[-1][0]].end <= 2 * spans[i].end + PAD_SLACK:
            parts[-1].append(i)
        else:
            parts.append([i])
    return [sorted(part) for part in parts]


def shared_prefixes(kv_indices: torch.Tensor, starts: torch.Tensor) -> tuple[list[SharedPrefix], torch.Tensor]:
    """Groups of requests whose first keys are the same pool slots (requests under one radix-tree path), with
    the length of what they share; a group is kept when sharing saves enough gathering. kv_indices: [B, L];
    starts: [B], each request's first new token (its keys before that are cached context). Returns the prefixes
    and, per request, how many of its leading keys a prefix covers."""
    batch = kv_indices.shape[0]
    skip = torch.zeros(batch, dtype=torch.int64, device=kv_indices.device)
    if batch < 2 or kv_indices.shape[1] == 0:
        return [], skip
    _, inverse, counts = torch.unique(kv_indices[:, 0], return_inverse=True, return_counts=True)
    prefixes = []
    for k in torch.nonzero(counts > 1).flatten().tolist():
        members = torch.nonzero(inverse == k).flatten()
        limit = int(starts[members].min())  # keys before every member's new tokens
        if limit * (len(members) - 1) < MIN_SHARED_GATHER:
            continue
        rows = kv_indices[members, :limit]
        same = (rows == rows[:1]).all(dim=0)
        length = limit if bool(same.all()) else int(same.to(torch.int8).argmin())
        if length * (len(members) - 1) < MIN_SHARED_GATHER:
            continue
        prefixes.append(SharedPrefix(members, kv_indices[members[0], :length]))
        skip[members] = length
    return prefixes, skip


def _offsets(sizes: list[int]) -> list[int]:
    out, total = [], 0
    for n in sizes:
        out.append(total)
        total += n
    return out


# -- running the groups ------------------------------------------------------------------------------------------
def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, inp: AttentionInputs):
    """q: [T, H, D]; k, v: [T, Hkv, D] (new tokens). Returns [T, H, D]."""
    k_cache, v_cache = inp.k_cache[layer], inp.v_cache[layer]
    k_cache.index_copy_(0, inp.out_cache_loc, k)
    v_cache.index_copy_(0, inp.out_cache_loc, v)
    if len(inp.groups) == 1 and inp.groups[0].rows is None:
        return _group_attention(q.unsqueeze(1), k_cache, v_cache, inp.groups[0], inp.paged_kernels).squeeze(1)
    out = torch.empty_like(q)
    for group in inp.groups:
        rows = group.rows
        group_out = _group_attention(q[rows], k_cache, v_cache, group, inp.paged_kernels)
        if group.valid is None:
            out[rows] = group_out
        else:
            out[rows[group.valid]] = group_out[group.valid]
    return out


def _group_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: AttentionGroup,
                     paged_kernels: bool = False):
    """q: [B, Q, H, D] -> [B, Q, H, D]."""
    if paged_kernels and not group.prefixes:  # the group's mask, if any, is bool
        if q.shape[1] == 1:
            return decode_kernel(q[:, 0], k_cache, v_cache, group.kv_indices, group.mask)[:, None]
        if q.shape[1] * group.kv_indices.shape[1] <= EXTEND_KERNEL_MAX_WORK:
            return extend_kernel(q, k_cache, v_cache, group.kv_indices, group.mask, group.is_causal)
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


def decode_kernel(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_indices: torch.Tensor,
                  mask: torch.Tensor | None, loc: torch.Tensor | None = None, new_k: torch.Tensor | None = None,
                  new_v: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention on decode_attention.cpp, reading K/V where they sit in the pool. q: [B, H, D]; k_cache,
    v_cache: [pool, Hkv, D]; kv_indices: [B, L]; mask: bool, B x L elements (True = attend) or None; where row b's
    index equals loc[b], the key and value are new_k[b], new_v[b] ([B, Hkv, D]) instead of the pool's. -> [B, H, D]"""
    return torch.ops.radixflow_attention.decode_attention(q, k_cache, v_cache, kv_indices, mask, loc, new_k, new_v,
                                                          q.shape[-1] ** -0.5)


def extend_kernel(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_indices: torch.Tensor,
                  mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """Attention of several new tokens per request on decode_attention.cpp, reading K/V where they sit in the pool.
    q: [B, Q, H, D]; kv_indices: [B, L]; mask: bool, B x Q x L elements (True = attend), or None with `causal` (query
    i attends keys up to i + L - Q) or attending everything. -> [B, Q, H, D]"""
    return torch.ops.radixflow_attention.extend_attention(q, k_cache, v_cache, kv_indices, mask, causal,
                                                          q.shape[-1] ** -0.5)


def paged_kernels_supported(q_heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                            device: torch.device) -> bool:
    """Whether decode_attention.cpp's kernels take a model of this shape (their limits) on `device`: the CPU in
    float32."""
    return (device.type == "cpu" and dtype == torch.float32 and q_heads % kv_heads == 0
            and q_heads // kv_heads <= PAGED_MAX_GROUP and head_dim % 8 == 0
            and head_dim <= PAGED_MAX_DIM)


PAGED_MAX_GROUP = 16  # decode_attention.cpp's kMaxGroup: query heads per KV head
PAGED_MAX_DIM = 256  # its kMaxDim


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
