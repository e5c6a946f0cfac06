"""Draft-free speculative decoding (`--speculative-algorithm ngram`): drafts from text the engine already has.

A decoding request whose recent tokens occurred before proposes what followed them, and the model checks the
proposal in one extend step: it computes the pending token and the k drafted ones together, and its logits at
those k + 1 positions say how many drafts it would have produced itself (`verify`). Every step still yields at
least one token, and up to k + 1 when the draft was right, for about the cost of one step at batch 1 (a decode
step streams all the weights for a single row; a few more rows add little).

Two sources, tried in order:
- the radix tree: the request's tokens lead to a path some earlier request (same prompt sampled again, a
  repeated agent step, a fork of the same program) already extended; its continuation is the draft;
- prompt lookup (llama.cpp's lookup decoding, SGLang's ngram): the longest suffix of the request's own tokens,
  between the min and max window sizes, that occurred earlier in them; what followed that occurrence is the draft.
  This is what makes extraction, quoting and code edits fast: the output copies the prompt.

Adaptive: a request whose drafts are all rejected stops drafting for 1, 2, 4, ... steps (up to `_MAX_BACKOFF`),
so plain text, where lookups rarely come true, pays almost nothing. Requests the draft cannot serve exactly stay
on plain decoding: constrained ones (jump-forward already appends forced text), penalties or min_new_tokens
(their sampling depends on each accepted token), logprobs, and seeded sampling (its tokens are defined per
position by the seed, independent of batching).

Verification keeps outputs exact: greedy requests accept drafts while they equal the argmax, so the text is the
one decoding would produce; sampled ones use speculative sampling with a point-mass draft (accept draft d with
probability p(d), else draw from p with d removed), which leaves each token's distribution exactly p.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from radixflow.runtime.cache.prefix_cache import PrefixCache
from radixflow.runtime.config import SchedulerConfig
from radixflow.runtime.request import Req

_MAX_BACKOFF = 16  # steps a request skips drafting after its drafts kept failing


@dataclass
class DraftState:
    """Per request: how long to skip drafting, and how often drafts failed in a row."""

    skip: int = 0
    failures: int = 0


@dataclass
class SpeculativeStats:
    verify_steps: int = 0  # steps in which a request verified a draft
    draft_tokens: int = 0
    accepted_tokens: int = 0  # drafts the model agreed with (each verify step also yields one token of its own)

    @property
    def accept_length(self) -> float:
        """Tokens a verify step produced on average (1 = no draft accepted)."""
        return 1 + self.accepted_tokens / self.verify_steps if self.verify_steps else 0.0


class Drafter:
    def __init__(self, config: SchedulerConfig, prefix_cache: PrefixCache):
        self.num_draft = config.speculative_num_draft_tokens
        self.min_window = config.speculative_ngram_min_match_window_size
        self.max_window = config.speculative_ngram_max_match_window_size
        self.max_batch = config.speculative_max_batch_size
        self.prefix_cache = prefix_cache
        self.states: dict[str, DraftState] = {}
        self.stats = SpeculativeStats()

    @staticmethod
    def eligible(req: Req) -> bool:
        p = req.params
        return (req.grammar is None and not p.has_penalties and p.seed is None
                and not req.logprob_options.return_logprob and req.num_output >= p.min_new_tokens)

    def propose(self, req: Req, num_decoding: int) -> tuple[int, ...]:
        """Draft tokens for a decoding request (empty: decode plainly this step)."""
        limit = min(self.num_draft, req.remaining_new_tokens - 1)
        if limit <= 0 or num_decoding > self.max_batch or not self.eligible(req):
            return ()
        state = self.states.setdefault(req.rid, DraftState())
        if state.skip:
            state.skip -= 1
            return ()
        tokens = req.all_ids()
        draft = self.prefix_cache.continuation(req.tree_node, tokens[req.num_in_tree:], limit)
        if not draft:
            draft = prompt_lookup(tokens, limit, self.min_window, self.max_window)
        return tuple(draft)

    def record(self, req: Req, drafted: int, accepted: int) -> None:
        self.stats.verify_steps += 1
        self.stats.draft_tokens += drafted
        self.stats.accepted_tokens += accepted
        state = self.states.setdefault(req.rid, DraftState())
        if accepted:
            state.failures = 0
        else:
            state.failures += 1
            state.skip = min(2 ** (state.failures - 1), _MAX_BACKOFF)

    def forget(self, req: Req) -> None:
        self.states.pop(req.rid, None)


def prompt_lookup(tokens: list[int], num: int, min_window: int, max_window: int) -> list[int]:
    """`num` tokens copied from after the most recent earlier occurrence of the longest suffix of `tokens` (between
    `min_window` and `max_window` tokens long); [] if no such suffix occurred before."""
    if len(tokens) <= min_window:
        return []
    arr = np.asarray(tokens)
    last = len(arr) - 1
    # Candidates: positions i < last whose token equals the last one; grow the match backwards one token at a time
    # and keep the candidates that still agree.
    cands = np.flatnonzero(arr[:last] == arr[last])
    best, length = None, 0
    for n in range(1, max_window + 1):
        if n >= min_window and len(cands):
            best, length = cands, n
        if n == max_window or n >= last or not len(cands):
            break
        cands = cands[cands >= n]
        cands = cands[arr[cands - n] == arr[last - n]]
    if best is None or length < min_window:
        return []
    # Copy on from the most recent occurrence of the longest suffix that matched. Where the copy reaches the end of
    # the tokens it goes on with its own output, so a repeating run drafts its continuation in full.
    seq = list(tokens)
    start = int(best[-1]) + 1
    for j in range(num):
        seq.append(seq[start + j])
    return seq[len(tokens):]


def verify(logits: torch.Tensor, draft: tuple[int, ...], probs: torch.Tensor | None,
           generator: torch.Generator | None) -> list[int]:
    """The tokens a verify step yields: logits/probs [k + 1, vocab] at the pending token and the k drafts.

    `probs` None means greedy: drafts are accepted while each equals the argmax before it, and the first
    disagreement (or, with every draft accepted, the next argmax) is the step's own token. Otherwise `probs` is the
    request's sampling distribution at each position: draft d_i is accepted with probability p_i(d_i); on a
    rejection the token is drawn from p_i with d_i removed (renormalised)."""
    if probs is None:
        targets = logits.argmax(dim=-1).tolist()
        out = []
        for i, d in enumerate(draft):
            out.append(targets[i])
            if targets[i] != d:
                return out
        return out + [targets[len(draft)]]
    uniforms = torch.rand(len(draft), generator=generator, device=probs.device).tolist()
    out = []
    for i, d in enumerate(draft):
        if uniforms[i] < float(probs[i, d]):
            out.append(d)
            continue
        residual = probs[i].clone()
        residual[d] = 0.0
        out.append(int(torch.multinomial(residual / residual.sum(), 1, generator=generator)))
        return out
    return out + [int(torch.multinomial(probs[len(draft)], 1, generator=generator))]
