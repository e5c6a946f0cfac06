"""After the forward: output processing (grammar advance and jump-forward, stop conditions, detokenisation) and
the per-request deltas it hands back.

Detokenisation and stop strings run in the scheduler's process, right after each step: on two cores a separate
detokenizer process (SGLang's layout) would compete with the model for the same cores.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from radixflow.runtime.request import FinishReason, Req, TokenLogprobs
from radixflow.runtime.tokenizer import IncrementalDetokenizer


@dataclass
class RequestOutput:
    """Everything new about one request since its previous output. `finished` is set exactly once."""

    rid: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finished: bool = False
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    output_logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)


class TextTracker:
    """Detokenizes a request's output and finds stop strings, including ones split across tokens.

    Text that could still grow into a stop string is held back until it cannot, so a streamed client never
    sees text that is later trimmed.
    """

    def __init__(self, detokenizer: IncrementalDetokenizer, stops: list[str], stop_regexes: list[str] = ()):
        self.detok = detokenizer
        self.stops = stops
        self.stop_regexes = [re.compile(pattern) for pattern in stop_regexes]
        self._longest = max((len(s) for s in stops), default=0)
        self._emitted = 0
        self._final_len: int | None = None

    def push(self, token_id: int) -> str | None:
        """Add a token; returns the stop string it completed, if any (the text is then cut before it)."""
        self.detok.append(token_id)
        if not self.stops:
            return None
        text = self.detok.text
        window_start = max(self._emitted - self._longest, 0)
        hits = [(text.find(s, window_start), s) for s in self.stops]
        hits = [(pos, s) for pos, s in hits if pos >= 0]
        if not hits:
            return None
        pos, stop = min(hits)
        self._final_len = pos
        return stop

    def regex_match(self) -> str | None:
        """The text of the earliest stop-regex match in the output so far. It is not cut: SGLang keeps it, and
        a stream could not hold back text a regex might still match."""
        if not self.stop_regexes:
            return None
        text = self.detok.text
        found = [m for m in (r.search(text) for r in self.stop_regexes) if m is not None]
        return min(found, key=lambda m: m.start()).group(0) if found else None

    def take(self, final: bool) -> str:
        """Text not yet handed out. Unless `final`, keep back a tail that is a prefix of some stop string."""
        text = self.detok.text
        end = len(text) if self._final_len is None else self._final_len
        if not final and self._final_len is None:
            end -= self._held_back(text)
        if end <= self._emitted:
            return ""
        delta = text[self._emitted:end]
        self._emitted = end
        return delta

    def _held_back(self, text: str) -> int:
        for size in range(min(self._longest - 1, len(text)), 0, -1):
            tail = text[-size:]
            if any(s.startswith(tail) for s in self.stops):
                return size
        return 0


class OutputProcessor:
    """Appends each step's sampled tokens to their requests and says when a request must end.

    `advance` returns the request's delta and, when it must end, why; the scheduler then ends it (it owns the
    queues and memory) and `finish` builds the last delta. Jump-forward (the paper's compressed FSM) happens here:
    the grammar may append forced tokens after the sampled one, checked token by token for stops and length.
    """

    def __init__(self, tokenizer, enable_jump_forward: bool = True):
        self.tokenizer = tokenizer
        self.enable_jump_forward = enable_jump_forward
        self.text_trackers: dict[str, TextTracker] = {}

    def add(self, req: Req) -> None:
        detokenizer = IncrementalDetokenizer(self.tokenizer, req.prompt_ids, req.params.skip_special_tokens)
        self.text_trackers[req.rid] = TextTracker(detokenizer, req.params.stop, req.params.stop_regex)

    def advance(self, req: Req, tokens: list[int], token_lp: TokenLogprobs | None,
                prompt_lps: list[TokenLogprobs]) -> tuple[RequestOutput, FinishReason | None]:
        """Append the step's `tokens` (the sampled one, then any a speculative step verified; or, under a grammar,
        the sampled one and the text the grammar forces after it) to `req`, up to the first that ends it."""
        delta = self._delta(req, prompt_lps)
        if req.params.max_new_tokens == 0:  # a scoring request (prompt logprobs only): the sample is discarded
            return delta, FinishReason("length")
        if req.grammar is not None:  # never drafts (speculative.py): one sampled token
            # Off with logprobs, which a forced token (never sampled) would not have.
            jump = self.enable_jump_forward and not req.logprob_options.return_logprob
            tokens, error = req.grammar.advance(tokens[0], jump)
            if error is not None:
                return delta, FinishReason("abort", message=f"constrained decoding: {error}")
        if token_lp is not None:
            req.output_logprobs.append(token_lp)
            delta.output_logprobs = [token_lp]
        tracker = self.text_trackers[req.rid]
        reason = None
        for i, tok in enumerate(tokens):
            req.append_output(tok)
            delta.token_ids.append(tok)
            reason = _finish_reason(req, tok, tracker.push(tok), tracker.regex_match())
            if reason is None and i == len(tokens) - 1 and req.grammar is not None and req.grammar.finished:
                reason = FinishReason("stop", tok if tok in req.stop_ids else None)  # nothing more can follow
            if reason is not None:
                break
        delta.text = tracker.take(final=False)
        delta.completion_tokens = req.num_output
        return delta, reason

    def finish(self, req: Req, reason: FinishReason, delta: RequestOutput | None = None) -> RequestOutput:
        """The request's last output: `delta` (this step's, if it ended in a step) plus any held-back text."""
        out = delta or self._delta(req, [])
        out.text += self.text_trackers.pop(req.rid).take(final=True)
        out.finished, out.finish_reason = True, reason
        return out

    @staticmethod
    def _delta(req: Req, prompt_lps: list[TokenLogprobs]) -> RequestOutput:
        return RequestOutput(rid=req.rid, prompt_logprobs=list(prompt_lps), prompt_tokens=len(req.prompt_ids),
                             completion_tokens=req.num_output, cached_tokens=req.cached_prompt_tokens)


def _finish_reason(req: Req, token: int, stop_string: str | None, regex_match: str | None) -> FinishReason | None:
    if stop_string is not None:
        return FinishReason("stop", stop_string)
    if regex_match is not None:
        return FinishReason("stop", regex_match)
    if token in req.stop_ids and req.num_output >= req.params.min_new_tokens:
        return FinishReason("stop", token)
    if req.num_output >= req.params.max_new_tokens:
        return FinishReason("length")
    return None
