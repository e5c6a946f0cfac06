"""Sampling, vectorised over the batch.

Order: grammar mask -> penalties -> min_new_tokens mask -> temperature -> top-k -> top-p -> min-p -> draw.
Greedy rows skip the draw. Seeded rows draw from a generator seeded by (seed, position), so a seed reproduces the
same tokens whatever else shares the batch. Reported logprobs are the model's own (log-softmax of the raw
logits), as OpenAI's API reports them, not of the processed distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from radixflow.runtime.constrained.bitmask import apply_bitmask
from radixflow.runtime.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """What the sampler needs to know about one row of logits."""

    params: SamplingParams
    prior_ids: list[int]          # prompt + output so far (repetition penalty)
    output_ids: list[int]         # output so far (frequency / presence penalties)
    banned_ids: frozenset[int]    # stop ids masked while min_new_tokens is not reached
    step: int                     # output position being sampled (seeds the generator)


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: torch.Tensor | None  # [rows, vocab] log-softmax of the raw logits (None if nobody asked)


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """In place. frequency/presence: subtract count*f + (count>0)*p (OpenAI); repetition: divide positive
    logits and multiply negative ones by the penalty for tokens seen in prompt or output (CTRL / HF)."""
    vocab = logits.shape[1]
    for i, row in enumerate(rows):
        p = row.params
        if not p.has_penalties:
            continue
        if (p.frequency_penalty or p.presence_penalty) and row.output_ids:
            counts = torch.bincount(torch.tensor(row.output_ids, dtype=torch.int64), minlength=vocab)
            counts = counts[:vocab].to(logits.device, logits.dtype)
            logits[i] -= counts * p.frequency_penalty + (counts > 0).to(logits.dtype) * p.presence_penalty
        if p.repetition_penalty != 1.0 and row.prior_ids:
            seen = torch.tensor(sorted(set(row.prior_ids)), dtype=torch.int64, device=logits.device)
            values = logits[i, seen]
            logits[i, seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)


def sample(logits: torch.Tensor, rows: list[SamplingRow], default_generator: torch.Generator | None = None,
           bitmask: torch.Tensor | None = None, want_logprobs: bool = True) -> SampleResult:
    """logits: [rows, vocab] float32 (not modified). `bitmask`: packed allowed tokens per row (constrained
    decoding), applied to the whole batch at once before anything else. `want_logprobs=False` skips the
    log-softmax over the vocabulary (milliseconds for a batch on a CPU) when no row reports logprobs."""
    logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
    if bitmask is not None:
        logits = logits.clone()  # the caller's logits stay unmodified; everything below works on this copy
        apply_bitmask(logits, bitmask)
    if all(r.params.greedy and not r.params.has_penalties and not r.banned_ids for r in rows):
        return SampleResult(logits.argmax(dim=-1).tolist(), logprobs)
    if bitmask is None:
        logits = logits.clone()
    apply_penalties(logits, rows)
    for i, row in enumerate(rows):
        if row.banned_ids:
            logits[i, list(row.banned_ids)] = float("-inf")
    greedy = torch.tensor([r.params.greedy for r in rows], device=logits.device)
    chosen = logits.argmax(dim=-1)
    probs = _valid(probabilities(logits, rows), chosen)
    drawn = _draw(probs, rows, default_generator)
    tokens = torch.where(greedy, chosen, drawn)
    return SampleResult(tokens.tolist(), logprobs)


def probabilities(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Each row's sampling distribution after temperature, top-k, top-p and min-p (penalties, bans and masks are
    the caller's, applied to `logits` before). Greedy rows get temperature 1 (their draw is not used)."""
    temps = torch.tensor([r.params.temperature if not r.params.greedy else 1.0 for r in rows],
                         device=logits.device, dtype=logits.dtype)
    return _filter(torch.softmax(logits / temps[:, None], dim=-1), rows)


def _filter(probs: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """top-k, top-p and min-p on sorted probabilities, all rows at once."""
    device = probs.device
    top_ks = torch.tensor([r.params.top_k_or_none or probs.shape[1] for r in rows], device=device)
    top_ps = torch.tensor([r.params.top_p for r in rows], device=device, dtype=probs.dtype)
    min_ps = torch.tensor([r.params.min_p for r in rows], device=device, dtype=probs.dtype)
    if bool((top_ks >= probs.shape[1]).all() and (top_ps >= 1.0).all() and (min_ps <= 0.0).all()):
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    ranks = torch.arange(probs.shape[1], device=device)[None, :]
    drop = ranks >= top_ks[:, None]
    # Keep a token if the mass *before* it is below top_p, so the top token always survives.
    drop |= (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_ps[:, None]
    drop |= sorted_probs < (min_ps * sorted_probs[:, 0])[:, None]
    drop[:, 0] = False  # the most likely token always stays, whatever rounding does to the sums above
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(1, order, sorted_probs)


def _valid(probs: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """The distributions as drawable: a row that extreme parameters broke (a penalty of 1e-300 sends a logit to
    infinity and the softmax to NaN) becomes certain of its most likely token instead of failing the batch."""
    broken = ~(probs.sum(dim=-1) > 0)  # a NaN anywhere makes the sum NaN, which is not > 0
    if bool(broken.any()):
        probs = probs.clone()
        probs[broken] = torch.nn.functional.one_hot(chosen[broken], probs.shape[1]).to(probs.dtype)
    return probs


def _draw(probs: torch.Tensor, rows: list[SamplingRow], default_generator: torch.Generator | None) -> torch.Tensor:
    out = torch.empty(len(rows), dtype=torch.int64, device=probs.device)
    unseeded = [i for i, r in enumerate(rows) if r.params.seed is None]
    if unseeded:
        idx = torch.tensor(unseeded, device=probs.device)
        out[idx] = torch.multinomial(probs[idx], 1, generator=default_generator).squeeze(1)
    for i, row in enumerate(rows):
        if row.params.seed is not None:
            gen = torch.Generator(device=probs.device).manual_seed(hash((row.params.seed, row.step)) & (2**63 - 1))
            out[i] = torch.multinomial(probs[i], 1, generator=gen)[0]
    return out
