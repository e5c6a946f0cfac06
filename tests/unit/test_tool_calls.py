"""Tool-call formats (radixflow/parsers/tool_calls.py) without a model: each parser on whole and streamed output
split at every position (no marker leaks into the text, no character lost, the same calls), and each format's
grammar on a byte-level toy vocabulary (a valid call is accepted, a malformed one refused, free text only where
`tool_choice` allows it)."""

from __future__ import annotations

import json

import pytest

from radixflow.parsers.tool_calls import FORMATS, Tool, ToolCall, tool_format
from tests.helpers.toy_tokenizer import GrammarProbe

WEATHER = Tool("get_weather", "Weather in a city.", {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city"], "additionalProperties": False})
TIME = Tool("get_time", "The time now.", {"type": "object", "properties": {}, "additionalProperties": False})
CALLS = [ToolCall("get_weather", json.dumps({"city": "Paris, \"France\"", "days": 3})),
         ToolCall("get_time", "{}")]
NAMES = ("hermes", "llama3", "pythonic")


def joined(pieces) -> tuple[str, dict[int, dict]]:
    """The text and the calls (index -> name, id, arguments) that streamed pieces add up to."""
    text, calls = "", {}
    for piece in pieces:
        text += piece.text
        for call in piece.calls:
            entry = calls.setdefault(call.index, {"name": None, "id": None, "arguments": ""})
            if call.name is not None:
                assert entry["name"] is None, "a call's name is sent once, first"
                entry["name"], entry["id"] = call.name, call.id
            entry["arguments"] += call.arguments
    return text, calls


def streamed(name: str, chunks: list[str]):
    stream = tool_format(name).stream()
    pieces = [stream.feed(chunk) for chunk in chunks]
    return joined([*pieces, stream.finish()])


def output(name: str, before: str = "", calls=CALLS) -> str:
    return before + tool_format(name).render_calls(calls)


@pytest.mark.parametrize("name", NAMES)
def test_rendered_calls_parse_back(name):
    text, calls = tool_format(name).parse(output(name))
    assert text.strip() == ""
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [(c.name, json.loads(c.arguments)) for c in CALLS]
    assert all(c.id.startswith("call_") for c in calls) and len({c.id for c in calls}) == 2


@pytest.mark.parametrize("name", ["hermes", "llama3"])
def test_text_before_a_call_is_content(name):
    text, calls = tool_format(name).parse(output(name, "Let me check. "))
    assert text == "Let me check. " and [c.name for c in calls] == ["get_weather", "get_time"]


@pytest.mark.parametrize("name", NAMES)
def test_plain_text_is_all_content(name):
    plain = 'Use [brackets] and {"braces"}, <b>tags</b>; no call here.'
    assert tool_format(name).parse(plain) == (plain, [])


@pytest.mark.parametrize("name", NAMES)
def test_streamed_output_split_anywhere_gives_the_whole_responses_text_and_calls(name):
    whole = output(name, "Checking. " if name != "pythonic" else "")
    expected_text, expected_calls = tool_format(name).parse(whole)
    expected = [(c.name, c.arguments) for c in expected_calls]
    for cut in range(len(whole) + 1):
        text, calls = streamed(name, [whole[:cut], whole[cut:]])
        assert text == expected_text, (cut, text)
        assert [(c["name"], c["arguments"]) for c in calls.values()] == expected, cut
    text, calls = streamed(name, list(whole))  # a character at a time
    assert text == expected_text and [(c["name"], c["arguments"]) for c in calls.values()] == expected


@pytest.mark.parametrize("name", ["hermes", "llama3"])
def test_no_marker_text_leaks_into_streamed_content(name):
    whole = output(name, "Sure. ")
    stream = tool_format(name).stream()
    sent = "".join(stream.feed(ch).text for ch in whole) + stream.finish().text
    assert sent == "Sure. "


def test_json_arguments_stream_in_fragments_after_the_name():
    whole = output("hermes")
    stream = tool_format("hermes").stream()
    pieces = [stream.feed(ch) for ch in whole]
    first = [c for p in pieces for c in p.calls if c.index == 0]
    assert first[0].name == "get_weather" and first[0].arguments == ""
    assert len([c for c in first if c.arguments]) > 5  # many fragments, not one at the end


def test_a_call_cut_short_keeps_its_partial_arguments():
    text, calls = tool_format("hermes").parse('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa')
    assert text == "" and calls[0].name == "get_weather" and calls[0].arguments == '{"city": "Pa'


def test_pythonic_reads_python_and_json_literals():
    _, calls = tool_format("pythonic").parse("[f(a=True, b=None, c='x', d=[1, 2]), g(e=true, f=null)]")
    assert [json.loads(c.arguments) for c in calls] == [{"a": True, "b": None, "c": "x", "d": [1, 2]},
                                                        {"e": True, "f": None}]


def test_aliases_and_unknown_names():
    assert tool_format("qwen25") is tool_format("hermes") is FORMATS["qwen"]
    with pytest.raises(ValueError, match="not one of"):
        tool_format("no-such-parser")


# -- grammars -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy():
    return GrammarProbe()


def accepts(toy: GrammarProbe, grammar: str, text: str) -> bool:
    return toy.accepts(grammar, text)


def canonical(name: str, calls) -> str:
    """How the grammar writes calls: arguments with json.dumps's separators, pythonic values as JSON."""
    return tool_format(name).render_calls(calls) if name != "pythonic" else \
        "[" + ", ".join(f"{c.name}(" + ", ".join(f"{k}={json.dumps(v)}" for k, v in json.loads(c.arguments).items())
                        + ")" for c in calls) + "]"


@pytest.mark.parametrize("name", NAMES)
def test_required_grammar_takes_valid_calls_only(toy, name):
    fmt = tool_format(name)
    one, both = fmt.grammar([WEATHER, TIME], required=True, parallel=False), \
        fmt.grammar([WEATHER, TIME], required=True, parallel=True)
    assert accepts(toy, one, canonical(name, CALLS[:1]))
    assert not accepts(toy, one, canonical(name, CALLS))  # parallel_tool_calls=false: one call
    assert accepts(toy, both, canonical(name, CALLS))
    assert not accepts(toy, both, "I will not call anything.")
    bad = [ToolCall("get_weather", json.dumps({"town": "Paris"}))]  # not the schema's property
    assert not accepts(toy, both, canonical(name, bad))
    assert not accepts(toy, both, canonical(name, [ToolCall("get_news", "{}")]))  # no such tool


@pytest.mark.parametrize("name", NAMES)
def test_auto_grammar_takes_text_or_valid_calls_and_never_a_malformed_call(toy, name):
    grammar = tool_format(name).grammar([WEATHER, TIME], required=False, parallel=True)
    assert accepts(toy, grammar, "Just text, no call.")
    assert accepts(toy, grammar, canonical(name, CALLS))
    bad = canonical(name, [ToolCall("get_weather", json.dumps({"town": "Paris"}))])
    assert not accepts(toy, grammar, bad)
    if name != "pythonic":
        assert accepts(toy, grammar, "Let me look. " + canonical(name, CALLS[:1]))
