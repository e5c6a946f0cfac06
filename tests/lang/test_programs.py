"""Paper-style SGLang programs on the embedded SmolLM2-135M, run unchanged against both backends: the in-process
engine and a `radixflow serve` subprocess over HTTP.

Greedy decoding throughout. A 135M model is weak, so answers are asserted only where it gets them right (checked
by hand on both backends); elsewhere the tests assert the program's structure.
"""

from __future__ import annotations

import json
import re

import pytest

import radixflow as sgl
from tests.lang.programs import (
    CHARACTER_REGEX,
    City,
    boundary,
    calculate,
    capital,
    character,
    city,
    count,
    few_shot_qa,
    qa,
    react,
    skeleton_of_thought,
    tool_use,
    two_turns,
    typed,
)

pytestmark = pytest.mark.slow

CHOICE_METHODS = [sgl.token_length_normalized, sgl.greedy_token_selection, sgl.unconditional_likelihood_normalized]


@pytest.fixture
def backend(real_backend):
    return real_backend


# -- few-shot QA and var_scope ---------------------------------------------------------------------------------


def test_few_shot_qa(backend):
    state = few_shot_qa.run(question="What is the capital of Spain?", temperature=0, backend=backend)
    assert state["answer"].strip() == "Madrid"
    assert state["qa"] == "Q: What is the capital of Spain?\nA:" + state["answer"]  # var_scope's text
    states = few_shot_qa.run_batch([{"question": f"What is the capital {q}?"}
                                    for q in ("of Japan", "of the United Kingdom", "city of China")],
                                   temperature=0, backend=backend)
    assert [s["answer"].strip().lower() for s in states] == ["tokyo", "london", "beijing"]


# -- multi-turn chat --------------------------------------------------------------------------------------------


def test_multi_turn_chat(backend):
    state = two_turns.run(question_1="What is the capital of France?", question_2="And of Germany?",
                          temperature=0, backend=backend)
    messages = state.messages()
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[3] == {"role": "user", "content": "And of Germany?"}
    assert "Paris" in state["answer_1"] and "Berlin" in state["answer_2"]
    # The role markers come from the model's own chat template (ChatML for SmolLM2).
    assert state.text().startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")


# -- select -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", CHOICE_METHODS, ids=lambda m: type(m).__name__)
def test_select_with_each_choice_method(backend, method):
    state = capital.run(choices=["Paris", "London", "Berlin"], choices_method=method, backend=backend)
    assert state["city"] == "Paris"
    assert state.text().endswith("A: Paris")


def test_unconditional_likelihood_scores_the_same_tokens_without_context(backend):
    # Multi-token choices: " Mar|se|ille", " T|oul|ouse". (The unconditional method may well prefer one of them:
    # a 135M model finds "oul" after a context-free " T" very unlikely, so conditioning looks like a big gain.)
    state = capital.run(choices=["Paris", "Marseille", "Toulouse"],
                        choices_method=sgl.unconditional_likelihood_normalized, backend=backend)
    assert state["city"] in ("Paris", "Marseille", "Toulouse")
    meta = state.get_meta_info("city")
    assert [len(lps) for lps in meta["input_token_logprobs"]] == [1, 3, 3]
    assert [len(lps) for lps in meta["unconditional_token_logprobs"]] == [1, 3, 3]
    assert all(u[0][0] is None for u in meta["unconditional_token_logprobs"])  # the first token has no context
    # SGLang's entries: (logprob, token id, token text), the same tokens with and without context.
    assert [[t for _, t, _ in row] for row in meta["input_token_logprobs"]] == \
        [[t for _, t, _ in row] for row in meta["unconditional_token_logprobs"]]
    assert meta["input_token_logprobs"][0][0][2] == " Paris"


def test_select_after_a_trailing_space_heals_the_token_boundary(backend):
    """"is " + "Paris" tokenizes as "is", " Paris": the choice is scored as the merged token (logprob about -0.3),
    not as "Paris" after a lone " " token (about -7)."""
    state = boundary.run(backend=backend)
    assert state["city"] == "Paris"
    paris, london = state.get_meta_info("city")["input_token_logprobs"]
    assert len(paris) == 1 and paris[0][0] > -2.0 and paris[0][0] > london[0][0]
    assert paris[0][2] == " Paris"  # the merged token


# -- tool use -------------------------------------------------------------------------------------------------------


def test_tool_use_evaluates_the_generated_expression(backend):
    state = tool_use.run(lhs=257, rhs=983, temperature=0, backend=backend)
    assert state.error() is None
    assert state["answer"] == calculate(state["expression"])  # the program ran eval on the model's text
    assert state["expression"] == "257*983" and int(state["answer"]) == 257 * 983


def test_react_loop(backend):
    state = react.run(question="What country does the creator of Linux live in?", temperature=0, backend=backend)
    assert state.error() is None
    steps = state.ret_value
    assert steps is not None, state.text()  # it finished within the bound
    actions = [state[f"action_{i}"] for i in range(1, steps + 1)]
    assert actions == ["Search"] * (steps - 1) + ["Finish"]
    assert all(f"query_{i}" in state for i in range(1, steps))  # each Search took its branch
    assert "states" in state["answer"].lower() or "finland" in state["answer"].lower()


# -- skeleton of thought: fork / join ---------------------------------------------------------------------------


def test_skeleton_of_thought_fork_join(backend):
    state = skeleton_of_thought.run(topic="studying", n=3, temperature=0, backend=backend)
    assert state.error() is None
    details = state["detail"]
    assert len(details) == 3 and all(d.strip() for d in details)
    assert all(f"Tip {i + 1}:{d}\n" in state.text() for i, d in enumerate(details))
    assert state["summary"].strip()
    # The fork computed the shared prefix once: every branch found it in the radix cache.
    assert all(cached >= 40 for cached in state.ret_value), state.ret_value


# -- streaming ------------------------------------------------------------------------------------------------------


def test_streaming(backend):
    state = qa.run(question="Name three colors.", stream=True, temperature=0, backend=backend)
    pieces = list(state.text_iter())
    assert "".join(pieces) == state.text()
    assert pieces[:2] == ["<|im_start|>system\n", "You are a helpful assistant."]
    state = qa.run(question="Name three colors.", stream=True, temperature=0, backend=backend)
    answer_pieces = list(state.text_iter("answer"))
    assert len(answer_pieces) > 4  # token by token, not one block
    assert "".join(answer_pieces) == state["answer"] and state["answer"].strip()


# -- integer and JSON decoding (constrained) ----------------------------------------------------------------------


def test_integer_decoding_by_regex(backend):
    states = count.run_batch([{"question": "How many legs does a cat have?"},
                              {"question": "How many days are in a week?"}], temperature=0, backend=backend)
    assert [s["answer"] for s in states] == ["The answer is 4.", "The answer is 7."]


def test_typed_gen(backend):
    state = typed.run(temperature=0, backend=backend)
    int(state["n"])  # a string that parses as an integer (may be cut at max_tokens: it is still digits)
    assert state["b"] in ("True", "False")
    assert state["fruit"].startswith('"')


def test_json_decoding_by_regex(backend):
    state = character.run(name="Hermione Granger", temperature=0, backend=backend)
    assert re.fullmatch(CHARACTER_REGEX, state["json_output"])
    value = json.loads(state["json_output"])  # the regex spells JSON: it parses (the model's facts are its own)
    assert list(value) == ["name", "house", "blood status", "wand", "alive"] and list(value["wand"]) == [
        "wood", "core", "length"]


def test_json_decoding_by_schema(backend):
    states = city.run_batch([{"text": "Paris is the capital of France."},
                             {"text": "Lyon is a large city in France; it is not the capital."}],
                            temperature=0, backend=backend)
    cities = [City.model_validate_json(s["city"]) for s in states]
    assert [c.name for c in cities] == ["Paris", "Lyon"]
    assert [c.is_capital for c in cities] == [True, False]
