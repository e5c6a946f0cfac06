"""Speculative decoding on real models: greedy outputs are those of plain decoding, whatever the batch, the cache
mode, stop strings, max_new_tokens inside a draft, or constrained requests alongside; drafts really are taken."""

from __future__ import annotations

import pytest

from radixflow import Engine
from tests.helpers.models import GREEDY, build_tiny_model

SPEC = {"speculative_algorithm": "ngram"}
PROMPTS = ["a b c d a b c d a b c d a b", "one two three one two three one two", "The cat sat on the mat. The cat",
           "x = 1\ny = 2\nx = 1\ny =", "Hello there, how are you today?", "1 2 3 4 5 6 7 8 9 10 11 12"]


@pytest.fixture(scope="module")
def looping_model_dir(tmp_path_factory):
    """A tiny model with flatter logits, whose greedy outputs run in loops of repeated tokens and then change:
    drafts that are accepted and drafts that are rejected."""
    return build_tiny_model(tmp_path_factory.mktemp("looping"), initializer_range=0.1, tie_word_embeddings=True)


def _outputs(engine: Engine, batch: int, params: dict) -> list[dict]:
    out = []
    for i in range(0, len(PROMPTS), batch):
        out.extend(engine.generate(PROMPTS[i:i + batch], params))  # a list: the requests run concurrently
    return out


@pytest.mark.parametrize("options", [{}, {"disable_radix_cache": True}])
def test_greedy_outputs_equal_plain_decoding(looping_model_dir, options):
    path = str(looping_model_dir)
    cases = [({"max_new_tokens": 40, "ignore_eos": True, **GREEDY}, batch) for batch in (1, 3, 6)]
    cases += [({"max_new_tokens": 3, "ignore_eos": True, **GREEDY}, 6),  # the limit falls inside a draft
              ({"max_new_tokens": 40, "stop": [" c", "three", "\n"], **GREEDY}, 6)]
    with Engine(model_path=path, max_total_tokens=8192, **options) as plain, \
            Engine(model_path=path, max_total_tokens=8192, **SPEC, **options) as spec:
        for params, batch in cases:
            a, b = _outputs(plain, batch, params), _outputs(spec, batch, params)
            assert [o["output_ids"] for o in a] == [o["output_ids"] for o in b], (params, batch)
            assert [o["text"] for o in a] == [o["text"] for o in b]
            assert [o["meta_info"]["finish_reason"] for o in a] == [o["meta_info"]["finish_reason"] for o in b]
        stats = spec.stats()
        assert stats["spec_verify_steps"] > 0 and stats["spec_accepted_tokens"] > stats["spec_verify_steps"]
        spec.check_integrity()


def test_constrained_and_logprob_requests_decode_plainly_beside_drafting_ones(looping_model_dir):
    path = str(looping_model_dir)
    params = [{"max_new_tokens": 24, "ignore_eos": True, **GREEDY},
              {"max_new_tokens": 24, "regex": "(yes|no)( [0-9]+)+", **GREEDY},
              {"max_new_tokens": 24, "ignore_eos": True, **GREEDY}]
    prompts = PROMPTS[:3]
    with Engine(model_path=path, max_total_tokens=8192) as plain, \
            Engine(model_path=path, max_total_tokens=8192, **SPEC) as spec:
        a, b = plain.generate(prompts, params), spec.generate(prompts, params)
        assert [o["output_ids"] for o in a] == [o["output_ids"] for o in b]
        assert spec.stats()["spec_accepted_tokens"] > 0  # the unconstrained ones drafted
        steps = spec.stats()["spec_verify_steps"]
        a, b = (e.generate(prompts[0], params[0], return_logprob=True, top_logprobs_num=2) for e in (plain, spec))
        assert a["output_ids"] == b["output_ids"]
        assert a["meta_info"]["output_token_logprobs"] == b["meta_info"]["output_token_logprobs"]
        assert spec.stats()["spec_verify_steps"] == steps  # a logprob request does not draft


def test_the_same_prompt_again_is_drafted_from_the_radix_tree(looping_model_dir):
    params = {"max_new_tokens": 32, "ignore_eos": True, **GREEDY}
    prompt = "Hello there, how are you today? I wanted to ask you"
    with Engine(model_path=str(looping_model_dir), max_total_tokens=8192, **SPEC) as spec:
        first = spec.generate(prompt, params)
        before = spec.stats()
        again = spec.generate(prompt, params)
        after = spec.stats()
        assert again["output_ids"] == first["output_ids"]
        steps = after["spec_verify_steps"] - before["spec_verify_steps"]
        accepted = after["spec_accepted_tokens"] - before["spec_accepted_tokens"]
        assert accepted >= 24 and steps <= 8  # the first request's output, four drafts a step


def test_sampled_requests_speculate_and_finish(looping_model_dir):
    with Engine(model_path=str(looping_model_dir), max_total_tokens=8192, **SPEC) as spec:
        # Low temperature and top-k: sampled, yet loopy enough to draft.
        params = {"max_new_tokens": 32, "ignore_eos": True, "temperature": 0.1, "top_k": 3}
        outs = spec.generate(PROMPTS[:2] * 2, params)
        assert all(len(o["output_ids"]) == 32 for o in outs)
        assert spec.stats()["spec_verify_steps"] > 0
        spec.check_integrity()


@pytest.mark.slow
def test_smollm2_copying_is_faster_in_steps_and_identical():
    """On SmolLM2 (its fp32 weights: the int4 kernel's bf16 can flip near-ties between row counts), a quoting
    task gives the text plain decoding gives, in far fewer steps."""
    text = ("The committee met on Tuesday to review the budget for the coming year. After a long discussion, the "
            "members agreed to increase funding for the public library and to repair the roads.")
    with Engine(max_total_tokens=8192, weight_format="fp32") as plain, \
            Engine(max_total_tokens=8192, weight_format="fp32", **SPEC) as spec:
        prompt = plain.tokenizer.apply_chat_template(
            [{"role": "user", "content": "Repeat the following paragraph exactly.\n\n" + text}], tokenize=False,
            add_generation_prompt=True)
        params = {"max_new_tokens": 64, **GREEDY}
        a, b = plain.generate(prompt, params), spec.generate(prompt, params)
        assert a["output_ids"] == b["output_ids"]
        stats = spec.stats()
        assert stats["spec_accept_length"] > 2.0, stats
