"""Tool calling in `/v1/chat/completions` through the official `openai` SDK, on the tiny random model. Its text is
noise, so what is checked is what the API promises: `required` and named calls always parse and validate against
their schemas (also for schemas hypothesis writes), `auto` never starts a call it does not finish validly, streamed
deltas reassemble to the whole response's calls, a tool loop goes round, bad input is a 400 naming the field."""

from __future__ import annotations

import json

import anthropic
import jsonschema
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers.server import assert_no_kv_leak

# Bounded values: a random model never closes a free string, so strings have a maxLength.
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city.",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 10},
                                                "unit": {"type": "string", "enum": ["c", "f"]}},
                                                "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time in a timezone.",
                                         "parameters": {"type": "object", "properties": {
                                             "zone": {"type": "integer", "minimum": -12, "maximum": 12}},
                                             "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris, and the time there?"}]
GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def sdk(tiny_server):
    return openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="unused", timeout=60, max_retries=0)


def valid(call, schemas=SCHEMAS) -> dict:
    """The call's arguments, checked against its tool's schema (raises if they do not validate)."""
    assert call.type == "function" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, schemas[call.function.name])
    return arguments


def sampled(sdk, model_name, seeds=range(4), **kwargs):
    """One sampled choice per seed."""
    return [sdk.chat.completions.create(model=model_name, temperature=1.0, seed=seed, **kwargs).choices[0]
            for seed in seeds]


def test_required_calls_always_parse_and_validate(sdk, model_name):
    for choice in sampled(sdk, model_name, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=96):
        calls = choice.message.tool_calls
        assert calls and choice.message.content is None
        # Parallel calls may go on until max_tokens cuts the last one; every finished call validates.
        finished = calls if choice.finish_reason == "tool_calls" else calls[:-1]
        assert choice.finish_reason in ("tool_calls", "length") and all(valid(call) for call in finished)
    one = sampled(sdk, model_name, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                  max_tokens=96)
    assert all(c.finish_reason == "tool_calls" and valid(c.message.tool_calls[0]) for c in one)


def test_a_named_function_is_the_one_called(sdk, model_name):
    out = sdk.chat.completions.create(model=model_name, messages=ASK, tools=TOOLS, max_tokens=64, **GREEDY,
                                      tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls = out.choices[0].message.tool_calls
    assert calls and {c.function.name for c in calls} == {"get_time"}
    assert all(-12 <= valid(c)["zone"] <= 12 for c in calls)


def test_parallel_tool_calls_false_makes_one_call(sdk, model_name):
    for choice in sampled(sdk, model_name, messages=ASK, tools=TOOLS, tool_choice="required",
                          parallel_tool_calls=False, max_tokens=96):
        assert len(choice.message.tool_calls) == 1


def test_none_answers_in_text(sdk, model_name):
    out = sdk.chat.completions.create(model=model_name, messages=ASK, tools=TOOLS, tool_choice="none",
                                      max_tokens=8, **GREEDY)
    assert out.choices[0].message.tool_calls is None and out.choices[0].message.content
    assert out.choices[0].finish_reason in ("length", "stop")


def test_auto_text_never_holds_a_malformed_call(sdk, model_name):
    for choice in sampled(sdk, model_name, range(6), messages=ASK, tools=TOOLS, max_tokens=48):
        message = choice.message
        assert "<tool_call>" not in (message.content or "")  # a started call is always parsed out, never text
        for call in message.tool_calls or []:
            if choice.finish_reason == "tool_calls":
                valid(call)


@pytest.mark.parametrize("tool_choice", ["required", "auto"])
def test_streamed_deltas_reassemble_to_the_whole_response(sdk, model_name, tool_choice):
    kwargs = dict(model=model_name, messages=ASK, tools=TOOLS, tool_choice=tool_choice, max_tokens=80, **GREEDY)
    whole = sdk.chat.completions.create(**kwargs).choices[0]
    content, calls, finish = "", {}, None
    for chunk in sdk.chat.completions.create(stream=True, **kwargs):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for piece in delta.tool_calls or []:
            entry = calls.setdefault(piece.index, {"id": None, "name": None, "arguments": ""})
            if piece.id:
                assert entry["id"] is None and piece.function.name  # id and name come first, once
                entry["id"], entry["name"] = piece.id, piece.function.name
            entry["arguments"] += piece.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == whole.finish_reason
    assert content == (whole.message.content or "")
    assert [(c["name"], c["arguments"]) for c in calls.values()] == \
        [(c.function.name, c.function.arguments) for c in whole.message.tool_calls or []]


def test_a_tool_loop_goes_round(sdk, model_name, client):
    first = sdk.chat.completions.create(model=model_name, messages=ASK, tools=TOOLS, tool_choice="required",
                                        parallel_tool_calls=False, max_tokens=64, **GREEDY)
    message = first.choices[0].message
    [call] = message.tool_calls
    result = {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21})}
    history = [*ASK, message.model_dump(exclude_none=True), result]
    second = sdk.chat.completions.create(model=model_name, messages=history, tools=TOOLS, max_tokens=8, **GREEDY)
    assert second.choices[0].message.content is not None or second.choices[0].message.tool_calls
    # The call and its result are in the prompt: it is longer than the question alone by both.
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + 20
    assert_no_kv_leak(client)


BAD = [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "nonsense"}}}}}]}, "tools.0.function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!", "parameters": {"type": "object"}}}]},
     "tools.0.function.name"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_news"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "messages": [*ASK, {"role": "tool", "tool_call_id": "call_x", "content": "21"}]},
     "messages.1.tool_call_id"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format"),
]


@pytest.mark.parametrize("changes,field", BAD, ids=[b[1] for b in BAD])
def test_bad_tool_input_is_a_400_naming_the_field(client, model_name, changes, field):
    response = client.post("/v1/chat/completions", json={"model": model_name, "messages": ASK, "max_tokens": 4,
                                                         **changes})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and field in error["message"], error
    good = client.post("/v1/chat/completions", json={"model": model_name, "messages": ASK, "max_tokens": 2})
    assert good.status_code == 200


@st.composite
def object_schemas(draw):
    """Object schemas of bounded values: integers in a range, booleans, enums, short strings, a nested object."""
    leaf = st.one_of(
        st.tuples(st.integers(-50, 0), st.integers(0, 50)).map(lambda r: {"type": "integer", "minimum": r[0],
                                                                         "maximum": r[1]}),
        st.just({"type": "boolean"}),
        st.lists(st.text("abcxyz", min_size=1, max_size=4), min_size=1, max_size=3, unique=True).map(
            lambda values: {"enum": values}),
        st.integers(1, 6).map(lambda n: {"type": "string", "maxLength": n}))
    names = draw(st.lists(st.text("abcdefgh", min_size=1, max_size=5), min_size=1, max_size=4, unique=True))
    properties = {n: draw(leaf) for n in names}
    if draw(st.booleans()):
        properties["nested"] = {"type": "object", "properties": {"x": draw(leaf)}, "required": ["x"],
                                "additionalProperties": False}
    required = draw(st.lists(st.sampled_from(sorted(properties)), unique=True))
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=object_schemas(), seed=st.integers(0, 1000))
def test_generated_schemas_give_valid_arguments(sdk, model_name, schema, seed):
    tool = {"type": "function", "function": {"name": "tool", "parameters": schema}}
    out = sdk.chat.completions.create(model=model_name, messages=ASK, tools=[tool], tool_choice="required",
                                      parallel_tool_calls=False, max_tokens=128, temperature=1.0, seed=seed)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    valid(choice.message.tool_calls[0], {"tool": schema})


# -- the other parsers: pythonic calls, a reasoning model's output ----------------------------------------------


def connect(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=60, max_retries=0)
    return client, client.models.list().data[0].id


def test_pythonic_calls_validate_whole_and_streamed(pythonic_server):
    sdk, model = connect(pythonic_server)
    for choice in sampled(sdk, model, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=96,
                          parallel_tool_calls=False):
        assert choice.finish_reason == "tool_calls" and valid(choice.message.tool_calls[0]) is not None
    kwargs = dict(model=model, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=96, **GREEDY)
    whole = sdk.chat.completions.create(**kwargs).choices[0].message.tool_calls
    streamed = [d.tool_calls for c in sdk.chat.completions.create(stream=True, **kwargs) if c.choices
                for d in [c.choices[0].delta] if d.tool_calls]
    names = [p.function.name for pieces in streamed for p in pieces if p.function.name]
    assert names == [c.function.name for c in whole]


def test_a_json_answer_follows_the_thinking_block(thinking_server):
    sdk, model = connect(thinking_server)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    choices = sampled(sdk, model, range(8), messages=ASK, max_tokens=60, response_format={
        "type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    # The random model opens a thinking block (and never closes it: the answer after one is checked on a scripted
    # output in tests/unit/test_chat_tools.py) or answers at once; about half the seeds do each.
    assert "stop" in {c.finish_reason for c in choices}
    for choice in choices:
        reasoning = choice.message.model_extra["reasoning_content"]
        if choice.finish_reason == "stop":
            jsonschema.validate(json.loads(choice.message.content), schema)
        else:  # cut inside the thinking block: all of it is reasoning, no tag in either
            assert choice.message.content == "" and reasoning and "<think>" not in reasoning
    # Streamed, the same split: reasoning_content deltas, then content deltas.
    for seed, whole in enumerate(choices[:4]):
        reasoning, content = "", ""
        for chunk in sdk.chat.completions.create(model=model, messages=ASK, max_tokens=60, temperature=1.0,
                                                 seed=seed, stream=True, response_format={
                                                     "type": "json_schema", "json_schema": {"name": "answer",
                                                                                            "schema": schema}}):
            delta = chunk.choices[0].delta if chunk.choices else None
            reasoning += (delta.model_extra or {}).get("reasoning_content") or "" if delta else ""
            content += delta.content or "" if delta else ""
        assert content == whole.message.content
        assert reasoning.strip() == whole.message.model_extra["reasoning_content"]


def test_anthropic_gets_the_thinking_as_a_thinking_block(thinking_server):
    sdk = anthropic.Anthropic(base_url=thinking_server.url, api_key="unused", max_retries=0, timeout=60)
    _, model = connect(thinking_server)
    kinds = set()
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    for topic in ("Paris", "rain", "the time", "Oslo", "wind", "snow", "Lima", "a storm"):
        # Greedy (the Messages API has no seed), with a JSON answer to give: the random model opens a thinking
        # block for some of these questions.
        kwargs = dict(model=model, max_tokens=24, messages=[{"role": "user", "content": f"Tell me about {topic}."}],
                      extra_body={"temperature": 0.0}, output_config={"format": {"type": "json_schema",
                                                                                 "schema": schema}})
        whole = sdk.messages.create(**kwargs)
        with sdk.messages.stream(**kwargs) as stream:
            streamed = stream.get_final_message()
        assert [b.type for b in streamed.content] == [b.type for b in whole.content]
        for block in whole.content:
            kinds.add(block.type)
            text = block.thinking if block.type == "thinking" else block.text
            assert "<think>" not in text and "</think>" not in text
    assert "thinking" in kinds
