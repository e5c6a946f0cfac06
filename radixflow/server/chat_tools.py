"""Tool calling and reasoning output for `/v1/chat/completions`.

Request side (`plan_chat`): the tools and `tool_choice` are checked; the conversation is rendered by the model's own
chat template when it renders tools, else tools, earlier calls and tool results are written in the configured
format (`--tool-call-parser`, radixflow/parsers/tool_calls.py) into the messages; and the output grammar is chosen:
`required` / a named function is the format's calls and nothing else, `auto` free text in which a started call
must be valid (a lazy trigger), `none` no tools. With `--reasoning-parser`, a grammar (tools, or a JSON schema or
regex from `response_format`) applies to the answer after the model's `<think>` block.

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
from radixflow.server.openai_protocol import ChatBody

EMPTY_PARAMETERS = {"type": "object", "properties": {}}


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


def plan_chat(body: ChatBody, messages: list[dict], constraint: dict, template: str | None, parser: str,
              reasoning: str | None) -> ChatPlan:
    """`messages`: the body's messages with text content. `constraint`: the sampling fields `response_format`
    asked for (json_schema / regex / ebnf), possibly empty."""
    fmt = tool_format(parser)
    tools = _tools(body)
    mode, chosen = _tool_choice(body, tools)
    native = bool(template) and "tools" in template
    plan = ChatPlan(messages=_history(body, messages, fmt, native), reasoning=reasoning)
    if mode != "none":
        if constraint:
            raise bad_request("response_format: cannot be combined with tools unless tool_choice is 'none'",
                              "response_format")
        plan.format = fmt
        if native:
            plan.template_tools = [t.openai() for t in tools]
        else:
            plan.messages = _with_instructions(plan.messages, fmt.instructions(tools))
        answer = fmt.grammar(chosen, required=mode == "required", parallel=body.parallel_tool_calls)
        plan.grammar = _after_thinking(answer, reasoning) if reasoning else answer
    elif reasoning and constraint.keys() & {"json_schema", "regex"}:
        plan.grammar = _after_thinking(_answer_grammar(constraint), reasoning)
    return plan


def _tools(body: ChatBody) -> list[Tool]:
    tools, seen = [], set()
    for i, tool in enumerate(body.tools or []):
        fn = tool.function
        if fn.name in seen:
            raise bad_request(f"tools.{i}.function.name: {fn.name!r} is defined twice", f"tools.{i}.function.name")
        seen.add(fn.name)
        parameters = fn.parameters if fn.parameters is not None else EMPTY_PARAMETERS
        field_name = f"tools.{i}.function.parameters"
        if parameters.get("type", "object") != "object":
            raise bad_request(f"{field_name}.type: must be 'object'", f"{field_name}.type")
        try:
            Constraint("json_schema", json.dumps(parameters)).validate()
        except InvalidRequestError as exc:
            raise bad_request(f"{field_name}: {exc.detail}", field_name) from None
        tools.append(Tool(fn.name, fn.description or "", {"type": "object", **parameters}))
    return tools


def _tool_choice(body: ChatBody, tools: list[Tool]) -> tuple[str, list[Tool]]:
    """("none" | "auto" | "required", the tools the output may call)."""
    choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        named = [t for t in tools if t.name == name]
        if choice.get("type") != "function" or not named:
            raise bad_request(f"tool_choice: {name!r} is not one of the tools "
                              f"({', '.join(t.name for t in tools) or 'none given'})", "tool_choice")
        return "required", named
    if choice != "none" and not tools:
        raise bad_request(f"tool_choice: {choice!r} needs tools", "tool_choice")
    return choice, tools


def _history(body: ChatBody, messages: list[dict], fmt: ToolFormat, native: bool) -> list[dict]:
    """The conversation with earlier calls and tool results: as the chat template takes them where it renders
    tools, else written in the format (calls in the assistant's text, results as user messages)."""
    names: dict[str, str] = {}  # call id -> function name, for the results that answer them
    out: list[dict] = []
    for i, (source, message) in enumerate(zip(body.messages, messages)):
        if source.role == "assistant" and source.tool_calls:
            calls = [_earlier_call(i, j, call) for j, call in enumerate(source.tool_calls)]
            names |= {c.id: c.name for c in calls}
            if native:
                out.append({**message, "tool_calls": [{"id": c.id, "type": "function", "function": {
                    "name": c.name, "arguments": _as_object(c.arguments)}} for c in calls]})
            else:
                text = message["content"]
                out.append({"role": "assistant", "content": (text + "\n" if text else "") + fmt.render_calls(calls)})
        elif source.role == "tool":
            if source.tool_call_id not in names:
                raise bad_request(f"messages.{i}.tool_call_id: {source.tool_call_id!r} answers no earlier tool call",
                                  f"messages.{i}.tool_call_id")
            name = names[source.tool_call_id]
            if native:
                out.append({"role": "tool", "content": message["content"], "tool_call_id": source.tool_call_id,
                            "name": name})
                continue
            result = fmt.render_result(name, message["content"])
            if out and out[-1].get("tool_results"):  # consecutive results go back in one user message
                out[-1]["content"] += "\n" + result
            else:
                out.append({"role": "user", "content": result, "tool_results": True})
        else:
            out.append(message)
    return [{k: v for k, v in m.items() if k != "tool_results"} for m in out]


def _earlier_call(i: int, j: int, call: dict) -> ToolCall:
    field_name = f"messages.{i}.tool_calls.{j}"
    fn = call.get("function") or {}
    if not isinstance(fn.get("name"), str):
        raise bad_request(f"{field_name}.function.name: required", f"{field_name}.function.name")
    arguments = fn.get("arguments", "{}")
    # Kept as sent: a call cut at max_tokens has unfinished arguments, and OpenAI takes it back as it is.
    return ToolCall(fn["name"], arguments if isinstance(arguments, str) else json.dumps(arguments),
                    id=call.get("id") or f"call_{i}_{j}")


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
