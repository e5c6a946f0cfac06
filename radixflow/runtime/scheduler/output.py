"""What the scheduler hands back after each step: per-request deltas, and the text/stop-string tracking that
produces them."""

from __future__ import annotations

from dataclasses import dataclass, field

from radixflow.runtime.request import FinishReason, TokenLogprobs
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

    def __init__(self, detokenizer: IncrementalDetokenizer, stops: list[str]):
        self.detok = detokenizer
        self.stops = stops
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
