"""How `select` picks among choices from their token logprobs: SGLang's three methods, and its protocol for
writing your own (`ChoicesSamplingMethod`, called with keywords, returning a `ChoicesDecision`).

Token logprobs are SGLang's `(logprob, token_id, token_text)` entries: per choice, the tokens of that choice scored
after the prefix (`input_token_logprobs`); for the unconditional method, the same tokens scored with no context,
the first one's logprob None.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

TokenLogprob = tuple  # (logprob: float | None, token_id: int, token_text: str | None)


@dataclass
class ChoicesDecision:
    decision: str
    meta_info: dict[str, Any] | None = None


class ChoicesSamplingMethod(ABC):
    @property
    def requires_unconditional_logprobs(self) -> bool:
        return False

    @abstractmethod
    def __call__(self, *, choices: list[str], normalized_prompt_logprobs: list[float],
                 input_token_logprobs: list[list[TokenLogprob]], output_token_logprobs: list[list[TokenLogprob]],
                 unconditional_token_logprobs: list[list[TokenLogprob]] | None = None) -> ChoicesDecision:
        """Pick one of `choices`."""


def _mean(values: list[float]) -> float:
    return sum(values) / max(len(values), 1)


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # the first of equals


def _logprobs(entries: list[TokenLogprob]) -> list[float]:
    return [lp for lp, *_ in entries]


def _meta(normalized, inputs, outputs, **extra) -> dict[str, Any]:
    return {"normalized_prompt_logprobs": normalized, "input_token_logprobs": inputs,
            "output_token_logprobs": outputs, **extra}


class TokenLengthNormalized(ChoicesSamplingMethod):
    """The highest mean token logprob (the default)."""

    def __call__(self, *, choices, normalized_prompt_logprobs, input_token_logprobs, output_token_logprobs,
                 unconditional_token_logprobs=None):
        return ChoicesDecision(choices[_argmax(normalized_prompt_logprobs)],
                               _meta(normalized_prompt_logprobs, input_token_logprobs, output_token_logprobs))


class GreedyTokenSelection(ChoicesSamplingMethod):
    """Compare the choices token by token, keeping those whose token is most likely; a shorter choice competes
    past its end with its mean logprob (as SGLang pads it)."""

    def __call__(self, *, choices, normalized_prompt_logprobs, input_token_logprobs, output_token_logprobs,
                 unconditional_token_logprobs=None):
        rows = [_logprobs(entries) for entries in input_token_logprobs]
        width = max(len(row) for row in rows)
        matrix = [row + [_mean(row)] * (width - len(row)) for row in rows]
        alive = list(range(len(choices)))
        for position in range(width):
            best = max(matrix[i][position] for i in alive)
            alive = [i for i in alive if matrix[i][position] == best]
            if len(alive) == 1:
                break
        return ChoicesDecision(choices[alive[0]], _meta(normalized_prompt_logprobs, input_token_logprobs,
                                                        output_token_logprobs, greedy_logprob_matrix=matrix))


class UnconditionalLikelihoodNormalized(ChoicesSamplingMethod):
    """The mean of (conditional - unconditional) logprob: discounts choices that are likely whatever the context.
    The first token's unconditional logprob (no context at all) counts 0."""

    @property
    def requires_unconditional_logprobs(self) -> bool:
        return True

    def __call__(self, *, choices, normalized_prompt_logprobs, input_token_logprobs, output_token_logprobs,
                 unconditional_token_logprobs=None):
        if unconditional_token_logprobs is None:
            raise ValueError("unconditional_likelihood_normalized needs unconditional token logprobs")
        normalized = []
        for cond, uncond in zip(input_token_logprobs, unconditional_token_logprobs):
            c, u = _logprobs(cond), [lp or 0.0 for lp in _logprobs(uncond)]
            if len(c) != len(u):
                raise ValueError("conditional and unconditional token logprobs must have the same length")
            normalized.append(_mean([a - b for a, b in zip(c, u)]))
        return ChoicesDecision(choices[_argmax(normalized)], _meta(
            normalized_prompt_logprobs, input_token_logprobs, output_token_logprobs,
            unconditional_token_logprobs=unconditional_token_logprobs,
            normalized_unconditional_prompt_logprobs=normalized))


token_length_normalized = TokenLengthNormalized()
greedy_token_selection = GreedyTokenSelection()
unconditional_likelihood_normalized = UnconditionalLikelihoodNormalized()
