"""Anthropic-compatible routes: `POST /v1/messages` and `POST /v1/messages/count_tokens` (the Messages API), so
clients of Anthropic's SDK, and radixflow's own `Anthropic` frontend backend, work against a local model.

A body becomes a chat prompt by the model's own template (a final assistant message is a prefill the answer
continues) and runs through the same normaliser as `/generate`. Errors are in Anthropic's shape (errors.py).
`usage.cache_read_input_tokens` is what the radix cache held; `input_tokens` is the rest of the prompt, as
Anthropic counts them.

Structured outputs (`output_config.format`, a JSON schema) constrain the answer's text. Tools: a forced tool
(`tool_choice` `{"type": "tool", "name": ...}`, or `{"type": "any"}` with one tool) is generated under its
`input_schema`, so the call is valid by construction; `none` ignores the tools. Letting the model choose (`auto`)
would need tool_use / tool_result blocks and a tool-call parser on this route: refused with a 400 (the OpenAI route,
/v1/chat/completions, has them).
"""

from __future__ import annotations

import json
import uuid

from fastapi import FastAPI, Request

from radixflow.entrypoints.generate import GenerateInput
from radixflow.entrypoints.result import ResultCollector
from radixflow.runtime.request import Req
from radixflow.server.anthropic_protocol import AnthropicTool, CountTokensBody, MessagesBody
from radixflow.server.common import ServerState, event_stream, render_chat, sse
from radixflow.server.errors import APIError, SchedulerDiedError, as_api_error, bad_request

# The runtime's field names as Anthropic's client knows them, for error messages.
_NAMES = {"max_new_tokens": "max_tokens", "stop": "stop_sequences", "json_schema": "output_config.format.schema",
          "text": "messages"}


def add_anthropic_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/messages")
    async def messages(body: MessagesBody, request: Request):
        state.check_model(body.model)
        tool = _forced_tool(body)
        sampling = {"max_new_tokens": body.max_tokens, "temperature": body.temperature,
                    "top_p": 1.0 if body.top_p is None else body.top_p, "top_k": body.top_k or -1,
                    "stop": body.stop_sequences or []}
        schema = _output_schema(body)
        if tool is not None or schema is not None:
            if tool is not None and schema is not None:
                raise bad_request("output_config.format: give either a forced tool or an output format, not both",
                                  "output_config.format")
            sampling["json_schema"] = tool.input_schema if tool is not None else schema
        _, reqs = state.prepare(GenerateInput(text=_prompt(state, body), sampling_params=sampling,
                                              timeout=body.timeout),
                                text_field="messages", renames=_NAMES)
        message_id = f"msg_{uuid.uuid4().hex[:24]}"
        if body.stream:
            return event_stream(_stream(state, reqs[0], body, tool, message_id), error_event=_error_event)
        [collector] = await state.run_all(request, reqs)
        meta = collector.meta()
        stop_reason, stop_sequence = _stop_reason(meta, body, tool)
        return {**_message_head(state, message_id, meta), "content": _content(collector.text, tool),
                "stop_reason": stop_reason, "stop_sequence": stop_sequence}

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(body: CountTokensBody):
        state.check_model(body.model)
        return {"input_tokens": len(state.manager.tokenizer.encode(_prompt(state, body)))}


def _forced_tool(body: MessagesBody) -> AnthropicTool | None:
    """The tool the answer must call, or None for a text answer."""
    choice = body.tool_choice or {"type": "auto"}
    kind = choice.get("type")
    tools = body.tools or []
    if kind == "none" or (not tools and body.tool_choice is None):
        return None
    if kind == "tool":
        named = [t for t in tools if t.name == choice.get("name")]
        if not named:
            raise bad_request(f"tool_choice.name: {choice.get('name')!r} is not one of the tools "
                              f"({', '.join(t.name for t in tools) or 'none given'})", "tool_choice.name")
        return _checked(named[0], tools.index(named[0]))
    if kind == "any" and len(tools) == 1:
        return _checked(tools[0], 0)
    raise bad_request(f"tool_choice: {kind!r} with {len(tools)} tool(s) needs the model to choose between text and "
                      "tools, which /v1/messages does not support yet (/v1/chat/completions does); force one tool "
                      'with {"type": "tool", "name": ...}', "tool_choice")


def _output_schema(body: MessagesBody) -> dict | None:
    """The JSON schema of `output_config.format` (structured outputs), if any."""
    fmt = (body.output_config or {}).get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise bad_request('output_config.format: must be {"type": "json_schema", "schema": {...}}',
                          "output_config.format")
    return fmt["schema"]


def _checked(tool: AnthropicTool, index: int) -> AnthropicTool:
    if tool.input_schema.get("type") != "object":
        raise bad_request(f"tools.{index}.input_schema.type: must be 'object'", f"tools.{index}.input_schema.type")
    return tool


def _prompt(state: ServerState, body: CountTokensBody) -> str:
    """The body's system prompt and messages as one chat prompt; a final assistant message is continued."""
    messages = []
    if body.system:
        messages.append({"role": "system", "content": _text(body.system, "system")})
    for i, m in enumerate(body.messages):
        messages.append({"role": m.role, "content": _text(m.content, f"messages.{i}.content", state.model_name)})
    return render_chat(state, messages, continue_final=messages[-1]["role"] == "assistant")


def _text(content: str | list[dict], field: str, model: str = "") -> str:
    """The text of a content field: a string or text blocks. Other blocks are refused, naming the block."""
    if isinstance(content, str):
        return content
    texts = []
    for j, block in enumerate(content):
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "image":
            raise bad_request(f"{field}.{j}: image blocks need a model that takes images; {model} takes text only",
                              f"{field}.{j}")
        else:
            raise bad_request(f"{field}.{j}.type: {kind!r} blocks are not supported here (text only)",
                              f"{field}.{j}.type")
    return "".join(texts)


def _message_head(state: ServerState, message_id: str, meta: dict) -> dict:
    cached = meta["cached_tokens"]
    return {"id": message_id, "type": "message", "role": "assistant", "model": state.model_name,
            "usage": {"input_tokens": meta["prompt_tokens"] - cached, "output_tokens": meta["completion_tokens"],
                      "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}}


def _content(text: str, tool: AnthropicTool | None) -> list[dict]:
    if tool is None:
        return [{"type": "text", "text": text}]
    try:
        arguments = json.loads(text)
    except json.JSONDecodeError:  # cut at max_tokens: the schema holds for what was generated, not a whole call
        return [{"type": "text", "text": text}]
    return [{"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": tool.name, "input": arguments}]


def _stop_reason(meta: dict, body: MessagesBody, tool: AnthropicTool | None) -> tuple[str, str | None]:
    reason = meta["finish_reason"] or {}
    if reason.get("type") == "length":
        return "max_tokens", None
    matched = reason.get("matched")
    if isinstance(matched, str) and matched in (body.stop_sequences or []):
        return "stop_sequence", matched
    return ("tool_use" if tool is not None else "end_turn"), None


async def _stream(state: ServerState, req: Req, body: MessagesBody, tool: AnthropicTool | None, message_id: str):
    """Anthropic's event sequence: message_start, content_block_start, ping, content_block_delta..., then
    content_block_stop, message_delta (stop reason, output tokens) and message_stop. message_start waits for the
    first output, so its usage already knows the cache hit."""
    started = False
    collector: ResultCollector | None = None
    async for collector, out in state.stream(req):
        if not started:
            started = True
            head = {**_message_head(state, message_id, collector.meta()), "content": [], "stop_reason": None,
                    "stop_sequence": None}
            head["usage"]["output_tokens"] = 0
            yield _event({"type": "message_start", "message": head})
            block = ({"type": "text", "text": ""} if tool is None else
                     {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": tool.name, "input": {}})
            yield _event({"type": "content_block_start", "index": 0, "content_block": block})
            yield _event({"type": "ping"})
        if out.text:
            delta = ({"type": "text_delta", "text": out.text} if tool is None else
                     {"type": "input_json_delta", "partial_json": out.text})
            yield _event({"type": "content_block_delta", "index": 0, "delta": delta})
    meta = collector.meta()
    reason = meta["finish_reason"] or {}
    if reason.get("type") == "abort":  # the scheduler died, or /abort_request: an error event, not a stop reason
        if not state.manager.alive:
            raise SchedulerDiedError(state.manager.dead_reason or "scheduler process is not running")
        yield _error_event(APIError(500, f"the request was aborted: {reason.get('message') or 'by request'}",
                                    type_="server_error"))
        return
    stop_reason, stop_sequence = _stop_reason(meta, body, tool)
    yield _event({"type": "content_block_stop", "index": 0})
    yield _event({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                  "usage": _message_head(state, message_id, meta)["usage"]})
    yield _event({"type": "message_stop"})


def _event(payload: dict) -> bytes:
    return sse(payload, event=payload["type"])


def _error_event(exc: Exception) -> bytes:
    error: APIError = as_api_error(exc)
    return sse(error.anthropic_body(), event="error")
