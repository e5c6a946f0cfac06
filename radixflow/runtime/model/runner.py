"""Model runner: turns a `ScheduledBatch` into tensors, runs one forward, samples. No scheduling decisions here."""

from __future__ import annotations

from typing import NamedTuple

import torch

from radixflow.runtime.cache.kv_pool import KVPool, ReqToTokenPool
from radixflow.runtime.constrained.masking import GrammarMasker, MaskPlan
from radixflow.runtime.model.attention import AttentionInputs, AttentionPlanner, QuerySpan
from radixflow.runtime.model.compiled import CompiledDecode
from radixflow.runtime.model.llama import LlamaModel
from radixflow.runtime.model.sampler import SamplingRow, probabilities, sample
from radixflow.runtime.request import TokenLogprobs
from radixflow.runtime.scheduler.batch import ModelOutput, ScheduledBatch, ScheduledReq
from radixflow.runtime.scheduler.speculative import verify


class LogitRows(NamedTuple):
    """Where one request's rows sit in the logits tensor: `num_prompt` prompt-logprob rows from `first`, then its
    sampling row if it samples, then one row per draft token it verifies."""

    first: int
    num_prompt: int
    samples: bool
    num_draft: int = 0

    @property
    def sample_row(self) -> int:
        return self.first + self.num_prompt


class ModelRunner:
    def __init__(self, model: LlamaModel, kv: KVPool, req_to_token: ReqToTokenPool, device: torch.device,
                 seed: int = 0, lazy_grammar_masks: bool = True, forward=None, compiled: CompiledDecode | None = None):
        self.model = model
        # The model call; under tensor parallelism rank 0's, which sends the inputs to the other ranks first.
        self.forward = forward or model
        self.compiled = compiled  # the compiled decode step (--enable-torch-compile), for the batches it takes
        self.kv = kv
        self.req_to_token = req_to_token
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        args = model.args
        self.attention = AttentionPlanner(req_to_token, args.num_heads, args.num_kv_heads, args.sliding_window,
                                          model.embed_tokens.weight.dtype, device)
        self.masker = GrammarMasker(args.vocab_size, lazy_grammar_masks)

    def run(self, batch: ScheduledBatch) -> list[ModelOutput]:
        """One output per scheduled request, in batch order."""
        # Decodes first, then extends: a pure-decode batch is then one attention group over every row in order.
        order = sorted(range(len(batch.reqs)), key=lambda i: not batch.reqs[i].is_decode)
        reqs = [batch.reqs[i] for i in order]
        input_ids, positions, out_loc = self._token_inputs(reqs)
        rows, logit_rows = _logit_rows(reqs)
        spans = [QuerySpan(s.req.slot, s.start, s.num_new) for s in reqs]
        logit_index = torch.tensor(logit_rows, dtype=torch.int64, device=self.device)
        attn = AttentionInputs(self.kv.k, self.kv.v, out_loc, self.attention.plan(spans), logit_index,
                               self.model.paged_kernels)
        sampling = [s for s in reqs if s.samples_next and not s.draft]
        masks = self.masker.before_forward([s.req for s in sampling])
        if self.compiled is not None and self.compiled.takes(len(input_ids), attn):
            logits = self.compiled(input_ids, positions, attn)
        else:
            logits = self.forward(input_ids, positions, attn)
        outputs = [ModelOutput(prompt_logprobs=self._prompt_logprobs(s, logits, r)) for s, r in zip(reqs, rows)]
        if sampling:
            sample_logits = logits[[r.sample_row for s, r in zip(reqs, rows) if r.samples and not s.draft]]
            self._sample(sampling, sample_logits, masks,
                         [out for s, out in zip(reqs, outputs) if s.samples_next and not s.draft])
        for s, r, out in zip(reqs, rows, outputs):
            if s.draft:
                self._verify(s, logits[r.sample_row:r.sample_row + r.num_draft + 1], out)
        in_batch_order: list[ModelOutput | None] = [None] * len(outputs)
        for pos, i in enumerate(order):
            in_batch_order[i] = outputs[pos]
        return in_batch_order

    def _sample(self, sampling: list[ScheduledReq], logits: torch.Tensor, masks: MaskPlan,
                outputs: list[ModelOutput]) -> None:
        """Sample one token per row of `logits` (the sampling requests' rows, in order) into their outputs."""
        want_logprobs = any(s.req.logprob_options.return_logprob for s in sampling)
        result = sample(logits, [_sampling_row(s) for s in sampling], self.generator, masks.bitmask,
                        want_logprobs=want_logprobs)
        self.masker.after_sample(masks, [s.req for s in sampling], logits, result.token_ids)
        for j, (s, out) in enumerate(zip(sampling, outputs)):
            out.next_token_id = result.token_ids[j]
            options = s.req.logprob_options
            if options.return_logprob:
                out.next_logprobs = _token_logprobs(result.logprobs[j], out.next_token_id, options.top_logprobs_num)

    def _verify(self, s: ScheduledReq, logits: torch.Tensor, out: ModelOutput) -> None:
        """A speculative step's tokens from its k + 1 logit rows (scheduler/speculative.py)."""
        params = s.req.params
        probs = None if params.greedy else probabilities(logits, [_sampling_row(s)] * len(logits))
        tokens = verify(logits, s.draft, probs, self.generator)
        out.next_token_id, out.extra_token_ids = tokens[0], tokens[1:]

    def _token_inputs(self, reqs: list[ScheduledReq]):
        ids, positions = [], []
        for s in reqs:
            ids.extend(s.input_ids())
            positions.extend(range(s.start, s.end))
        table = self.req_to_token.table
        if all(s.is_decode for s in reqs):
            slots = torch.tensor([s.req.slot for s in reqs], device=self.device)
            out_loc = table[slots, torch.tensor([s.start for s in reqs], device=self.device)]
        else:
            out_loc = torch.cat([table[s.req.slot, s.start:s.end] for s in reqs])
        to = dict(dtype=torch.int64, device=self.device)
        return torch.tensor(ids, **to), torch.tensor(positions, **to), out_loc

    @staticmethod
    def _prompt_logprobs(s: ScheduledReq, logits: torch.Tensor, rows: LogitRows) -> list[TokenLogprobs]:
        if not rows.num_prompt:
            return []
        lp = torch.log_softmax(logits[rows.first:rows.first + rows.num_prompt], dim=-1)
        targets = [s.req.prompt_ids[q + 1] for q in s.prompt_logprob_rows()]
        top_n = s.req.logprob_options.top_logprobs_num
        return [_token_logprobs(lp[j], t, top_n) for j, t in enumerate(targets)]


def _logit_rows(reqs: list[ScheduledReq]) -> tuple[list[LogitRows], list[int]]:
    """Per request where its rows sit in the logits tensor, and the flat token rows whose logits are needed."""
    per_req, flat, offset = [], [], 0
    for s in reqs:
        prompt_rows = [offset + q - s.start for q in s.prompt_logprob_rows()]
        per_req.append(LogitRows(len(flat), len(prompt_rows), s.samples_next, len(s.draft)))
        num_sample = len(s.draft) + 1 if s.samples_next else 0  # the last known token's row, then the drafts'
        flat.extend(prompt_rows + list(range(offset + s.num_new - num_sample, offset + s.num_new)))
        offset += s.num_new
    return per_req, flat


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
