"""The one native-request normaliser (`Engine.generate` and `POST /generate`): shapes, request ids, n samples and
the refusals, without a model."""

from __future__ import annotations

import pytest

from radixflow.entrypoints.generate import GenerateInput, is_sample_of, sample_rid
from radixflow.errors import InvalidRequestError
from radixflow.runtime.limits import RequestLimits


class WordTokenizer:
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [len(word) for word in text.split()]


def build(**fields):
    normalized = GenerateInput(**fields).normalize()
    return normalized, normalized.build(WordTokenizer(), frozenset({0}), RequestLimits(512, 1024, 100))


def test_a_single_prompt_is_one_request_and_one_result():
    normalized, reqs = build(text="a bb ccc", rid="mine")
    assert [r.rid for r in reqs] == ["mine"] and reqs[0].prompt_ids == (1, 2, 3)
    assert normalized.is_single and normalized.shape(["result"]) == "result"


def test_a_batch_with_n_samples_is_flat_and_prompt_major():
    normalized, reqs = build(text=["a", "bb"], sampling_params={"n": 2}, rid="batch")
    assert [(r.rid, r.prompt_ids) for r in reqs] == [("batch_0", (1,)), ("batch_1", (1,)), ("batch_2", (2,)),
                                                     ("batch_3", (2,))]
    assert not normalized.is_single and normalized.shape([1, 2, 3, 4]) == [1, 2, 3, 4]


def test_one_prompt_with_n_samples_is_a_list():
    normalized, reqs = build(input_ids=[5, 6], sampling_params={"n": 3}, rid="x")
    assert [r.rid for r in reqs] == ["x_0", "x_1", "x_2"]
    assert normalized.shape(["a", "b", "c"]) == ["a", "b", "c"]


def test_per_prompt_rids_and_params():
    _, reqs = build(text=["a", "bb"], rid=["first", "second"],
                    sampling_params=[{"max_new_tokens": 3}, {"max_new_tokens": 5, "n": 2}])
    assert [(r.rid, r.params.max_new_tokens) for r in reqs] == [("first", 3), ("second_0", 5), ("second_1", 5)]


def test_without_a_rid_every_request_gets_its_own():
    _, reqs = build(text=["a", "a"], sampling_params={"n": 2})
    assert len({r.rid for r in reqs}) == 4


@pytest.mark.parametrize("fields,field", [
    (dict(text=["a", "b", "c"], rid=["r1", "r2"]), "rid"),           # shorter: would silently drop a prompt
    (dict(text=["a"], rid=["r1", "r2"]), "rid"),
    (dict(text=["a", "b"], rid=["same", "same"]), "rid"),
    (dict(text="a", rid=5), "rid"),
    (dict(text=["a", "b", "c"], sampling_params=[{}, {}]), "sampling_params"),
    (dict(text="a", sampling_params=[{}, {}]), "sampling_params"),
    (dict(text="a", sampling_params=["max_new_tokens"]), "sampling_params"),
    (dict(text="a", sampling_params={"max_new_token": 1}), "max_new_token"),
    (dict(), "text"),
    (dict(text="a", input_ids=[1]), "text"),
    (dict(text=[]), "text"),
    (dict(input_ids=[]), "input_ids"),
    (dict(input_ids=[[1], 2]), "input_ids"),
    (dict(text=["a", "b"], stream=True), "stream"),
    (dict(text="a", sampling_params={"n": 2}, stream=True), "stream"),
    (dict(text="a", top_logprobs_num=21), "top_logprobs_num"),
    (dict(text="a", logprob_start_len=-2), "logprob_start_len"),
])
def test_refusals_name_the_field(fields, field):
    with pytest.raises(InvalidRequestError) as info:
        GenerateInput(**fields).normalize()
    assert info.value.field == field


def test_checks_that_need_the_tokens_happen_when_building():
    with pytest.raises(InvalidRequestError, match="input_ids"):
        build(input_ids=[1, 100])  # past the vocabulary
    with pytest.raises(InvalidRequestError, match="logprob_start_len"):
        build(text="a bb", return_logprob=True, logprob_start_len=2)
    with pytest.raises(InvalidRequestError, match="context length"):
        build(input_ids=[1] * 500, sampling_params={"max_new_tokens": 20})


def test_the_field_is_named_as_the_caller_calls_the_text():
    with pytest.raises(InvalidRequestError) as info:
        GenerateInput().normalize(text_field="prompt")
    assert info.value.field == "prompt"


def test_sample_ids_are_recognised_for_aborts():
    assert is_sample_of(sample_rid("r", 3), "r")
    assert not is_sample_of("r_x", "r") and not is_sample_of("r", "r") and not is_sample_of("rr_1", "r")
