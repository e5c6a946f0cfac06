import pytest

from radixflow.errors import InvalidRequestError
from radixflow.runtime.sampling_params import SamplingParams


@pytest.mark.parametrize("field,value", [
    ("max_new_tokens", -1), ("max_new_tokens", 1.5), ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5),
    ("top_k", -2), ("min_p", 2.0), ("frequency_penalty", 3.0), ("presence_penalty", -3.0),
    ("repetition_penalty", 0.0), ("n", 0), ("stop", [""]), ("stop", [1]), ("stop_token_ids", [-1]),
    ("seed", "x"), ("temperature", "hot"), ("stop", 5), ("stop", {"a": 1}), ("stop_token_ids", 7),
])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**{field: value})
    assert err.value.field == field
    assert field in str(err.value)


def test_unknown_key_rejected():
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams.from_dict({"max_tokens": 3})
    assert err.value.field == "max_tokens"


def test_min_above_max_rejected():
    with pytest.raises(InvalidRequestError, match="min_new_tokens"):
        SamplingParams(max_new_tokens=2, min_new_tokens=3)


def test_stop_string_normalised_to_list():
    assert SamplingParams(stop="END").stop == ["END"]
