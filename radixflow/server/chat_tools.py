"""Tool calling and reasoning output for the chat routes (`/v1/chat/completions`, `/v1/messages`).

Request side (`plan_chat`, on a `ChatRequest` that each route converts its body to): the conversation is rendered
by the model's own chat template when it renders tools, else tools, earlier calls and tool results are written in
the configured format (`--tool-call-parser`, radixflow/parsers/tool_calls.py) into the messages; and the output
grammar is chosen: `required` / a named function is the format's calls and nothing else, `auto` free text in
which a started call must be valid (a lazy trigger), `none` no tools. With `--reasoning-parser`, a grammar (tools,
or a JSON schema or regex the response format asks for) applies to the answer after the model's `<think>` block.

Response side (`ChatReader`): the output split into reasoning, content and calls, whole or streamed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from radixflow.errors import InvalidRequestError
from radixflow.parsers.reasoning import STARTS_THINKING, THINK_END, ReasoningStream, check_model_type
from radixflow.parsers.tool_calls import CallPiece, Tool, ToolCall, ToolFormat, tool_format
from radixflow.runtime.constrained.spec import JSON_DEFAULTS, Constraint
from radixflow.server.errors import bad_request

EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass
class ChatRequest:
    """A chat request as `plan_chat` takes it, from either API (openai_api.py, anthropic_api.py convert theirs).

    `messages`: {"role", "content": text}, where an assistant's message may carry its earlier `calls` (ToolCall)
    and a tool result (role "tool") the `answers` id of the call it answers and the `field` its client wrote that
    id in. `tool_choice`: "auto", "none", "required", or the name of the one function to call (checked against
    `tools` by the caller, who names its own field)."""

    messages: list[dict]
    tools: list[Tool] = field(default_factory=list)
    tool_choice: str = "none"
    parallel: bool = True
    constraint: dict = field(default_factory=dict)  # json_schema / regex / ebnf the API's response format asked for
    constraint_field: str = "response_format"


@dataclass
class ChatPlan:
    """What a chat request asks of the model, and how to read its output."""

    messages: list[dict]
    template_tools: list[dict] | None = None  # for a chat template that renders tools itself
    format: ToolFormat | None = None  # set when the output may hold calls
    reasoning: str | None = None  # the reasoning parser's model type, when one is configured
    grammar: str | None = None  # the output's Lark grammar, when tools or reasoning shape it


def check_parsers(tool_call_parser: str, reasoning_parser: str | None) -> None:
    """Refuses unknown parser names at start-up (raises ValueError naming the flag)."""
    try:
        tool_format(tool_call_parser)
    except ValueError as exc:
        raise ValueError(f"--tool-call-parser: {exc}") from None
    if reasoning_parser is not None:
        check_model_type(reasoning_parser, "--reasoning-parser:")


def checked_tool(name: str, description: str | None, parameters: dict | None, field_name: str) -> Tool:
    """A tool whose parameter schema (at `field_name`) is an object schema the grammar engine compiles."""
    parameters = parameters if parameters is not None else EMPTY_PARAMETERS
    if parameters.get("type", "object") != "object":
        raise bad_request(f"{field_name}.type: must be 'object'", f"{field_name}.type")
    try:
        Constraint("json_schema", json.dumps(parameters)).validate()
    except InvalidRequestError as exc:
        raise bad_request(f"{field_name}: {exc.detail}", field_name) from None
    return Tool(name, description or "", {"type": "object", **parameters})


def check_unique(tools: list[Tool], field_of) -> None:
    """No name defined twice; `field_of(i)` names the i-th tool's name field."""
    seen = set()
    for i, tool in enumerate(tools):
        if tool.name in seen:
            raise bad_request(f"{field_of(i)}: {tool.name!r} is defined twice", field_of(i))
        seen.add(tool.name)


def plan_chat(request: ChatRequest, template: str | None, parser: str, reasoning: str | None) -> ChatPlan:
    fmt = tool_format(parser)
    native = bool(template) and "tools" in template
    plan = ChatPlan(messages=_history(request.messages, fmt, native), reasoning=reasoning)
    if request.tool_choice != "none":
        if request.constraint:
            raise bad_request(f"{request.constraint_field}: cannot be combined with tools unless the tool choice is "
                              "none", request.constraint_field)
        plan.format = fmt
        if native:
            plan.template_tools = [t.openai() for t in request.tools]
        else:
            plan.messages = _with_instructions(plan.messages, fmt.instructions(request.tools))
        named = [t for t in request.tools if t.name == request.tool_choice]
        required = request.tool_choice == "required" or bool(named)
        answer = fmt.grammar(named or request.tools, required=required, parallel=request.parallel)
        plan.grammar = _after_thinking(answer, reasoning) if reasoning else answer
    elif reasoning and request.constraint.keys() & {"json_schema", "regex"}:
        plan.grammar = _after_thinking(_answer_grammar(request.constraint), reasoning)
    return plan


def _history(messages: list[dict], fmt: ToolFormat, native: bool) -> list[dict]:
    """The conversation with earlier calls and tool results: as the chat template takes them where it renders
    tools, else written in the format (calls in the assistant's text, results as user messages)."""
    names: dict[str, str] = {}  # call id -> function name, for the results that answer them
    out: list[dict] = []
    for message in messages:
        text = message["content"]
        if message.get("calls"):
            calls = message["calls"]
            names |= {c.id: c.name for c in calls}
            if native:
                out.append({"role": "assistant", "content": text, "tool_calls": [
                    {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": _as_object(c.arguments)}}
                    for c in calls]})
            else:
                out.append({"role": "assistant", "content": (text + "\n" if text else "") + fmt.render_calls(calls)})
        elif message["role"] == "tool":
            call_id = message.get("answers")
            if call_id not in names:
                field_name = message.get("field", "messages")
                raise bad_request(f"{field_name}: {call_id!r} answers no earlier tool call", field_name)
            if native:
                out.append({"role": "tool", "content": text, "tool_call_id": call_id, "name": names[call_id]})
                continue
            result = fmt.render_result(names[call_id], text)
            if out and out[-1].get("tool_results"):  # consecutive results go back in one user message
                out[-1]["content"] += "\n" + result
            else:
                out.append({"role": "user", "content": result, "tool_results": True})
        else:
            out.append({"role": message["role"], "content": text})
    return [{k: v for k, v in m.items() if k != "tool_results"} for m in out]


def _as_object(arguments: str):
    """Arguments as a chat template renders them (a mapping), or the text where it is not JSON."""
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


def _with_instructions(messages: list[dict], block: str) -> list[dict]:
    """The tools' instructions in the system message (a new one first, if there is none)."""
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{block}"}, *messages[1:]]
    return [{"role": "system", "content": block}, *messages]


def _answer_grammar(constraint: dict) -> str:
    """A JSON schema or regex answer as a Lark grammar, to follow the thinking block."""
    if "json_schema" in constraint:
        schema = constraint["json_schema"]
        schema = json.loads(schema) if isinstance(schema, str) else schema
        return f"%llguidance {{}}\nstart: %json {json.dumps({'x-guidance': JSON_DEFAULTS, **schema})}\n"
    regex = constraint["regex"].replace("/", "\\/")
    return f"%llguidance {{}}\nstart: ANSWER\nANSWER: /{regex}/\n"


def _after_thinking(answer: str, reasoning: str) -> str:
    """`answer`'s grammar after a thinking block: required where the prompt opened the block, else optional.
    The thinking is free text up to the first `</think>` (a lazy rule)."""
    body = "\n".join("answer:" + line[len("start:"):] if line.startswith("start:") else line
                     for line in answer.splitlines() if line != "%llguidance {}")
    block = '"<think>" thinking' if reasoning not in STARTS_THINKING else "thinking"
    optional = "?" if reasoning not in STARTS_THINKING else ""
    return ("%llguidance {}\n"
            f"start: ({block} GAP){optional} answer\n"
            f"thinking[lazy]: THINK {json.dumps(THINK_END)}\n"
            "THINK: /(.|\\n)*/\n"
            "GAP: /[ \\t\\n]*/\n"
            f"{body}\n")


# -- reading the output ---------------------------------------------------------------------------------------------


@dataclass
class ChatDelta:
    reasoning: str = ""
    content: str = ""
    calls: list[CallPiece] = field(default_factory=list)


class ChatReader:
    """One choice's output: reasoning (with a reasoning parser), then content and calls (with tools)."""

    def __init__(self, plan: ChatPlan):
        self.reasoning = ReasoningStream(plan.reasoning) if plan.reasoning is not None else None
        self.tools = plan.format.stream() if plan.format else None

    @property
    def calls(self) -> list[ToolCall]:
        return self.tools.calls if self.tools else []

    def feed(self, text: str) -> ChatDelta:
        if self.reasoning is None:
            return self._answer(text)
        split = self.reasoning.feed(text)
        return self._merge(split.reasoning, self._answer(split.answer))

    def finish(self) -> ChatDelta:
        if self.reasoning is None:
            return self._answer_end(ChatDelta())
        split = self.reasoning.finish()
        return self._answer_end(self._merge(split.reasoning, self._answer(split.answer)))

    def read(self, text: str) -> ChatDelta:
        """A whole output (its reasoning stripped, as `split_reasoning` gives it)."""
        first, last = self.feed(text), self.finish()
        return ChatDelta((first.reasoning + last.reasoning).strip(), first.content + last.content,
                         first.calls + last.calls)

    def _answer(self, text: str) -> ChatDelta:
        if self.tools is None:
            return ChatDelta(content=text)
        piece = self.tools.feed(text) if text else None
        return ChatDelta(content=piece.text, calls=piece.calls) if piece else ChatDelta()

    def _answer_end(self, delta: ChatDelta) -> ChatDelta:
        if self.tools is not None:
            end = self.tools.finish()
            delta.content += end.text
            delta.calls += end.calls
        return delta

    @staticmethod
    def _merge(reasoning: str, answer: ChatDelta) -> ChatDelta:
        answer.reasoning = reasoning
        return answer


def calls_json(calls: list[ToolCall]) -> list[dict]:
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]


def call_deltas(pieces: list[CallPiece]) -> list[dict]:
    """OpenAI's streamed `tool_calls` entries: a call's index, id, type and name first, then argument fragments."""
    out = []
    for piece in pieces:
        if piece.name is not None:
            out.append({"index": piece.index, "id": piece.id, "type": "function",
                        "function": {"name": piece.name, "arguments": piece.arguments}})
        elif piece.arguments:
            out.append({"index": piece.index, "function": {"arguments": piece.arguments}})
    return out
