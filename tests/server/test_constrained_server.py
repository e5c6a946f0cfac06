"""Structured output over HTTP: OpenAI `response_format` through the real SDK, native `sampling_params`
constraints, and bad constraints answered with a 400 that names the field."""

from __future__ import annotations

import json
import re

import openai
import pydantic
import pytest

from tests.helpers.server import assert_no_kv_leak, sse_events

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                           "visits": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "rainy": {"type": "boolean"}},
          "required": ["city", "visits", "rainy"], "additionalProperties": False}
USER = [{"role": "user", "content": "Describe a trip as JSON."}]


@pytest.fixture(scope="module")
def sdk(tiny_server):
    return openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="unused", timeout=60, max_retries=0)


def test_response_format_json_schema_with_the_sdk(sdk, model_name):
    out = sdk.chat.completions.create(
        model=model_name, messages=USER, max_tokens=80, temperature=1.0, seed=5,
        response_format={"type": "json_schema", "json_schema": {"name": "trip", "schema": SCHEMA, "strict": True}})
    value = json.loads(out.choices[0].message.content)
    assert set(value) == {"city", "visits", "rainy"} and 0 <= value["visits"] <= 99
    assert out.choices[0].finish_reason == "stop"


def test_sdk_parse_with_a_pydantic_model(sdk, model_name):
    class Trip(pydantic.BaseModel):
        city: str = pydantic.Field(max_length=10)
        rainy: bool

    out = sdk.chat.completions.parse(model=model_name, messages=USER, max_tokens=60, temperature=1.0, seed=2,
                                     response_format=Trip)
    trip = out.choices[0].message.parsed
    assert isinstance(trip, Trip) and len(trip.city) <= 10


def test_response_format_json_object_streams_valid_json(sdk, model_name):
    stream = sdk.chat.completions.create(model=model_name, messages=USER, max_tokens=120, temperature=1.0, seed=1,
                                         response_format={"type": "json_object"}, stream=True)
    chunks = [c.choices[0] for c in stream if c.choices]
    text = "".join(c.delta.content or "" for c in chunks)
    if chunks[-1].finish_reason == "stop":  # random weights may run out of tokens inside a long string
        assert isinstance(json.loads(text), dict)
    assert text.startswith("{")


def test_completions_with_sglang_regex_extension(sdk, model_name):
    out = sdk.completions.create(model=model_name, prompt="Code:", max_tokens=16, temperature=1.0,
                                 extra_body={"regex": "[A-Z]{3}-[0-9]{2}"})
    assert re.fullmatch("[A-Z]{3}-[0-9]{2}", out.choices[0].text)


def test_native_generate_with_constraints(client):
    body = {"text": ["A:", "B:"], "sampling_params": [{"json_schema": json.dumps(SCHEMA), "max_new_tokens": 80},
                                                      {"ebnf": 'root ::= "on" | "off"', "max_new_tokens": 4}]}
    outs = client.post("/generate", json=body).json()
    assert set(json.loads(outs[0]["text"])) == {"city", "visits", "rainy"}
    assert outs[1]["text"] in ("on", "off")
    stream = client.post("/generate", json={"text": "C:", "stream": True,
                                            "sampling_params": {"regex": "(yes|no)", "max_new_tokens": 4}})
    events = sse_events(stream.text.splitlines())
    assert events[-1] == "[DONE]" and events[-2]["text"] in ("yes", "no")
    assert_no_kv_leak(client)


@pytest.mark.parametrize("body, param, fragment", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format", "nope"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema", "required"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "json_object"),
    ({"regex": "(a"}, "regex", "unclosed"),
    ({"ebnf": "root ::= missing"}, "ebnf", "not found"),
    ({"regex": "a", "response_format": {"type": "json_object"}}, "regex", "at most one"),
])
def test_bad_constraint_is_a_400_naming_the_field(client, model_name, body, param, fragment):
    response = client.post("/v1/chat/completions", json={"model": model_name, "messages": USER, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and fragment in error["message"], error
    native = client.post("/generate", json={"text": "x", "sampling_params": {"regex": "(a"}})
    assert native.status_code == 400 and "regex" in native.text
    assert client.get("/health").status_code == 200
