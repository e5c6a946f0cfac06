"""Chat requests with tools and a reasoning parser, without a model (radixflow/server/chat_tools.py,
radixflow/parsers/reasoning.py): the rendered conversation, the output grammar (on a toy vocabulary), and the
output read back whole and streamed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from radixflow.parsers.reasoning import ReasoningStream, split_reasoning
from radixflow.server.chat_tools import ChatReader, check_parsers
from radixflow.server.common import render_chat
from radixflow.server.errors import APIError
from radixflow.server.openai_api import chat_plan
from radixflow.server.openai_protocol import ChatBody
from tests.helpers.toy_tokenizer import GrammarProbe, build_toy_tokenizer

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 12}},
                                                "required": ["city"], "additionalProperties": False}}}
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
          "additionalProperties": False}
ASKED = [{"role": "user", "content": "Weather in Paris?"}]


def body(**fields) -> ChatBody:
    return ChatBody(model="m", messages=fields.pop("messages", ASKED), **fields)


def plan(chat: ChatBody, constraint=None, template=None, parser="hermes", reasoning=None):
    """The OpenAI route's plan of `chat`, on a server whose template, parsers are these; `constraint` is the
    response format (`json_schema`) or SGLang's `regex` field."""
    if constraint:
        chat = chat.model_copy(update={"regex": constraint.get("regex"), "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": constraint["json_schema"]}}
            if "json_schema" in constraint else None})
    state = SimpleNamespace(manager=SimpleNamespace(tokenizer=SimpleNamespace(chat_template=template)),
                            config=SimpleNamespace(tool_call_parser=parser, reasoning_parser=reasoning))
    return chat_plan(state, chat)


@pytest.fixture(scope="module")
def toy():
    return GrammarProbe()


def accepts(toy: GrammarProbe, grammar: str, text: str) -> bool:
    return toy.accepts(grammar, text)


CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_tools_go_into_the_system_message_of_a_template_without_tool_support():
    p = plan(body(tools=[WEATHER], messages=[{"role": "system", "content": "Be brief."}, *ASKED]))
    system = p.messages[0]
    assert system["role"] == "system" and system["content"].startswith("Be brief.\n\n# Tools")
    assert '"name": "get_weather"' in system["content"] and "<tool_call>" in system["content"]
    assert p.template_tools is None and p.format.name == "hermes"


def test_a_template_that_renders_tools_gets_them_and_the_history_as_it_takes_it():
    history = [*ASKED, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C"}]
    p = plan(body(tools=[WEATHER], messages=history), template="{% for tool in tools %}...{% endfor %}")
    assert p.template_tools == [WEATHER | {"function": {**WEATHER["function"],
                                                        "parameters": WEATHER["function"]["parameters"]}}]
    assert p.messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert p.messages[2] == {"role": "tool", "content": "21 C", "tool_call_id": "call_1", "name": "get_weather"}


TOOL_TEMPLATE = ("{% for t in tools %}[tool {{ t.function.name }}]{% endfor %}{% for m in messages %}"
                 "<{{ m.role }}>{{ m.content or '' }}{% for c in m.tool_calls or [] %}[call {{ c.function.name }} "
                 "{{ c.function.arguments.city }}]{% endfor %}{% endfor %}<assistant>")


def test_the_template_renders_the_tools_and_the_history():
    hf = build_toy_tokenizer()
    hf.chat_template = TOOL_TEMPLATE
    history = [*ASKED, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C"}]
    p = plan(body(tools=[WEATHER], messages=history), template=TOOL_TEMPLATE)
    state = SimpleNamespace(manager=SimpleNamespace(tokenizer=hf))
    assert render_chat(state, p.messages, tools=p.template_tools) == (
        "[tool get_weather]<user>Weather in Paris?<assistant>[call get_weather Paris]<tool>21 C<assistant>")


def test_earlier_calls_and_results_are_written_in_the_format_otherwise():
    history = [*ASKED, {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Ro'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "25 C"}]
    p = plan(body(tools=[WEATHER], messages=history))
    assert p.messages[2]["content"] == "Checking.\n" + CALL + '\n<tool_call>\n{"name": "get_weather", ' \
        '"arguments": {"city": "Ro}\n</tool_call>'  # an unfinished call is kept as it was sent
    assert p.messages[3] == {"role": "user", "content": "<tool_response>\n21 C\n</tool_response>\n"
                                                        "<tool_response>\n25 C\n</tool_response>"}


@pytest.mark.parametrize("changes,field", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required", "tools": None}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "nonsense"}}}}}]}, "tools.0.function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools.0.function.parameters.type"),
    ({"tools": [WEATHER, WEATHER]}, "tools.1.function.name"),
    ({"messages": [*ASKED, {"role": "tool", "tool_call_id": "call_9", "content": "x"}]}, "messages.1.tool_call_id"),
])
def test_bad_tool_requests_name_the_field(changes, field):
    with pytest.raises(APIError) as caught:
        plan(body(**{"tools": [WEATHER], **changes}))
    assert caught.value.param == field and field in caught.value.message


def test_response_format_and_tools_do_not_mix():
    with pytest.raises(APIError, match="response_format"):
        plan(body(tools=[WEATHER]), constraint={"json_schema": SCHEMA})
    assert plan(body(tools=[WEATHER], tool_choice="none"), constraint={"json_schema": SCHEMA}).grammar is None


def test_the_grammar_follows_tool_choice(toy):
    required = plan(body(tools=[WEATHER], tool_choice="required")).grammar
    assert accepts(toy, required, CALL) and not accepts(toy, required, "No call.")
    auto = plan(body(tools=[WEATHER])).grammar
    assert accepts(toy, auto, "No call.") and accepts(toy, auto, "Sure. " + CALL)
    assert plan(body(tools=[WEATHER], tool_choice="none")).grammar is None


@pytest.mark.parametrize("reasoning", ["qwen3", "deepseek-r1"])
def test_constraints_apply_after_the_thinking_block(toy, reasoning):
    opened = reasoning == "qwen3"  # deepseek-r1's prompt opens the block: its output starts inside it
    think = ("<think>" if opened else "") + "Hmm, <b>maybe</b> {not json}.</think>\n\n"
    grammar = plan(body(), constraint={"json_schema": SCHEMA}, reasoning=reasoning).grammar
    assert accepts(toy, grammar, think + '{"ok": true}')
    assert not accepts(toy, grammar, think + "not json")
    assert accepts(toy, grammar, '{"ok": false}') == opened  # the block may be left out only where it is optional
    tools = plan(body(tools=[WEATHER], tool_choice="required"), reasoning=reasoning).grammar
    assert accepts(toy, tools, think + CALL) and not accepts(toy, tools, think + "text")
    regex = plan(body(), constraint={"regex": "[0-9]+/[0-9]+"}, reasoning=reasoning).grammar
    assert accepts(toy, regex, think + "3/4") and not accepts(toy, regex, think + "3-4")


def read(p, text: str, chunks: int = 1):
    """Whole (chunks=1) or streamed in `chunks`-character pieces: (reasoning, content, [(name, arguments)])."""
    reader = ChatReader(p)
    if chunks == 1:
        out = reader.read(text)
        return out.reasoning, out.content, [(c.name, c.arguments) for c in reader.calls]
    pieces = [reader.feed(text[i:i + chunks]) for i in range(0, len(text), chunks)] + [reader.finish()]
    calls: dict[int, list] = {}
    for piece in pieces:
        for call in piece.calls:
            entry = calls.setdefault(call.index, [None, ""])
            entry[0] = call.name or entry[0]
            entry[1] += call.arguments
    return ("".join(p.reasoning for p in pieces), "".join(p.content for p in pieces),
            [tuple(v) for v in calls.values()])


@pytest.mark.parametrize("chunks", [1, 2, 5])
def test_reasoning_content_and_calls_read_back_whole_and_streamed(chunks):
    p = plan(body(tools=[WEATHER]), reasoning="qwen3")
    reasoning, content, calls = read(p, "<think>It is Paris.</think>\n\nLet me look. " + CALL, chunks)
    assert reasoning == "It is Paris." and content == "Let me look. "
    assert calls == [("get_weather", '{"city": "Paris"}')]
    assert read(plan(body(), reasoning="qwen3"), "Plain answer.", chunks) == ("", "Plain answer.", [])
    json_plan = plan(body(), constraint={"json_schema": SCHEMA}, reasoning="qwen3")
    assert read(json_plan, '<think>Yes.</think>\n{"ok": true}', chunks) == ("Yes.", '{"ok": true}', [])


def test_the_streamed_reasoning_split_is_split_reasoning():
    for model_type, text in [("qwen3", "  <think>\nstep one\nstep two\n</think>\n\nThe answer."),
                             ("deepseek-r1", "thinking...</think>Answer"), ("qwen3", "No thinking here."),
                             ("deepseek-r1", "unfinished thought"), (None, "<think>half")]:
        for size in (1, 3, 100):
            stream = ReasoningStream(model_type)
            pieces = [stream.feed(text[i:i + size]) for i in range(0, len(text), size)] + [stream.finish()]
            reasoning = "".join(p.reasoning for p in pieces)
            answer = "".join(p.answer for p in pieces)
            expected = split_reasoning(text, model_type)
            assert (reasoning.strip(), answer) == expected, (model_type, text, size)


def test_unknown_parsers_are_refused():
    with pytest.raises(ValueError, match="--tool-call-parser"):
        check_parsers("xml", None)
    with pytest.raises(ValueError, match="--reasoning-parser"):
        check_parsers("hermes", "o1")
    check_parsers("pythonic", "qwen3")
