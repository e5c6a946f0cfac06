"""Masks, jump-forward and the grammar cache on a toy byte-level vocabulary: no model involved.

The toy tokenizer has every byte as a token plus a few merges (`",`, `{"`, `yes`, ` "`), enough to see the
token-boundary effect jump-forward's re-tokenization exists for.
"""

from __future__ import annotations

import json

import pytest
import torch

from radixflow.errors import InvalidRequestError
from radixflow.runtime.constrained.bitmask import allowed_tokens, apply_bitmask, fill_bitmask
from radixflow.runtime.constrained.grammar import GrammarCompiler, GrammarError, RequestGrammar
from radixflow.runtime.constrained.spec import MAX_SPEC_CHARS, Constraint, constraint_of
from radixflow.runtime.sampling_params import SamplingParams
from tests.helpers.toy_tokenizer import build_toy_tokenizer


@pytest.fixture(scope="module")
def toy_tokenizer():
    return build_toy_tokenizer()


@pytest.fixture()
def backend(toy_tokenizer):
    b = GrammarCompiler(toy_tokenizer, vocab_size=len(toy_tokenizer), eos_id=0, cache_size=2)
    yield b
    b.shutdown()


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def test_toy_tokenizer_merges_punctuation(toy_tokenizer):
    assert len(ids(toy_tokenizer, '",')) == 1 and len(ids(toy_tokenizer, "yes")) == 1
    assert toy_tokenizer.decode(ids(toy_tokenizer, '{"a": "b", "c"')) == '{"a": "b", "c"'


def test_mask_allows_exactly_the_tokens_the_grammar_accepts(backend, toy_tokenizer):
    matcher = backend.matcher(Constraint("regex", "(yes|no)!"))
    vocab = len(toy_tokenizer)
    allowed = allowed_tokens(fill_bitmask([matcher], vocab), vocab)[0]
    # Independent check: a token is allowed iff the matcher would accept it as the next token.
    expected = torch.tensor([matcher.validate_tokens([t]) == 1 for t in range(vocab)])
    assert torch.equal(allowed, expected)
    assert {toy_tokenizer.decode([t]) for t in allowed.nonzero().flatten().tolist()} == {"y", "ye", "yes", "n"}


def test_mask_after_the_end_allows_only_eos(backend, toy_tokenizer):
    matcher = backend.matcher(Constraint("regex", "(yes|no)!"))
    assert matcher.consume_tokens(ids(toy_tokenizer, "no"))
    allowed = allowed_tokens(fill_bitmask([matcher], len(toy_tokenizer)), len(toy_tokenizer))[0]
    assert allowed.nonzero().flatten().tolist() == ids(toy_tokenizer, "!")
    assert matcher.consume_tokens(ids(toy_tokenizer, "!"))
    allowed = allowed_tokens(fill_bitmask([matcher], len(toy_tokenizer)), len(toy_tokenizer))[0]
    assert allowed.nonzero().flatten().tolist() == [0]


def test_one_vectorised_mask_over_a_batch_leaves_unconstrained_rows_alone(backend, toy_tokenizer):
    vocab = len(toy_tokenizer)
    matcher = backend.matcher(Constraint("regex", "[0-9]"))
    logits = torch.randn(3, vocab)
    original = logits.clone()
    apply_bitmask(logits, fill_bitmask([None, matcher, None], vocab))
    assert torch.equal(logits[0], original[0]) and torch.equal(logits[2], original[2])
    digits = set(ids(toy_tokenizer, "0123456789"))
    finite = set(torch.isfinite(logits[1]).nonzero().flatten().tolist())
    assert finite == digits
    assert torch.equal(logits[1, sorted(digits)], original[1, sorted(digits)])


def test_batch_fill_in_parallel_equals_row_by_row(backend, toy_tokenizer):
    vocab = len(toy_tokenizer)
    matchers = [backend.matcher(Constraint("regex", r)) for r in ("[0-9]+", "(yes|no)", "[a-z ]+")]
    batch = fill_bitmask([matchers[0], None, matchers[1], matchers[2]], vocab)
    rows = [fill_bitmask([m], vocab)[0] for m in matchers]
    assert torch.equal(batch[0], rows[0]) and torch.equal(batch[2], rows[1]) and torch.equal(batch[3], rows[2])
    assert bool((batch[1] == -1).all())


def test_bitmask_unpacking_handles_bit_31(toy_tokenizer):
    bitmask = torch.zeros(1, 2, dtype=torch.int32)
    bitmask[0, 0] = -2**31  # only bit 31 of the first word: token 31
    bitmask[0, 1] = 1       # bit 0 of the second word: token 32
    assert allowed_tokens(bitmask, 40)[0].nonzero().flatten().tolist() == [31, 32]


def test_jump_forward_appends_the_forced_text_retokenized_at_the_boundary(backend, toy_tokenizer):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "boolean"}},
              "required": ["a", "b"], "additionalProperties": False}
    grammar = RequestGrammar(backend.matcher(Constraint("json_schema", json.dumps(schema))), backend)
    # "{" is sampled; the grammar forces '"a": ' next. Re-tokenized together the model sees '{"' + 'a' + ...,
    # exactly what the tokenizer produces for the text, not '{' followed by '"'.
    tokens, error = grammar.advance(ids(toy_tokenizer, "{")[0], jump_forward=True)
    assert error is None
    assert tokens == ids(toy_tokenizer, '{"a": ')
    assert toy_tokenizer.decode(tokens) == '{"a": '
    tokens, _ = grammar.advance(ids(toy_tokenizer, "7")[0], jump_forward=True)
    assert tokens == [ids(toy_tokenizer, "7")[0]]  # more digits may follow: nothing is forced
    tokens, _ = grammar.advance(ids(toy_tokenizer, ",")[0], jump_forward=True)
    assert toy_tokenizer.decode(tokens) == ', "b": '
    assert tokens == ids(toy_tokenizer, ', "b": ')  # ' "' is one token in this vocabulary
    assert backend.stats.jump_forward_steps == 2
    # The matcher followed the re-tokenized text: the rest of the object is still accepted.
    assert grammar.matcher.consume_tokens(ids(toy_tokenizer, "true}"))
    assert grammar.matcher.is_accepting()


def test_jump_forward_merges_the_sampled_token_with_forced_text(backend, toy_tokenizer):
    grammar = RequestGrammar(backend.matcher(Constraint("regex", '"[a-z]+",x')), backend)
    assert grammar.matcher.consume_tokens(ids(toy_tokenizer, '"ab'))
    tokens, _ = grammar.advance(ids(toy_tokenizer, '"')[0], jump_forward=True)
    # Only '",x' can follow 'ab' + '"'; the sampled '"' and the forced ',' become the single token '",'.
    assert tokens == ids(toy_tokenizer, '",x') and len(tokens) == 2


def test_jump_forward_off_appends_only_the_sampled_token(backend, toy_tokenizer):
    grammar = RequestGrammar(backend.matcher(Constraint("regex", r"\{abc\}")), backend)
    assert grammar.advance(ids(toy_tokenizer, "{")[0], jump_forward=False) == (ids(toy_tokenizer, "{"), None)
    tokens, _ = grammar.advance(ids(toy_tokenizer, "a")[0], jump_forward=True)
    assert toy_tokenizer.decode(tokens) == "abc}"
    assert grammar.finished


def test_a_token_the_grammar_refuses_is_an_error_not_a_crash(backend, toy_tokenizer):
    grammar = RequestGrammar(backend.matcher(Constraint("regex", "[0-9]+")), backend)
    tokens, error = grammar.advance(ids(toy_tokenizer, "x")[0], jump_forward=True)
    assert tokens == [] and error


def test_compiled_grammars_are_cached_by_spec_with_lru_eviction(backend):
    a, b, c = (Constraint("regex", r) for r in ("a+", "b+", "c+"))
    first, second = backend.matcher(a), backend.matcher(a)
    assert first is not second  # each request gets its own copy
    assert (backend.stats.compiled, backend.stats.cache_hits) == (1, 1)
    backend.matcher(b)
    backend.matcher(c)  # cache_size=2: "a+" is evicted
    backend.matcher(a)
    assert (backend.stats.compiled, backend.stats.cache_hits) == (4, 1)


def test_compilation_runs_on_another_thread(backend):
    import threading

    seen = []
    original = backend.matcher

    def spy(constraint):
        seen.append(threading.current_thread().name)
        return original(constraint)

    backend.matcher = spy
    assert backend.submit(Constraint("regex", "x")).result(timeout=30) is not None
    assert seen and seen[0].startswith("grammar-compile")


def test_grammar_refused_at_compile_time_raises(backend, monkeypatch):
    monkeypatch.setattr(Constraint, "grammar", lambda self: "start: /(/")
    with pytest.raises(GrammarError, match="regex"):
        backend.matcher(Constraint("regex", "anything"))


@pytest.mark.parametrize("params, field, message", [
    ({"regex": "("}, "regex", "unclosed group"),
    ({"regex": "[z-a]"}, "regex", "range"),
    ({"json_schema": "{not json"}, "json_schema", "not valid JSON"),
    ({"json_schema": '["a list"]'}, "json_schema", "must be a JSON object"),
    ({"json_schema": {"type": "no-such-type"}}, "json_schema", "no-such-type"),
    ({"ebnf": "root ::= undefined"}, "ebnf", "not found"),
    ({"regex": "a", "json_schema": {}}, "regex", "at most one"),
    ({"regex": ""}, "regex", "non-empty"),
    ({"regex": "a" * (MAX_SPEC_CHARS + 1)}, "regex", str(MAX_SPEC_CHARS)),
])
def test_bad_constraints_are_rejected_at_request_time_naming_the_field(params, field, message):
    with pytest.raises(InvalidRequestError, match=message) as info:
        SamplingParams(**params)
    assert info.value.field == field


def test_json_schema_dict_is_serialised_and_ebnf_accepts_gbnf_and_lark():
    assert json.loads(SamplingParams(json_schema={"type": "object"}).json_schema) == {"type": "object"}
    assert SamplingParams(ebnf='root ::= "yes" | "no"').constraint.kind == "ebnf"
    assert SamplingParams(ebnf='start: "yes" | "no"').constraint.kind == "ebnf"
    assert constraint_of(None, None, None) is None
