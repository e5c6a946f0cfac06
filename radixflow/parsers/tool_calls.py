"""Tool calls in a model's output (`--tool-call-parser`): how each model family writes them, the grammar that makes a
call valid by construction, and the parser that takes calls out of the text, whole or streamed.

Formats (SGLang's parser names, and aliases):
  hermes (qwen25, qwen): `<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>`, one block per call
  llama3:                `{"name": "f", "parameters": {...}}`, calls joined by "; "
  pythonic:              `[f(a=1, b="x"), g()]`

A format also writes the instructions a model without tool support in its chat template gets (a system-prompt
block), an earlier call, and a tool's result. `ToolCallStream` is the one parser: `feed(delta)` returns the text
and call pieces that are certain (a possible start of a call is held back, so no marker leaks into the text);
`parse(text)` is feed + finish, so streamed pieces always reassemble to the whole response.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from radixflow.parsers.reasoning import _partial_suffix

# What the grammars emit for JSON: Python's json.dumps separators, no free whitespace (as the rest of radixflow's
# JSON constraints; a small model cannot wander into whitespace).
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict  # a JSON schema of type object

    def openai(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


@dataclass
class CallPiece:
    """A streamed piece of call `index`: its start (`name`, `id`) or a fragment of its arguments."""

    index: int
    name: str | None = None
    id: str | None = None
    arguments: str = ""


@dataclass
class StreamPiece:
    text: str = ""
    calls: list[CallPiece] = field(default_factory=list)


class ToolFormat(ABC):
    name: str
    markers: tuple[str, ...] = ()  # texts that start a call: text that ends in a beginning of one is held back
    separator = "\n"  # between calls, when the output must be calls only

    # -- the prompt ------------------------------------------------------------------------------------------------
    @abstractmethod
    def instructions(self, tools: list[Tool]) -> str:
        """The system-prompt block for a chat template that does not render tools itself."""

    @abstractmethod
    def render_calls(self, calls: list[ToolCall]) -> str:
        """An assistant's earlier calls as the text it would have written."""

    def render_result(self, name: str | None, content: str) -> str:
        """A tool's result, sent back as a user message."""
        return f"<tool_response>\n{content}\n</tool_response>"

    # -- the grammar (llguidance Lark) ----------------------------------------------------------------------------
    @abstractmethod
    def trigger(self, tool: Tool) -> str:
        """The text that starts a call of `tool`."""

    @abstractmethod
    def call_body(self, tool: Tool) -> str:
        """The Lark of the rest of a call of `tool`, after its trigger."""

    def grammar(self, tools: list[Tool], required: bool, parallel: bool) -> str:
        """Calls of `tools` in this format, each call's arguments valid under its tool's schema. `required`: the
        output is one call (or, with `parallel`, several) and nothing else. Otherwise free text, in which a
        trigger must start a valid call: a lazy rule matches text only up to the first trigger."""
        lines = ["%llguidance {}", "TEXT: /(.|\\n)*/"]
        for i, tool in enumerate(tools):
            lines.append(f"body_{i}: {self.call_body(tool)}")
            if required:
                lines.append(f"call_{i}: {_lark_text(self.trigger(tool))} body_{i}")
            else:
                lines.append(f"trigger_{i}[lazy]: TEXT {_lark_text(self.trigger(tool))}")
                lines.append(f"call_{i}: trigger_{i} body_{i}")
        call = "(" + " | ".join(f"call_{i}" for i in range(len(tools))) + ")"
        if required:
            lines.append(f"start: {call} ({_lark_text(self.separator)} {call})*" if parallel else f"start: {call}")
        else:
            lines.append(f"start: {call}{'*' if parallel else '?'} TEXT")
        return "\n".join(lines) + "\n"

    # -- parsing ------------------------------------------------------------------------------------------------
    def stream(self) -> ToolCallStream:
        return ToolCallStream(self)

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content, calls) of a whole output."""
        stream = self.stream()
        pieces = [stream.feed(text), stream.finish()]
        return "".join(p.text for p in pieces), stream.calls

    @abstractmethod
    def find_start(self, text: str) -> int | None:
        """Where the first call may start in `text`."""

    @abstractmethod
    def read_head(self, text: str) -> tuple[str, int] | bool | None:
        """At a call's start: (the tool's name, where its arguments begin); None while the text is too short to
        tell; False if it is not a call after all."""

    @abstractmethod
    def read_tail(self, text: str) -> tuple[int, str] | None:
        """After a call's arguments: (how much text ends the call, "head" if the next call follows at once, else
        "text"); None while the text is too short to tell."""

    python_arguments = False  # pythonic: keyword arguments, converted to JSON when the call closes

    def held_back(self, text: str) -> int:
        """How much of the end of `text` (in which no call starts) may still become the start of one."""
        return max((_partial_suffix(text, m) for m in self.markers), default=0)


class Hermes(ToolFormat):
    name = "hermes"
    markers = ("<tool_call>",)
    _HEAD = re.compile(r'<tool_call>\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\S)')
    _TAIL = re.compile(r"\s*\}\s*</tool_call>\s*")

    def instructions(self, tools):
        return ("# Tools\n\nYou can call functions to help answer. These are the functions you can call, as JSON "
                f"signatures inside <tools></tools>:\n<tools>\n{_signatures(tools)}\n</tools>\n\n"
                "To call one, answer with a JSON object holding its name and arguments inside "
                "<tool_call></tool_call> tags, one block per call:\n<tool_call>\n"
                '{"name": <function name>, "arguments": <arguments as a JSON object>}\n</tool_call>')

    def render_calls(self, calls):
        return "\n".join(f'<tool_call>\n{{"name": {json.dumps(c.name)}, "arguments": {c.arguments}}}\n</tool_call>'
                         for c in calls)

    def trigger(self, tool):
        return "<tool_call>"

    def call_body(self, tool):
        head = f'\n{{"name": {json.dumps(tool.name)}, "arguments": '
        return f"{_lark_text(head)} {_json_rule(tool.parameters)} {_lark_text('}' + chr(10) + '</tool_call>')}"

    def find_start(self, text):
        at = text.find("<tool_call>")
        return None if at < 0 else at

    def read_head(self, text):
        match = self._HEAD.match(text)
        if match:
            return json.loads(f'"{match.group(1)}"'), match.end()
        return False if "</tool_call>" in text or len(text) > 512 else None

    def read_tail(self, text):
        match = self._TAIL.match(text)
        if match:
            return (match.end(), "text") if match.end() < len(text) else None  # more whitespace may follow
        return None if "</tool_call>" not in text else (text.index("</tool_call>") + len("</tool_call>"), "text")


class Llama3(ToolFormat):
    name = "llama3"
    markers = ('{"name"', "<|python_tag|>")
    separator = "; "
    _HEAD = re.compile(r'(?:<\|python_tag\|>)?\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*'
                       r'"(?:parameters|arguments)"\s*:\s*(?=\S)')
    _TAIL = re.compile(r"\s*\}(\s*;)?\s*")

    def instructions(self, tools):
        return ("You can call these functions (JSON signatures):\n"
                f"{_signatures(tools)}\n\nTo call a function, answer only with a JSON object of the form "
                '{"name": <function name>, "parameters": <arguments as a JSON object>}; join several calls '
                'with "; ".')

    def render_calls(self, calls):
        return "; ".join(f'{{"name": {json.dumps(c.name)}, "parameters": {c.arguments}}}' for c in calls)

    def render_result(self, name, content):
        return f"Result of {name or 'the call'}: {content}"

    def trigger(self, tool):
        return '{"name": '

    def call_body(self, tool):
        return f'{_lark_text(json.dumps(tool.name) + ", " + chr(34) + "parameters" + chr(34) + ": ")} ' \
               f'{_json_rule(tool.parameters)} "}}"'

    def find_start(self, text):
        found = [at for at in (text.find('{"name"'), text.find("<|python_tag|>")) if at >= 0]
        return min(found) if found else None

    def read_head(self, text):
        match = self._HEAD.match(text)
        if match:
            return json.loads(f'"{match.group(1)}"'), match.end()
        return False if len(text) > 256 else None

    def read_tail(self, text):
        match = self._TAIL.match(text)
        if match is None:
            return (0, "text") if text.strip() else None
        if match.end() == len(text):
            return None  # a "; " or whitespace may still come
        return match.end(), "text"  # the next call starts with its own trigger


class Pythonic(ToolFormat):
    name = "pythonic"
    python_arguments = True
    _HEAD = re.compile(r"\[?\s*([A-Za-z_][\w.\-]*)\(")
    _TAIL = re.compile(r"\)\s*(,|\])\s*")

    def instructions(self, tools):
        return ("You can call these functions (JSON signatures):\n"
                f"{_signatures(tools)}\n\nTo call functions, answer only with a Python list of calls with keyword "
                'arguments, for example [get_weather(city="Paris"), get_time()].')

    def render_calls(self, calls):
        return "[" + ", ".join(f"{c.name}({_python_kwargs(c.arguments)})" for c in calls) + "]"

    def render_result(self, name, content):
        return f"Result of {name or 'the call'}: {content}"

    def trigger(self, tool):
        return f"[{tool.name}("

    def call_body(self, tool):
        """Keyword arguments (required ones first, in the schema's order) and the closing parenthesis; each value
        is JSON under its property's schema (JSON's true / false / null are read as Python's)."""
        properties = tool.parameters.get("properties", {})
        required = [k for k in properties if k in tool.parameters.get("required", [])]
        items = [f"{_lark_text(k + '=')} {_json_rule(properties[k])}" for k in required]
        body = ' ", " '.join(items)
        for k in (k for k in properties if k not in required):
            item = f"{_lark_text(k + '=')} {_json_rule(properties[k])}"
            body = f'{body} (", " {item})?' if body else f"({item})?"
        return f'{body} ")"'

    def grammar(self, tools, required, parallel):
        # `[f(...), g(...)]`: a call after the first is `, name(...)`, and the list closes once.
        base = super().grammar(tools, required, parallel=False).replace("\nstart:", "\nfirst:")
        lines = [base.rstrip("\n")]
        lines += [f'next_{i}: ", " {_lark_text(t.name + "(")} body_{i}' for i, t in enumerate(tools)]
        follow = "(" + " | ".join(f"next_{i}" for i in range(len(tools))) + ")*" if parallel else ""
        if required:
            lines.append(f'start: first {follow} "]"')
        else:  # `first` is `call? TEXT`: the list, if it starts, must close before the text goes on
            lines.append("start: calls | TEXT")
            calls = " | ".join(f"call_{i}" for i in range(len(tools)))
            lines.append(f'calls: ({calls}) {follow} "]" TEXT')
        return "\n".join(lines) + "\n"

    def find_start(self, text):
        match = re.search(r"\[\s*[A-Za-z_][\w.\-]*\(", text)
        return match.start() if match else None

    def held_back(self, text):
        partial = re.search(r"\[\s*[\w.\-]*$", text)  # "[" and a name so far may still become "[name("
        return len(text) - partial.start() if partial else 0

    def read_head(self, text):
        match = self._HEAD.match(text)
        return (match.group(1), match.end()) if match else (False if len(text) > 128 or "(" in text else None)

    def read_tail(self, text):
        match = self._TAIL.match(text)
        if match and match.end() < len(text):  # else more whitespace may follow
            return match.end(), "head" if match.group(1) == "," else "text"
        return None if match or len(text.strip()) < 2 else (len(text), "text")


FORMATS: dict[str, ToolFormat] = {f.name: f for f in (Hermes(), Llama3(), Pythonic())}
FORMATS["qwen25"] = FORMATS["qwen"] = FORMATS["hermes"]  # SGLang's name for the same format


def tool_format(name: str) -> ToolFormat:
    if name not in FORMATS:
        raise ValueError(f"tool call parser {name!r} is not one of {', '.join(sorted(FORMATS))}")
    return FORMATS[name]


class ToolCallStream:
    """A streamed output's text and calls: text until a call may start (a possible start is held back), the
    call's name and id once its head is complete, its arguments as they arrive (pythonic's, as JSON, when the call
    closes), then text or the next call."""

    def __init__(self, fmt: ToolFormat):
        self.format = fmt
        self.calls: list[ToolCall] = []
        self._state = "text"
        self._held = ""
        self._scanner: _ArgumentScanner | None = None
        self._raw = ""  # the current call's arguments as written

    def feed(self, delta: str) -> StreamPiece:
        self._held += delta
        out = StreamPiece()
        while self._held and self._step(out):
            pass
        return out

    def finish(self) -> StreamPiece:
        """The end of the output: held-back text is text; a call cut short keeps the arguments it had."""
        out = StreamPiece()
        if self._state in ("text", "head"):
            out.text = self._held
        elif self._state == "arguments" and self.format.python_arguments:
            self._close(out)
        self._held, self._state = "", "text"
        return out

    def _step(self, out: StreamPiece) -> bool:
        """Advance over the held text; False when it must wait for more."""
        fmt = self.format
        if self._state == "text":
            at = fmt.find_start(self._held)
            if at is None:
                keep = fmt.held_back(self._held)
                out.text += self._held[: len(self._held) - keep]
                self._held = self._held[len(self._held) - keep:]
                return False
            out.text += self._held[:at]
            self._held, self._state = self._held[at:], "head"
            return True
        if self._state == "head":
            head = fmt.read_head(self._held)
            if head is None:
                return False
            if head is False:  # not a call after all: its first character is text; look again after it
                out.text += self._held[0]
                self._held, self._state = self._held[1:], "text"
                return True
            name, end = head
            self.calls.append(ToolCall(name, ""))
            out.calls.append(CallPiece(len(self.calls) - 1, name=name, id=self.calls[-1].id))
            self._held, self._state = self._held[end:], "arguments"
            self._scanner, self._raw = _ArgumentScanner(python=fmt.python_arguments), ""
            return True
        if self._state == "arguments":
            used, done = self._scanner.feed(self._held)
            fragment, self._held = self._held[:used], self._held[used:]
            self._raw += fragment
            if fragment and not fmt.python_arguments:
                self.calls[-1].arguments += fragment
                out.calls.append(CallPiece(len(self.calls) - 1, arguments=fragment))
            if not done:
                return False
            self._close(out)
            self._state = "tail"
            return True
        tail = fmt.read_tail(self._held)  # the state is "tail"
        if tail is None:
            return False
        end, self._state = tail
        self._held = self._held[end:]
        return True

    def _close(self, out: StreamPiece) -> None:
        if self.format.python_arguments:
            self.calls[-1].arguments = _python_kwargs_to_json(self._raw)
            out.calls.append(CallPiece(len(self.calls) - 1, arguments=self.calls[-1].arguments))


class _ArgumentScanner:
    """Finds where a JSON value (or, `python`, a call's keyword arguments, up to its closing parenthesis) ends in
    a stream: strings, escapes and nesting are tracked across pieces."""

    def __init__(self, python: bool = False):
        self.python = python
        self.depth = 0
        self.quote: str | None = None
        self.escaped = False
        self.started = False

    def feed(self, text: str) -> tuple[int, bool]:
        """(how much of `text` belongs to the value, whether the value is complete)."""
        for i, ch in enumerate(text):
            if self.quote:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == self.quote:
                    self.quote = None
                    if self.depth == 0 and not self.python:
                        return i + 1, True  # a string value
                continue
            if ch == '"' or (ch == "'" and self.python):
                self.quote, self.started = ch, True
            elif ch in "{[(":
                self.depth, self.started = self.depth + 1, True
            elif ch in "}])":
                if self.depth == 0:  # the enclosing call's bracket: the value ended before it
                    return i, True
                self.depth -= 1
                if self.depth == 0 and not self.python:
                    return i + 1, True
            elif not self.python and self.depth == 0 and self.started and (ch in ",;" or ch.isspace()):
                return i, True  # a bare scalar ended
            elif not ch.isspace():
                self.started = True
        return len(text), False


def _signatures(tools: list[Tool]) -> str:
    return "\n".join(json.dumps(t.openai()) for t in tools)


def _lark_text(text: str) -> str:
    return json.dumps(text) if text else "''"


def _json_rule(schema: dict) -> str:
    return "%json " + json.dumps({"x-guidance": _JSON_STYLE, **schema})


def _python_kwargs(arguments: str) -> str:
    try:
        values = json.loads(arguments)
    except json.JSONDecodeError:
        return arguments
    return ", ".join(f"{k}={v!r}" for k, v in values.items()) if isinstance(values, dict) else arguments


def _python_kwargs_to_json(raw: str) -> str:
    """`a=1, b="x"` (Python literals, or JSON's true / false / null) as the JSON object {"a": 1, "b": "x"}."""
    try:
        call = ast.parse(f"f({raw})", mode="eval").body
        return json.dumps({kw.arg: _literal(kw.value) for kw in call.keywords})
    except (SyntaxError, ValueError):
        return json.dumps({"_unparsed": raw})


def _literal(node: ast.AST):
    if isinstance(node, ast.Name) and node.id in ("true", "false", "null"):
        return {"true": True, "false": False, "null": None}[node.id]
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values)}
    return ast.literal_eval(node)
