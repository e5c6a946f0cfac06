"""Anthropic-compatible routes: `POST /v1/messages` and `POST /v1/messages/count_tokens` (the Messages API), so
clients of Anthropic's SDK, and radixflow's own `Anthropic` frontend backend, work against a local model.

A body becomes a `ChatRequest` (chat_tools.py, as the OpenAI route's does): text blocks, earlier `tool_use` blocks
and `tool_result` blocks, the tools and `tool_choice`; the model's own template renders it (a final assistant
message is a prefill the answer continues) and it runs through the same normaliser as `/generate`. Tool use is
the OpenAI route's: `auto` lets the model write text or start a call that must then be valid, `any` / a named
`tool` make the answer calls only, valid by construction; the answer's calls come back as `tool_use` blocks. With
`--reasoning-parser`, a reasoning model's thinking comes back as a `thinking` block (unsigned: `signature` "").
Structured outputs (`output_config.format`, a JSON schema) constrain the answer's text. Errors are in Anthropic's
shape (errors.py). `usage.cache_read_input_tokens` is what the radix cache held; `input_tokens` is the rest of the
prompt, as Anthropic counts them.
"""

from __future__ import annotations

import json
import uuid

from fastapi import FastAPI, Request

from radixflow.entrypoints.generate import GenerateInput
from radixflow.entrypoints.result import ResultCollector
from radixflow.parsers.tool_calls import ToolCall
from radixflow.runtime.request import Req
from radixflow.server.anthropic_protocol import CountTokensBody, MessagesBody
from radixflow.server.chat_tools import (
    ChatDelta,
    ChatPlan,
    ChatReader,
    ChatRequest,
    check_unique,
    checked_tool,
    plan_chat,
)
from radixflow.server.common import ServerState, event_stream, render_chat, sse
from radixflow.server.errors import APIError, SchedulerDiedError, as_api_error, bad_request

# The runtime's field names as Anthropic's client knows them, for error messages.
_NAMES = {"max_new_tokens": "max_tokens", "stop": "stop_sequences", "json_schema": "output_config.format.schema",
          "text": "messages"}


def add_anthropic_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/messages")
    async def messages(body: MessagesBody, request: Request):
        state.check_model(body.model)
        schema = _output_schema(body)
        plan, prompt = _plan(state, body, schema)
        sampling = {"max_new_tokens": body.max_tokens, "temperature": body.temperature,
                    "top_p": 1.0 if body.top_p is None else body.top_p, "top_k": body.top_k or -1,
                    "stop": body.stop_sequences or []}
        if plan.grammar is not None:  # tools, or an answer after a thinking block
            sampling["ebnf"] = plan.grammar
        elif schema is not None:
            sampling["json_schema"] = schema
        _, reqs = state.prepare(GenerateInput(text=prompt, sampling_params=sampling, timeout=body.timeout,
                                              **body.bootstrap()),
                                text_field="messages", renames=_NAMES)
        message_id = f"msg_{uuid.uuid4().hex[:24]}"
        if body.stream:
            return event_stream(_stream(state, reqs[0], body, plan, message_id), error_event=_error_event)
        [collector] = await state.run_all(request, reqs)
        meta = collector.meta()
        reader = ChatReader(plan)
        read = reader.read(collector.text)
        content = [_tool_use(call) for call in reader.calls]
        if read.content or not (content or read.reasoning):  # an empty answer still has its (empty) text block
            content.insert(0, {"type": "text", "text": read.content})
        if read.reasoning:
            content.insert(0, {"type": "thinking", "thinking": read.reasoning, "signature": ""})
        stop_reason, stop_sequence = _stop_reason(meta, body, reader)
        return {**_message_head(state, message_id, meta), "content": content, "stop_reason": stop_reason,
                "stop_sequence": stop_sequence}

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(body: CountTokensBody):
        state.check_model(body.model)
        _, prompt = _plan(state, body, None)
        return {"input_tokens": len(state.manager.tokenizer.encode(prompt))}


def _plan(state: ServerState, body: CountTokensBody, schema: dict | None) -> tuple[ChatPlan, str]:
    """The body as a planned chat request (`schema`: its output format's), and its prompt."""
    messages = []
    if body.system:
        messages.append({"role": "system", "content": _text(body.system, "system", state.model_name)})
    for i, m in enumerate(body.messages):
        messages += _messages(m.role, m.content, i, state.model_name)
    tools = [checked_tool(t.name, t.description, t.input_schema, f"tools.{i}.input_schema")
             for i, t in enumerate(body.tools or [])]
    check_unique(tools, lambda i: f"tools.{i}.name")
    choice, parallel = _tool_choice(getattr(body, "tool_choice", None), tools)
    request = ChatRequest(messages, tools, choice, parallel, {"json_schema": schema} if schema else {},
                          "output_config.format")
    config = state.config
    plan = plan_chat(request, state.manager.tokenizer.chat_template, config.tool_call_parser,
                     config.reasoning_parser)
    prefill = bool(body.messages) and body.messages[-1].role == "assistant"
    return plan, render_chat(state, plan.messages, continue_final=prefill, tools=plan.template_tools)


def _messages(role: str, content: str | list[dict], i: int, model: str) -> list[dict]:
    """One Anthropic message as `ChatRequest` messages: its tool results (a user turn's, each one a "tool"
    message, first, as Anthropic puts them), then its text and (an assistant's) calls."""
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    texts, calls, results = [], [], []
    for j, block in enumerate(content):
        field_name = f"messages.{i}.content.{j}"
        match block.get("type"), role:
            case "text", _ if isinstance(block.get("text"), str):
                texts.append(block["text"])
            case "tool_use", "assistant":
                calls.append(ToolCall(str(block.get("name", "")), json.dumps(block.get("input", {})),
                                      id=str(block.get("id", f"toolu_{i}_{j}"))))
            case "tool_result", "user":
                results.append({"role": "tool", "content": _text(block.get("content") or "", field_name, model),
                                "answers": block.get("tool_use_id"), "field": f"{field_name}.tool_use_id"})
            case "image", _:
                raise _no_images(field_name, model)
            case kind, _:
                raise bad_request(f"{field_name}.type: {kind!r} blocks are not supported in a {role} message here",
                                  f"{field_name}.type")
    out = list(results)
    if texts or calls or not results:
        out.append({"role": role, "content": "".join(texts), **({"calls": calls} if calls else {})})
    return out


def _text(content: str | list[dict], field: str, model: str) -> str:
    """The text of a content field (a system prompt, a tool result): a string or text blocks."""
    if isinstance(content, str):
        return content
    texts = []
    for j, block in enumerate(content):
        if block.get("type") == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif block.get("type") == "image":
            raise _no_images(f"{field}.{j}", model)
        else:
            raise bad_request(f"{field}.{j}.type: {block.get('type')!r} blocks are not supported here (text only)",
                              f"{field}.{j}.type")
    return "".join(texts)


def _no_images(field_name: str, model: str) -> APIError:
    return bad_request(f"{field_name}: image blocks need a model that takes images; {model} takes text only",
                       field_name)


def _tool_choice(choice: dict | None, tools: list) -> tuple[str, bool]:
    """Anthropic's `tool_choice` as `ChatRequest` takes it (a mode, or the tool to call), and whether calls may be
    parallel (`disable_parallel_tool_use`)."""
    choice = choice or {"type": "auto" if tools else "none"}
    kind, parallel = choice.get("type"), not choice.get("disable_parallel_tool_use", False)
    if kind == "tool":
        if choice.get("name") not in {t.name for t in tools}:
            raise bad_request(f"tool_choice.name: {choice.get('name')!r} is not one of the tools "
                              f"({', '.join(t.name for t in tools) or 'none given'})", "tool_choice.name")
        return choice["name"], parallel
    modes = {"auto": "auto", "any": "required", "none": "none"}
    if kind not in modes:
        raise bad_request(f"tool_choice.type: must be auto, any, tool or none; got {kind!r}", "tool_choice.type")
    if kind != "none" and not tools:
        raise bad_request(f"tool_choice: {kind!r} needs tools", "tool_choice")
    return modes[kind], parallel


def _output_schema(body: MessagesBody) -> dict | None:
    """The JSON schema of `output_config.format` (structured outputs), if any."""
    fmt = (body.output_config or {}).get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise bad_request('output_config.format: must be {"type": "json_schema", "schema": {...}}',
                          "output_config.format")
    return fmt["schema"]


def _message_head(state: ServerState, message_id: str, meta: dict) -> dict:
    cached = meta["cached_tokens"]
    return {"id": message_id, "type": "message", "role": "assistant", "model": state.model_name,
            "usage": {"input_tokens": meta["prompt_tokens"] - cached, "output_tokens": meta["completion_tokens"],
                      "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}}


def _tool_use(call: ToolCall) -> dict:
    try:
        arguments = json.loads(call.arguments)
    except json.JSONDecodeError:  # cut at max_tokens (the stop reason says so): what parses of it is nothing
        arguments = {}
    return {"type": "tool_use", "id": _tool_use_id(call.id), "name": call.name, "input": arguments}


def _tool_use_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


def _stop_reason(meta: dict, body: MessagesBody, reader: ChatReader) -> tuple[str, str | None]:
    reason = meta["finish_reason"] or {}
    if reason.get("type") == "length":
        return "max_tokens", None
    matched = reason.get("matched")
    if isinstance(matched, str) and matched in (body.stop_sequences or []):
        return "stop_sequence", matched
    return ("tool_use" if reader.calls else "end_turn"), None


async def _stream(state: ServerState, req: Req, body: MessagesBody, plan: ChatPlan, message_id: str):
    """Anthropic's event sequence: message_start, ping, then each content block (content_block_start, its
    deltas, content_block_stop): text as `text_delta`, a call as a `tool_use` block whose input streams as
    `input_json_delta`; then message_delta (stop reason, usage) and message_stop. message_start waits for the first
    output, so its usage already knows the cache hit."""
    reader, blocks = ChatReader(plan), _Blocks()
    collector: ResultCollector | None = None
    async for collector, out in state.stream(req):
        if not blocks.started:
            head = {**_message_head(state, message_id, collector.meta()), "content": [], "stop_reason": None,
                    "stop_sequence": None}
            head["usage"]["output_tokens"] = 0
            yield _event({"type": "message_start", "message": head})
            yield _event({"type": "ping"})
            blocks.started = True
        for event in blocks.events(reader.feed(out.text)):
            yield event
    meta = collector.meta()
    reason = meta["finish_reason"] or {}
    if reason.get("type") == "abort":  # the scheduler died, or /abort_request: an error event, not a stop reason
        if not state.manager.alive:
            raise SchedulerDiedError(state.manager.dead_reason or "scheduler process is not running")
        yield _error_event(APIError(500, f"the request was aborted: {reason.get('message') or 'by request'}",
                                    type_="server_error"))
        return
    for event in blocks.events(reader.finish(), last=True):
        yield event
    stop_reason, stop_sequence = _stop_reason(meta, body, reader)
    yield _event({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                  "usage": _message_head(state, message_id, meta)["usage"]})
    yield _event({"type": "message_stop"})


class _Blocks:
    """The content blocks of a streamed answer: opened as text or calls appear, each closed when the next opens."""

    def __init__(self):
        self.started = False
        self.index = -1  # the open block's index
        self.kind: str | None = None  # "text" or the open call's index
        self.calls: dict[int, int] = {}  # call index -> block index

    def events(self, delta: ChatDelta, last: bool = False) -> list[bytes]:
        out = []
        thinking = delta.reasoning if self.kind == "thinking" else delta.reasoning.lstrip()
        if thinking:  # a reasoning model's thinking (--reasoning-parser), before the answer; from its first word
            if self.kind != "thinking":
                out += self._open({"type": "thinking", "thinking": "", "signature": ""}, "thinking")
            out.append(_event({"type": "content_block_delta", "index": self.index,
                               "delta": {"type": "thinking_delta", "thinking": thinking}}))
        if delta.content:
            if self.kind != "text":
                out += self._open({"type": "text", "text": ""}, "text")
            out.append(_event({"type": "content_block_delta", "index": self.index,
                               "delta": {"type": "text_delta", "text": delta.content}}))
        for piece in delta.calls:
            if piece.name is not None:
                out += self._open({"type": "tool_use", "id": _tool_use_id(piece.id), "name": piece.name,
                                   "input": {}}, piece.index)
                self.calls[piece.index] = self.index
            if piece.arguments:
                out.append(_event({"type": "content_block_delta", "index": self.calls[piece.index],
                                   "delta": {"type": "input_json_delta", "partial_json": piece.arguments}}))
        if last:
            if self.index < 0:  # an empty answer still has its (empty) text block
                out += self._open({"type": "text", "text": ""}, "text")
            out.append(_event({"type": "content_block_stop", "index": self.index}))
        return out

    def _open(self, block: dict, kind) -> list[bytes]:
        out = [_event({"type": "content_block_stop", "index": self.index})] if self.index >= 0 else []
        self.index += 1
        self.kind = kind
        return [*out, _event({"type": "content_block_start", "index": self.index, "content_block": block})]


def _event(payload: dict) -> bytes:
    return sse(payload, event=payload["type"])


def _error_event(exc: Exception) -> bytes:
    error: APIError = as_api_error(exc)
    return sse(error.anthropic_body(), event="error")
