"""How `select` picks among choices from their token logprobs (the three methods SGLang offers)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ChoiceScores:
    """Per choice: logprobs of its tokens given the prefix, and (when asked for) given nothing."""

    choices: list[str]
    token_logprobs: list[list[float]]
    unconditional_token_logprobs: list[list[float]] | None = None


@dataclass
class ChoiceResult:
    decision: str
    meta_info: dict


class ChoiceMethod:
    requires_unconditional_logprobs = False

    def __call__(self, scores: ChoiceScores) -> ChoiceResult:
        raise NotImplementedError


def _at(lps: list[float], position: int) -> float:
    """A choice's logprob at `position`; past its end, the mean of its logprobs (as SGLang pads short choices)."""
    return lps[position] if position < len(lps) else _mean(lps)


def _mean(values: list[float]) -> float:
    return sum(values) / max(len(values), 1)


class TokenLengthNormalized(ChoiceMethod):
    """Highest mean token logprob (the default)."""

    def __call__(self, scores):
        normalized = [_mean(lps) for lps in scores.token_logprobs]
        best = max(range(len(normalized)), key=normalized.__getitem__)
        return ChoiceResult(scores.choices[best], {"normalized_prompt_logprobs": normalized,
                                                   "input_token_logprobs": scores.token_logprobs})


class GreedyTokenSelection(ChoiceMethod):
    """Compare choices token by token, keeping those whose next token is most likely; shorter choices past their
    end compete with their mean logprob."""

    def __call__(self, scores):
        alive = list(range(len(scores.choices)))
        longest = max(len(lps) for lps in scores.token_logprobs)
        for position in range(longest):
            at = {i: _at(scores.token_logprobs[i], position) for i in alive}
            best = max(at.values())
            alive = [i for i in alive if at[i] == best]
            if len(alive) == 1:
                break
        return ChoiceResult(scores.choices[alive[0]], {"input_token_logprobs": scores.token_logprobs})


class UnconditionalLikelihoodNormalized(ChoiceMethod):
    """Mean of (conditional - unconditional) logprob: discounts choices that are likely whatever the context."""

    requires_unconditional_logprobs = True

    def __call__(self, scores):
        normalized = [_mean([c - u for c, u in zip(cond, uncond)])
                      for cond, uncond in zip(scores.token_logprobs, scores.unconditional_token_logprobs)]
        best = max(range(len(normalized)), key=normalized.__getitem__)
        return ChoiceResult(scores.choices[best], {"normalized_prompt_logprobs": normalized,
                                                   "input_token_logprobs": scores.token_logprobs,
                                                   "unconditional_token_logprobs": scores.unconditional_token_logprobs})


token_length_normalized = TokenLengthNormalized()
greedy_token_selection = GreedyTokenSelection()
unconditional_likelihood_normalized = UnconditionalLikelihoodNormalized()
