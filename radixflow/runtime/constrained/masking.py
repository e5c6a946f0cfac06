"""Grammar masks for one step's sampling rows: which rows are masked before sampling, which are checked after.

Masks depend only on what each request has emitted, so they are filled before the forward (right after a
forward, torch's OpenMP workers still spin on every core and would slow the fill).

Lazy masks (`--lazy-grammar-masks`), as llama.cpp's grammar sampler does: a greedy constrained row without
penalties is sampled unmasked and its token checked against the grammar (a few microseconds); only when the
grammar refuses it is that row's mask filled and the best allowed token taken, which is exactly the argmax over
allowed tokens that masking first gives. A full mask walks the whole vocabulary, and the model's own choice is
usually allowed. Where the grammar forces text the row is masked first: there llguidance's mask admits only the
forced text's own token split (`{"`, not `{` then `"`), which a one-token check does not see.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from radixflow.runtime.constrained.bitmask import apply_bitmask, fill_bitmask
from radixflow.runtime.request import Req


@dataclass
class MaskPlan:
    """One step's masks. `bitmask` has one row per sampling request (None: no row masked before sampling);
    `lazy` lists the sampling rows checked after sampling instead (their bitmask rows allow everything)."""

    bitmask: torch.Tensor | None = None
    lazy: list[int] = field(default_factory=list)


class GrammarMasker:
    def __init__(self, vocab_size: int, lazy: bool = True):
        self.vocab_size = vocab_size
        self.lazy = lazy
        self.mask_seconds = 0.0  # time spent filling masks and checking lazy rows, forced-text queries included
        self.mask_rows = 0       # request-steps that time covers
        self.lazy_refusals = 0   # lazy checks where the grammar refused the model's choice

    def before_forward(self, sampling: list[Req]) -> MaskPlan:
        """Masks for the requests that sample this step, in sampling order."""
        matchers = [r.grammar.matcher if r.grammar is not None else None for r in sampling]
        if all(m is None for m in matchers):
            return MaskPlan()
        start = time.perf_counter()
        lazy = [j for j, (r, m) in enumerate(zip(sampling, matchers))
                if m is not None and self.lazy and _plain_greedy(r) and not m.compute_ff_bytes()]
        for j in lazy:
            matchers[j] = None
        plan = MaskPlan(lazy=lazy)
        if any(m is not None for m in matchers):
            plan.bitmask = fill_bitmask(matchers, self.vocab_size)
            self.mask_rows += sum(m is not None for m in matchers)
        self.mask_seconds += time.perf_counter() - start
        return plan

    def after_sample(self, plan: MaskPlan, sampling: list[Req], logits: torch.Tensor, tokens: list[int]) -> None:
        """Check the lazy rows' tokens; where the grammar refuses one, mask that row and take its best allowed
        token. `tokens` is changed in place; `logits` ([rows, vocab], sampling order) is not."""
        if not plan.lazy:
            return
        start = time.perf_counter()
        refused = [j for j in plan.lazy if sampling[j].grammar.matcher.validate_tokens([tokens[j]]) != 1]
        if refused:
            masks = fill_bitmask([sampling[j].grammar.matcher for j in refused], self.vocab_size)
            rows = logits[refused]  # indexing with a list copies: the caller's logits stay as they are
            apply_bitmask(rows, masks)
            for j, token in zip(refused, rows.argmax(dim=-1).tolist()):
                tokens[j] = token
            self.lazy_refusals += len(refused)
        self.mask_seconds += time.perf_counter() - start
        self.mask_rows += len(plan.lazy)


def _plain_greedy(req: Req) -> bool:
    """The row's token is the argmax of its raw logits (no penalties, nothing banned): a lazy check is exact."""
    return req.params.greedy and not req.params.has_penalties
