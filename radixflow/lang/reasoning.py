"""Splitting a reasoning model's thinking from its answer (`sgl.separate_reasoning`).

The models SGLang's reasoning parser knows write their thinking between `<think>` and `</think>`; DeepSeek-R1 (and
Qwen3 in thinking mode) may leave out the opening tag, because their chat template already put it in the prompt.
"""

from __future__ import annotations

THINK_START, THINK_END = "<think>", "</think>"

# SGLang's model types whose thinking sits in <think> blocks; None takes the same format.
MODEL_TYPES = (None, "deepseek-r1", "deepseek-v3", "qwen3", "qwen3-thinking", "glm45", "kimi")


def split_reasoning(text: str, model_type: str | None = None) -> tuple[str, str]:
    """(reasoning, answer). Text with no thinking block is all answer; an unfinished block is all reasoning."""
    if model_type not in MODEL_TYPES:
        raise ValueError(f"separate_reasoning: model_type {model_type!r} is not one of "
                         f"{', '.join(str(m) for m in MODEL_TYPES)}")
    body = text.lstrip()
    opened = body.startswith(THINK_START)
    if opened:
        body = body[len(THINK_START):]
    if THINK_END in body:
        reasoning, _, answer = body.partition(THINK_END)
        return reasoning.strip(), answer.lstrip()
    if opened:
        return body.strip(), ""
    return "", text
