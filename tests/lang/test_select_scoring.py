"""`select` scoring in RuntimeBackend over a fake runtime with a toy word tokenizer (no model).

The toy tokenizer merges a space into the word after it (" Paris" is one token) and leaves a trailing space as a
lone " " token, like BPE tokenizers do: the paper's token-boundary problem in miniature.
"""

from __future__ import annotations

import re

import radixflow as sgl
from radixflow.backends.base import RuntimeBackend

DEFAULT_LOGPROB = -5.0


class ToyRuntime(RuntimeBackend):
    """`_generate` over a toy tokenizer; the logprob of a token depends only on the token before it."""

    def __init__(self, logprobs: dict[tuple[str, str], float]):
        self.logprobs = logprobs  # (previous token, token) -> logprob
        self.vocab: list[str] = []
        self.requests: list[list[str]] = []  # the tokens of every prompt scored with logprobs

    def tokenize(self, text: str) -> list[int]:
        ids = []
        for token in re.findall(r" ?[A-Za-z]+|\s|[^\sA-Za-z]", text):
            if token not in self.vocab:
                self.vocab.append(token)
            ids.append(self.vocab.index(token))
        return ids

    def _generate(self, prompts, params, logprob):
        results = []
        for prompt in prompts:
            ids = prompt if isinstance(prompt, list) else self.tokenize(prompt)
            meta = {"prompt_tokens": len(ids)}
            if logprob.get("return_logprob"):
                tokens = [self.vocab[i] for i in ids]
                self.requests.append(tokens)
                start = logprob["logprob_start_len"]
                meta["input_token_logprobs"] = [
                    (self.logprobs.get((tokens[i - 1], tokens[i]), DEFAULT_LOGPROB) if i else None, ids[i], None)
                    for i in range(start, len(ids))]
            results.append({"text": "", "meta_info": meta})
        return results


def test_a_choice_merged_with_the_prefixs_trailing_space_is_scored_as_the_merged_token():
    # Scored naively ("Paris" after a lone " "), London would win; the model really sees " Paris" after " is".
    runtime = ToyRuntime({(" is", " Paris"): -0.1, (" is", " London"): -3.0, (" ", "Paris"): -9.0,
                          (" ", "London"): -1.0})
    result = runtime.select("The capital of France is ", ["Paris", "London"], 0.0, None)
    assert result.decision == "Paris"
    assert logprobs(result.meta_info["input_token_logprobs"]) == [[-0.1], [-3.0]]
    assert set(result.meta_info) == {"normalized_prompt_logprobs", "input_token_logprobs", "output_token_logprobs"}


def test_multi_token_choices_are_scored_on_every_token_after_the_shared_prefix():
    runtime = ToyRuntime({(" is", " New"): -1.0, (" New", " York"): -0.2, (" is", " Boston"): -1.5})
    result = runtime.select("The city is", [" New York", " Boston"], 0.0, sgl.token_length_normalized)
    assert logprobs(result.meta_info["input_token_logprobs"]) == [[-1.0, -0.2], [-1.5]]
    assert result.decision == " New York"


def test_unconditional_logprobs_are_taken_on_exactly_the_scored_tokens():
    runtime = ToyRuntime({(" is", " New"): -1.0, (" New", " York"): -0.2, (" is", " Boston"): -1.5})
    result = runtime.select("The city is ", ["New York", "Boston"], 0.0, sgl.unconditional_likelihood_normalized)
    # The conditional runs scored the merged " New", " York" and " Boston"; the context-free runs use those same
    # tokens (not a fresh tokenization of "New York", whose first token would be "New").
    assert runtime.requests[-2:] == [[" New", " York"], [" Boston"]]
    assert logprobs(result.meta_info["unconditional_token_logprobs"]) == [[None, -0.2], [None]]  # no context
    assert result.meta_info["normalized_prompt_logprobs"] == [-0.6, -1.5]
    assert result.meta_info["normalized_unconditional_prompt_logprobs"] == [-0.5, -1.5]
    assert result.decision == "New York"


def logprobs(entries: list[list[tuple]]) -> list[list[float | None]]:
    """The logprobs of SGLang's (logprob, token id, token text) entries."""
    return [[lp for lp, *_ in row] for row in entries]


def test_a_custom_choice_method_gets_sglangs_keywords_and_its_decision_is_the_result():
    seen = {}

    class Longest(sgl.ChoicesSamplingMethod):
        def __call__(self, *, choices, normalized_prompt_logprobs, input_token_logprobs, output_token_logprobs,
                     unconditional_token_logprobs=None):
            seen.update(choices=choices, normalized=normalized_prompt_logprobs,
                        unconditional=unconditional_token_logprobs)
            return sgl.ChoicesDecision(max(choices, key=len), {"picked_by": "length"})

    runtime = ToyRuntime({(" is", " New"): -1.0, (" New", " York"): -0.2, (" is", " Boston"): -1.5})
    result = runtime.select("The city is", [" Boston", " New York"], 0.0, Longest())
    assert result.decision == " New York" and result.meta_info == {"picked_by": "length"}
    assert seen == {"choices": [" Boston", " New York"], "normalized": [-1.5, -0.6], "unconditional": None}
