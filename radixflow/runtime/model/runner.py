"""Model runner: turns a `ScheduledBatch` into tensors, runs one forward, samples. No scheduling decisions here."""

from __future__ import annotations

import time

import torch

from radixflow.runtime.cache.kv_pool import KVPool, ReqToTokenPool
from radixflow.runtime.constrained.bitmask import apply_bitmask, fill_bitmask
from radixflow.runtime.model.attention import AttentionGroup, AttentionInputs, SharedPrefix
from radixflow.runtime.model.llama import LlamaModel
from radixflow.runtime.model.sampler import SamplingRow, sample
from radixflow.runtime.request import TokenLogprobs
from radixflow.runtime.scheduler.batch import ModelOutput, ScheduledBatch, ScheduledReq


class ModelRunner:
    def __init__(self, model: LlamaModel, kv: KVPool, req_to_token: ReqToTokenPool, device: torch.device,
                 seed: int = 0, lazy_grammar_masks: bool = True):
        self.model = model
        self.kv = kv
        self.table = req_to_token.table
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.mask_seconds = 0.0  # time spent filling grammar masks, and how many request-steps it covered
        self.mask_rows = 0
        self.dtype = model.embed_tokens.weight.dtype
        self.lazy_grammar_masks = lazy_grammar_masks
        self.lazy_refusals = 0  # lazy checks where the model's choice was refused and the full mask was needed

    def run(self, batch: ScheduledBatch) -> ModelOutput:
        # Decodes first, then extends: a pure-decode batch is then one group covering every row in order.
        order = sorted(range(len(batch.reqs)), key=lambda i: not batch.reqs[i].is_decode)
        reqs = [batch.reqs[i] for i in order]
        offsets = _offsets([s.num_new for s in reqs])
        input_ids, positions, out_loc = self._token_inputs(reqs)
        logit_rows, row_of = self._logit_rows(reqs, offsets)
        attn = AttentionInputs(self.kv.k, self.kv.v, out_loc, self._groups(reqs, offsets),
                               torch.tensor(logit_rows, dtype=torch.int64, device=self.device))
        # Grammar masks depend only on what each request has emitted, so they are filled before the forward:
        # right after a forward, torch's OpenMP workers still spin on both cores and would slow the fill.
        bitmask, lazy = self._grammar_masks(reqs)
        logits = self.model(input_ids, positions, attn)
        output = self._outputs(reqs, logits, row_of, bitmask, lazy)
        return _reorder(output, order)

    def _token_inputs(self, reqs: list[ScheduledReq]):
        ids, positions = [], []
        for s in reqs:
            ids.extend(s.req.all_ids(s.start, s.end))
            positions.extend(range(s.start, s.end))
        if all(s.is_decode for s in reqs):
            slots = torch.tensor([s.req.slot for s in reqs], device=self.device)
            out_loc = self.table[slots, torch.tensor([s.start for s in reqs], device=self.device)]
        else:
            out_loc = torch.cat([self.table[s.req.slot, s.start:s.end] for s in reqs])
        to = dict(dtype=torch.int64, device=self.device)
        return torch.tensor(ids, **to), torch.tensor(positions, **to), out_loc

    def _groups(self, reqs: list[ScheduledReq], offsets: list[int]) -> list[AttentionGroup]:
        decodes = _by_length([i for i, s in enumerate(reqs) if s.is_decode], reqs)
        extends = _by_length([i for i, s in enumerate(reqs) if not s.is_decode], reqs)
        groups = []
        for part in decodes:
            # Decodes come first, one row each, so decode i is flat row i.
            whole_batch = len(decodes) == 1 and not extends
            groups.append(self._decode_group([reqs[i] for i in part], None if whole_batch else part))
        for part in extends:
            groups.append(self._extend_group([reqs[i] for i in part], [offsets[i] for i in part]))
        return groups

    def _decode_group(self, reqs: list[ScheduledReq], flat_rows: list[int] | None) -> AttentionGroup:
        """flat_rows: each request's row in the batch; None when the group is the whole batch in order."""
        dev = self.device
        starts = torch.tensor([s.start for s in reqs], device=dev)
        rows = None if flat_rows is None else torch.tensor(flat_rows, device=dev)[:, None]
        kv_indices, mask, prefixes = self._context(reqs, starts, starts[:, None])
        return AttentionGroup(rows=rows, valid=None, kv_indices=kv_indices, mask=mask, prefixes=prefixes)

    def _extend_group(self, reqs: list[ScheduledReq], offsets: list[int]) -> AttentionGroup:
        dev = self.device
        window = self.model.args.sliding_window
        if len(reqs) == 1 and reqs[0].start == 0 and (window is None or reqs[0].end <= window):
            s = reqs[0]
            rows = torch.arange(offsets[0], offsets[0] + s.num_new, device=dev)[None, :]
            return AttentionGroup(rows=rows, valid=None, kv_indices=self.table[s.req.slot, : s.end][None, :],
                                  mask=None, is_causal=True)
        starts = torch.tensor([s.start for s in reqs], device=dev)
        news = torch.tensor([s.num_new for s in reqs], device=dev)
        q_idx = torch.arange(int(news.max()), device=dev)[None, :]
        valid = q_idx < news[:, None]
        # Padded query rows repeat the last real one, so no row is fully masked.
        last = torch.minimum(q_idx, news[:, None] - 1)
        rows = torch.tensor(offsets, device=dev)[:, None] + last
        kv_indices, mask, prefixes = self._context(reqs, starts, starts[:, None] + last)
        return AttentionGroup(rows=rows, valid=None if bool(valid.all()) else valid, kv_indices=kv_indices,
                              mask=mask, prefixes=prefixes)

    def _context(self, reqs: list[ScheduledReq], starts: torch.Tensor, q_pos: torch.Tensor):
        """Each request's keys: the pool indices not covered by a shared prefix, the causal mask over them for
        query positions `q_pos` ([B, Q]) in the layout `AttentionGroup.mask` describes, and the shared prefixes."""
        dev = self.device
        slots = torch.tensor([s.req.slot for s in reqs], device=dev)
        ends = torch.tensor([s.end for s in reqs], device=dev)
        full = self.table[slots, : int(ends.max())]
        window = self.model.args.sliding_window
        if window is None or full.shape[1] <= window:
            prefixes, skip = _shared_prefixes(full, starts)
        else:  # some keys fall outside some queries' windows: no key is attended by every query
            prefixes, skip = [], torch.zeros(len(reqs), dtype=torch.int64, device=dev)
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
        per_kv = self.model.args.num_heads // self.model.args.num_kv_heads
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=dev).masked_fill_(~allowed, float("-inf"))
        batch, queries, width = allowed.shape
        mask = mask[:, None, :, None, :].expand(batch, 1, queries, per_kv, width).reshape(
            batch, 1, queries * per_kv, width)
        return kv_indices, mask, prefixes

    def _logit_rows(self, reqs: list[ScheduledReq], offsets: list[int]):
        """Flat rows whose logits are needed, and per request where its rows sit in the logits tensor."""
        rows, row_of = [], []
        for s, off in zip(reqs, offsets):
            prompt_rows = [off + q - s.start for q in s.prompt_logprob_rows()]
            sample_row = [off + s.num_new - 1] if s.samples else []
            row_of.append((len(rows), len(prompt_rows), len(sample_row)))
            rows.extend(prompt_rows + sample_row)
        return rows, row_of

    def _grammar_masks(self, reqs: list[ScheduledReq]) -> tuple[torch.Tensor | None, list[int]]:
        """One bitmask row per sampling request (in sampling order), or None when no row needs one; and the
        sampling rows left to the lazy check (see `_check_lazy`), whose bitmask rows stay all-allowed. The time
        spent here counts as mask time, the forced-text queries included."""
        sampling = [s for s in reqs if s.samples]
        matchers = [s.req.grammar.matcher if s.req.grammar is not None else None for s in sampling]
        if all(m is None for m in matchers):
            return None, []
        start = time.perf_counter()
        # Not where the grammar forces text: there llguidance's mask admits only the forced text's own token
        # split (`{"`, not `{` then `"`), which a one-token check does not see; such masks are cheap anyway.
        lazy = [j for j, (s, m) in enumerate(zip(sampling, matchers))
                if m is not None and self.lazy_grammar_masks and _plain_greedy(s) and not m.compute_ff_bytes()]
        for j in lazy:
            matchers[j] = None
        bitmask = None
        if any(m is not None for m in matchers):
            bitmask = fill_bitmask(matchers, self.model.args.vocab_size)
            self.mask_rows += sum(m is not None for m in matchers)
        self.mask_seconds += time.perf_counter() - start
        return bitmask, lazy

    def _check_lazy(self, sampling: list[ScheduledReq], logits: torch.Tensor, tokens: list[int], lazy: list[int]):
        """Greedy constrained rows were sampled without a mask: keep the model's choice when the grammar accepts
        it (one token checked, a few microseconds), otherwise fill those rows' masks and take the best allowed
        token. The result is what masking first gives (the argmax over allowed tokens), at a fraction of the
        cost: a full mask walks the 49,152-token vocabulary (up to hundreds of microseconds inside free text)
        and the model's own choice is usually allowed. llama.cpp's grammar sampler does the same. In place."""
        start = time.perf_counter()
        refused = [j for j in lazy if sampling[j].req.grammar.matcher.validate_tokens([tokens[j]]) != 1]
        if refused:
            masks = fill_bitmask([sampling[j].req.grammar.matcher for j in refused], self.model.args.vocab_size)
            rows = logits[refused]  # indexing with a list copies: the caller's logits stay as they are
            apply_bitmask(rows, masks)
            for j, token in zip(refused, rows.argmax(dim=-1).tolist()):
                tokens[j] = token
            self.lazy_refusals += len(refused)
        self.mask_seconds += time.perf_counter() - start
        self.mask_rows += len(lazy)

    def _outputs(self, reqs: list[ScheduledReq], logits: torch.Tensor, row_of, bitmask, lazy) -> ModelOutput:
        sampling = [(i, s) for i, s in enumerate(reqs) if s.samples]
        sample_rows = [row_of[i][0] + row_of[i][1] for i, _ in sampling]
        next_ids: list[int | None] = [None] * len(reqs)
        next_lps: list[TokenLogprobs | None] = [None] * len(reqs)
        if sampling:
            want = any(s.req.logprob.return_logprob for _, s in sampling)
            sample_logits = logits[sample_rows]
            result = sample(sample_logits, [_sampling_row(s) for _, s in sampling], self.generator, bitmask,
                            want_logprobs=want)
            if lazy:
                self._check_lazy([s for _, s in sampling], sample_logits, result.token_ids, lazy)
            for j, (i, s) in enumerate(sampling):
                next_ids[i] = result.token_ids[j]
                if s.req.logprob.return_logprob:
                    next_lps[i] = _token_logprobs(result.logprobs[j], result.token_ids[j], s.req.logprob.top_logprobs_num)
        prompt_lps = []
        for i, s in enumerate(reqs):
            first, count, _ = row_of[i]
            if not count:
                prompt_lps.append([])
                continue
            lp = torch.log_softmax(logits[first:first + count], dim=-1)
            targets = [s.req.prompt_ids[q + 1] for q in s.prompt_logprob_rows()]
            prompt_lps.append([_token_logprobs(lp[j], t, s.req.logprob.top_logprobs_num) for j, t in enumerate(targets)])
        return ModelOutput(next_ids, next_lps, prompt_lps)


def _by_length(indices: list[int], reqs: list[ScheduledReq]) -> list[list[int]]:
    """Split requests into attention groups of similar context length, longest first. A group pads every request
    to its longest context, so one 4,000-token request among 16 short ones made each decode step gather and
    attend 17 x 4,000 keys (1.4-2.8 s steps on this CPU instead of ~0.1 s). A request starts a new group when
    the group's longest context exceeds twice its own plus PAD_SLACK tokens; below that an extra attention call
    per layer costs more than the padding."""
    order = sorted(indices, key=lambda i: reqs[i].end, reverse=True)
    parts: list[list[int]] = []
    for i in order:
        if parts and reqs[parts[-1][0]].end <= 2 * reqs[i].end + PAD_SLACK:
            parts[-1].append(i)
        else:
            parts.append([i])
    return [sorted(part) for part in parts]


PAD_SLACK = 256

# Shared-prefix attention pays one extra attention call and a merge per prefix and layer; it wins once it saves
# gathering about a thousand tokens per layer (measured on this 2-core CPU: 32 requests sharing 40 tokens, 4x
# faster; 8 sharing 200, slightly slower; 64 sharing 1,000, 12x faster).
MIN_SHARED_GATHER = 1024


def _shared_prefixes(kv_indices: torch.Tensor, starts: torch.Tensor) -> tuple[list[SharedPrefix], torch.Tensor]:
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


def _plain_greedy(s: ScheduledReq) -> bool:
    """The row's token is the argmax of its raw logits (no penalties, nothing banned): a lazy mask check is
    exact for it."""
    p = s.req.params
    return p.greedy and not p.has_penalties


def _sampling_row(s: ScheduledReq) -> SamplingRow:
    req = s.req
    p = req.params
    # A grammar decides by itself when the output may end, so min_new_tokens does not ban EOS under one.
    banned = req.stop_ids if req.num_output < p.min_new_tokens and req.grammar is None else frozenset()
    return SamplingRow(
        params=p,
        prior_ids=req.all_ids() if p.repetition_penalty != 1.0 else [],
        output_ids=list(req.output_ids) if (p.frequency_penalty or p.presence_penalty) else [],
        banned_ids=banned,
        step=req.num_output,
    )


def _token_logprobs(row: torch.Tensor, token: int, top_n: int) -> TokenLogprobs:
    top = ()
    if top_n:
        values, ids = row.topk(top_n)
        top = tuple(zip(ids.tolist(), values.tolist()))
    return TokenLogprobs(float(row[token]), top)


def _offsets(sizes: list[int]) -> list[int]:
    out, total = [], 0
    for n in sizes:
        out.append(total)
        total += n
    return out


def _reorder(output: ModelOutput, order: list[int]) -> ModelOutput:
    """Undo the decode-first ordering so results line up with the scheduler's batch."""
    inverse = [0] * len(order)
    for pos, i in enumerate(order):
        inverse[i] = pos
    return ModelOutput([output.next_token_ids[p] for p in inverse], [output.next_logprobs[p] for p in inverse],
                       [output.prompt_logprobs[p] for p in inverse])
