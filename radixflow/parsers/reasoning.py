"""Splitting a reasoning model's thinking from its answer (`--reasoning-parser`, `sgl.separate_reasoning`).

The models SGLang's reasoning parser knows write their thinking between `<think>` and `</think>`. Some open the block
in the prompt (DeepSeek-R1's template ends with `<think>\\n`; `qwen3-thinking` always thinks), so their output starts
inside it and only the closing tag shows; the others (Qwen3, GLM-4.5, Kimi) may think or not, opening the block
themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

THINK_START, THINK_END = "<think>", "</think>"

# SGLang's model types whose thinking sits in <think> blocks; None takes the same format.
MODEL_TYPES = (None, "deepseek-r1", "deepseek-v3", "qwen3", "qwen3-thinking", "glm45", "kimi")
# Those whose output starts inside the block (their prompt opened it).
STARTS_THINKING = ("deepseek-r1", "qwen3-thinking")


def check_model_type(model_type: str | None, field: str = "separate_reasoning: model_type") -> None:
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{field} {model_type!r} is not one of {', '.join(str(m) for m in MODEL_TYPES)}")


def split_reasoning(text: str, model_type: str | None = None) -> tuple[str, str]:
    """(reasoning, answer). Text with no thinking block is all answer (for a model whose prompt opened the block:
    all reasoning, as SGLang's parser reads it); an unfinished block is all reasoning."""
    check_model_type(model_type)
    body = text.lstrip()
    opened = body.startswith(THINK_START)
    if opened:
        body = body[len(THINK_START):]
    opened = opened or model_type in STARTS_THINKING
    if THINK_END in body:
        reasoning, _, answer = body.partition(THINK_END)
        return reasoning.strip(), answer.lstrip()
    if opened:
        return body.strip(), ""
    return "", text


@dataclass
class ReasoningDelta:
    reasoning: str = ""
    answer: str = ""


class ReasoningStream:
    """`split_reasoning` on a streamed output: each `feed(delta)` says what of it is reasoning and what answer,
    holding back text that may still become a tag; the pieces joined are what `split_reasoning` gives for the
    whole text, except the whitespace it strips around the reasoning (a stream cannot take back what it sent)."""

    def __init__(self, model_type: str | None = None):
        check_model_type(model_type, "reasoning parser")
        self._state = "thinking" if model_type in STARTS_THINKING else "start"
        self._held = ""

    def feed(self, delta: str) -> ReasoningDelta:
        self._held += delta
        out = ReasoningDelta()
        while self._held:
            if self._state == "start":  # before anything but whitespace: a block may open
                body = self._held.lstrip()
                if not body or THINK_START.startswith(body):
                    return out  # whitespace, or a partial "<think>": wait
                if body.startswith(THINK_START):
                    self._held, self._state = body[len(THINK_START):], "thinking"
                else:
                    self._state = "answer"
            elif self._state == "thinking":
                if THINK_END in self._held:
                    reasoning, _, self._held = self._held.partition(THINK_END)
                    out.reasoning += reasoning
                    self._state = "after"
                else:
                    keep = _partial_suffix(self._held, THINK_END)
                    out.reasoning += self._held[: len(self._held) - keep]
                    self._held = self._held[len(self._held) - keep:]
                    return out
            elif self._state == "after":  # the answer's leading whitespace is dropped, as split_reasoning does
                self._held = self._held.lstrip()
                if self._held:
                    self._state = "answer"
            else:
                out.answer += self._held
                self._held = ""
        return out

    def finish(self) -> ReasoningDelta:
        """What was held back at the end: an unfinished tag is text of the part it was in."""
        held, self._held = self._held, ""
        if self._state == "thinking":
            return ReasoningDelta(reasoning=held)
        if self._state == "after":
            return ReasoningDelta()
        return ReasoningDelta(answer=held)


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that is a proper beginning of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
