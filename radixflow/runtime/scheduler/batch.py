"""Plain data passed between the three calls of a step: schedule -> run model -> process output."""

from __future__ import annotations

from dataclasses import dataclass, field

from radixflow.runtime.request import Req, TokenLogprobs


@dataclass
class ScheduledReq:
    """One request's share of a step: compute tokens [start, start + num_new) of `req.all_ids()` followed by
    `draft` (speculative tokens to verify, which are not the request's yet)."""

    req: Req
    start: int
    num_new: int
    draft: tuple[int, ...] = ()

    @property
    def end(self) -> int:
        return self.start + self.num_new

    @property
    def samples_next(self) -> bool:
        """The chunk reaches the last known token, so the model proposes the next one (or verifies a draft)."""
        return self.end - len(self.draft) == self.req.num_tokens

    def input_ids(self) -> list[int]:
        return self.req.all_ids(self.start, self.end - len(self.draft)) + list(self.draft)

    @property
    def is_decode(self) -> bool:
        return self.num_new == 1

    def prompt_logprob_rows(self) -> range:
        """Positions q in this chunk whose logits score prompt token q + 1 and were not scored before."""
        first = self.req.logprob_options.prompt_start
        if first is None:
            return range(0)
        # prompt_logprobs holds positions from max(first, 1): position 0 has no context to score it.
        next_pos = max(first, 1) + len(self.req.prompt_logprobs)
        prompt_len = len(self.req.prompt_ids)
        lo = max(self.start, next_pos - 1)
        hi = min(self.end, prompt_len - 1)
        return range(lo, max(lo, hi))


@dataclass
class ScheduledBatch:
    reqs: list[ScheduledReq] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new for s in self.reqs)

    def __bool__(self) -> bool:
        return bool(self.reqs)


@dataclass
class ModelOutput:
    """What one step produced for one scheduled request (the runner returns one per request, in batch order)."""

    next_token_id: int | None = None  # None: a chunk that does not reach the last known token samples nothing
    extra_token_ids: list[int] = field(default_factory=list)  # a verify step's tokens after it, one per accepted draft
    next_logprobs: TokenLogprobs | None = None  # when the request asked for logprobs
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)  # for `prompt_logprob_rows()` + 1
