"""The Anthropic-compatible endpoints (`/v1/messages`, `/v1/messages/count_tokens`) through the official `anthropic`
SDK, on the tiny random model: consistency checks (greedy streaming equals greedy whole answers, a stop sequence
cuts a known answer where it occurs, a prefill is continued as the native API continues the same text), constrained
answers that parse, and bad input in Anthropic's error shape with the server serving the next request."""

from __future__ import annotations

import json

import anthropic
import httpx
import pytest

from tests.helpers.server import API_KEY, sse_events

GREEDY = {"extra_body": {"temperature": 0.0}}  # this SDK no longer lists the sampling fields
USER = [{"role": "user", "content": "Tell me about rivers."}]
CITY = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "size": {"type": "integer"}},
        "required": ["name", "size"], "additionalProperties": False}


@pytest.fixture(scope="module")
def sdk(tiny_server):
    return anthropic.Anthropic(base_url=tiny_server.url, api_key="unused", timeout=30, max_retries=0)


def test_a_message_and_its_usage(sdk, model_name):
    message = sdk.messages.create(model=model_name, max_tokens=12, messages=USER, system="Be brief.", **GREEDY)
    assert message.type == "message" and message.role == "assistant" and message.model == model_name
    assert message.id.startswith("msg_") and message.content[0].type == "text" and message.content[0].text
    assert message.stop_reason in ("max_tokens", "end_turn")
    assert (message.stop_reason == "max_tokens") == (message.usage.output_tokens == 12)
    counted = sdk.messages.count_tokens(model=model_name, messages=USER, system="Be brief.").input_tokens
    usage = message.usage
    assert usage.input_tokens + usage.cache_read_input_tokens == counted
    again = sdk.messages.create(model=model_name, max_tokens=12, messages=USER, system="Be brief.", **GREEDY)
    assert again.content[0].text == message.content[0].text
    assert again.usage.cache_read_input_tokens > 0  # the radix cache held the prompt
    longer = sdk.messages.count_tokens(model=model_name, messages=USER, system="Be brief. Be kind.").input_tokens
    assert longer == counted + 3  # " Be kind." (the system prompt is counted)


def test_streaming_gives_anthropics_events_and_the_same_text(sdk, model_name):
    whole = sdk.messages.create(model=model_name, max_tokens=16, messages=USER, **GREEDY)
    with sdk.messages.stream(model=model_name, max_tokens=16, messages=USER, **GREEDY) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(pieces) == whole.content[0].text == final.content[0].text
    assert len(pieces) > 1 and final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_the_raw_event_sequence(tiny_server, model_name):
    body = {"model": model_name, "max_tokens": 6, "messages": USER, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{tiny_server.url}/v1/messages", json=body, timeout=30) as response:
        lines = list(response.iter_lines())
    names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    events = sse_events([line for line in lines if not line.startswith("event: ")])
    assert [e["type"] for e in events] == names  # each event's type repeats its name
    names = [n for n in names if n != "ping"]  # a ping may come anywhere
    assert names[:2] == ["message_start", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[2:-3]) == {"content_block_delta"}
    start, delta = events[0]["message"], events[-2]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["input_tokens"] > 0
    assert delta["delta"]["stop_reason"] in ("max_tokens", "end_turn") and 1 <= delta["usage"]["output_tokens"] <= 6


def test_a_stop_sequence_cuts_the_answer_where_it_occurs(sdk, model_name):
    text = sdk.messages.create(model=model_name, max_tokens=24, messages=USER, **GREEDY).content[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    cut = sdk.messages.create(model=model_name, max_tokens=24, messages=USER, stop_sequences=[stop], **GREEDY)
    assert cut.content[0].text == text[: text.find(stop)]
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop


def test_a_final_assistant_message_is_continued(sdk, client, model_name, tokenizer):
    prefill = "Rivers are"
    message = sdk.messages.create(model=model_name, max_tokens=10, **GREEDY,
                                  messages=[*USER, {"role": "assistant", "content": prefill}])
    prompt = tokenizer.apply_chat_template(USER, tokenize=False, add_generation_prompt=True) + prefill
    native = client.post("/generate", json={"text": prompt, "sampling_params": {"max_new_tokens": 10,
                                                                                "temperature": 0}}).json()
    assert message.content[0].text == native["text"]


def test_structured_output_follows_the_schema(sdk, model_name):
    message = sdk.messages.create(model=model_name, max_tokens=48, messages=USER,
                                  output_config={"format": {"type": "json_schema", "schema": CITY}}, **GREEDY)
    value = json.loads(message.content[0].text)
    assert set(value) == {"name", "size"} and isinstance(value["size"], int) and len(value["name"]) <= 12


def test_a_forced_tool_is_a_valid_call_whole_and_streamed(sdk, model_name):
    tools = [{"name": "city", "description": "Record a city.", "input_schema": CITY},
             {"name": "other", "input_schema": {"type": "object", "properties": {}}}]
    kwargs = dict(model=model_name, max_tokens=64, messages=USER, tools=tools, **GREEDY,
                  tool_choice={"type": "tool", "name": "city", "disable_parallel_tool_use": True})
    message = sdk.messages.create(**kwargs)
    [call] = message.content
    assert call.type == "tool_use" and call.name == "city" and call.id.startswith("toolu_")
    assert set(call.input) == {"name", "size"} and isinstance(call.input["size"], int)
    assert message.stop_reason == "tool_use"
    with sdk.messages.stream(**kwargs) as stream:
        final = stream.get_final_message()
    assert [(b.type, b.name, b.input) for b in final.content] == [("tool_use", "city", call.input)]
    several = sdk.messages.create(**{**kwargs, "max_tokens": 160, "tool_choice": {"type": "any"}})
    assert several.content and all(b.type == "tool_use" and b.name in ("city", "other") for b in several.content)
    finished = several.content if several.stop_reason == "tool_use" else several.content[:-1]  # the last may be cut
    assert all(set(b.input) == {"name", "size"} for b in finished if b.name == "city")


def test_tool_use_goes_round_with_results(sdk, model_name):
    tools = [{"name": "city", "description": "Record a city.", "input_schema": CITY}]
    first = sdk.messages.create(model=model_name, max_tokens=64, messages=USER, tools=tools, **GREEDY,
                                tool_choice={"type": "any", "disable_parallel_tool_use": True})
    [call] = [b for b in first.content if b.type == "tool_use"]
    history = [*USER, {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Recorded."}]}]
    second = sdk.messages.create(model=model_name, max_tokens=8, messages=history, tools=tools, **GREEDY)
    assert second.stop_reason in ("end_turn", "max_tokens", "tool_use")
    assert second.usage.input_tokens + second.usage.cache_read_input_tokens > \
        first.usage.input_tokens + first.usage.cache_read_input_tokens + 10  # the call and its result are in
    auto = sdk.messages.create(model=model_name, max_tokens=24, messages=USER, tools=tools, **GREEDY)
    assert all("<tool_call>" not in b.text for b in auto.content if b.type == "text")


def test_the_api_key_is_taken_as_anthropics_header(keyed_server, model_name):
    keyed = anthropic.Anthropic(base_url=keyed_server.url, api_key=API_KEY, max_retries=0, timeout=30)
    assert keyed.messages.count_tokens(model=model_name, messages=USER).input_tokens > 0
    body = {"model": model_name, "messages": USER}
    for headers, status in (({"x-api-key": API_KEY}, 200), ({"x-api-key": "sk-wrong"}, 401), ({}, 401)):
        response = httpx.post(f"{keyed_server.url}/v1/messages/count_tokens", json=body, headers=headers)
        assert response.status_code == status, response.text
    wrong = anthropic.Anthropic(base_url=keyed_server.url, api_key="sk-wrong", max_retries=0, timeout=30)
    with pytest.raises(anthropic.AuthenticationError) as caught:
        wrong.messages.count_tokens(model=model_name, messages=USER)
    assert caught.value.body["error"]["type"] == "authentication_error"


LONG = [{"role": "user", "content": "hello " * 3000}]  # past the tiny model's 2048-token context
BAD = [
    # (body changes, status, error type, text the message names)
    ({"max_tokens": None}, 400, "invalid_request_error", "max_tokens"),
    ({"max_tokens": 0}, 400, "invalid_request_error", "max_tokens"),
    ({"max_tokens": 10**6}, 400, "invalid_request_error", "max_tokens"),
    ({"model": "claude-17"}, 404, "not_found_error", "claude-17"),
    ({"temperature": 1.5}, 400, "invalid_request_error", "temperature"),
    ({"messages": []}, 400, "invalid_request_error", "messages"),
    ({"messages": [{"role": "system", "content": "x"}]}, 400, "invalid_request_error", "messages.0.role"),
    ({"messages": LONG}, 400, "invalid_request_error", "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64",
                                                                             "media_type": "image/png",
                                                                             "data": "AAAA"}}]}]},
     400, "invalid_request_error", "messages.0.content.0"),
    ({"messages": [{"role": "user", "content": [{"type": "document"}]}]}, 400, "invalid_request_error",
     "messages.0.content.0.type"),
    ({"tools": [{"name": "f", "input_schema": {"type": "object"}}], "tool_choice": {"type": "maybe"}}, 400,
     "invalid_request_error", "tool_choice.type"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x", "content": "1"}]}],
      "tools": [{"name": "f", "input_schema": {"type": "object"}}]}, 400, "invalid_request_error",
     "messages.0.content.0.tool_use_id"),
    ({"tools": [{"name": "f", "input_schema": {"type": "object"}}], "tool_choice": {"type": "tool", "name": "g"}},
     400, "invalid_request_error", "tool_choice.name"),
    ({"tools": [{"name": "f", "input_schema": {"type": "string"}}], "tool_choice": {"type": "tool", "name": "f"}},
     400, "invalid_request_error", "tools.0.input_schema.type"),
    ({"output_config": {"format": {"type": "json_schema"}}}, 400, "invalid_request_error", "output_config.format"),
    ({"output_config": {"format": {"type": "json_schema", "schema": {"type": "nonsense"}}}}, 400,
     "invalid_request_error", "output_config.format.schema"),
]


@pytest.mark.parametrize("changes,status,kind,named", BAD, ids=[str(b[3]) + "-" + str(i) for i, b in enumerate(BAD)])
def test_bad_input_in_anthropics_error_shape(client, model_name, changes, status, kind, named):
    body = {"model": model_name, "max_tokens": 8, "messages": USER, **changes}
    body = {k: v for k, v in body.items() if v is not None}
    response = client.post("/v1/messages", json=body)
    assert response.status_code == status, response.text
    error = response.json()
    assert error["type"] == "error" and set(error["error"]) == {"type", "message"}
    assert error["error"]["type"] == kind and named in error["error"]["message"], error
    good = client.post("/v1/messages", json={"model": model_name, "max_tokens": 2, "messages": USER})
    assert good.status_code == 200 and good.json()["usage"]["output_tokens"] >= 1


def test_malformed_json_and_unknown_paths_in_anthropics_shape(client):
    response = client.post("/v1/messages", content=b'{"model": ', headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
    response = client.post("/v1/messages/batches", json={})
    assert response.status_code in (404, 405) and response.json()["type"] == "error"


def test_the_sdk_surfaces_the_servers_message(sdk, model_name):
    with pytest.raises(anthropic.BadRequestError) as caught:
        sdk.messages.create(model=model_name, max_tokens=10**6, messages=USER)
    assert "max_tokens" in caught.value.body["error"]["message"]
