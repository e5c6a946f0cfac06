"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions.

Each body (openai_protocol.py) is converted to the native request (`GenerateInput`) and runs through the same
normaliser as `/generate`; errors name the field as the OpenAI client spelled it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid

from fastapi import FastAPI, Request

from radixflow.entrypoints.generate import GenerateInput
from radixflow.parsers.tool_calls import Tool, ToolCall
from radixflow.runtime.constrained.spec import CONSTRAINT_FIELDS, json_object_schema
from radixflow.runtime.request import Req
from radixflow.server.chat_tools import (
    ChatDelta,
    ChatPlan,
    ChatReader,
    ChatRequest,
    call_deltas,
    calls_json,
    check_unique,
    checked_tool,
    plan_chat,
)
from radixflow.server.common import ServerState, event_stream, render_chat, sse
from radixflow.server.errors import bad_request
from radixflow.server.openai_protocol import ChatBody, CompletionBody, SamplingBody

# The runtime's field names as the OpenAI client knows them, for error messages.
_COMPLETION_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "input_ids": "prompt",
                     "json_schema": "response_format"}


def _response_format(body: SamplingBody) -> dict:
    """Sampling params for the body's structured-output request: `json_object` is any JSON object,
    `json_schema` carries `{"name", "schema", "strict"}` as in OpenAI's API."""
    fmt = body.response_format
    out = {k: v for k, v in (("regex", body.regex), ("ebnf", body.ebnf)) if v is not None}
    if fmt is None or fmt.get("type") == "text":
        return out
    kind = fmt.get("type")
    if kind == "json_object":
        return {**out, "json_schema": json_object_schema()}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise bad_request("response_format.json_schema.schema: required, a JSON schema object",
                              "response_format.json_schema.schema")
        return {**out, "json_schema": schema}
    raise bad_request(f"response_format.type: must be one of text, json_object, json_schema; got {kind!r}",
                      "response_format.type")


def _sampling(body: SamplingBody, max_tokens: int) -> dict:
    stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    return {**_response_format(body), "max_new_tokens": max_tokens, "temperature": body.temperature,
            "top_p": body.top_p, "top_k": body.top_k, "min_p": body.min_p, "presence_penalty": body.presence_penalty,
            "frequency_penalty": body.frequency_penalty, "repetition_penalty": body.repetition_penalty,
            "min_new_tokens": body.min_tokens, "ignore_eos": body.ignore_eos, "stop": stop,
            "stop_token_ids": body.stop_token_ids or [], "seed": body.seed}


def _finish_reason(meta: dict) -> str | None:
    reason = meta.get("finish_reason")
    return reason["type"] if reason else None


def _usage(metas: list[dict], prompt_metas: list[dict]) -> dict:
    prompt = sum(m["prompt_tokens"] for m in prompt_metas)
    completion = sum(m["completion_tokens"] for m in metas)
    cached = sum(m["cached_tokens"] for m in prompt_metas)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def add_openai_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": int(state.started),
                                             "owned_by": "radixflow"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        state.check_model(body.model)
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        echo_logprobs = body.echo and body.logprobs is not None
        _, reqs = state.prepare(GenerateInput(
            **_completion_prompts(body.prompt), sampling_params={**_sampling(body, max_tokens), "n": body.n},
            return_logprob=body.logprobs is not None, logprob_start_len=0 if echo_logprobs else -1,
            top_logprobs_num=body.logprobs or 0, timeout=body.timeout, priority=body.priority,
            session_id=body.session_id, **body.bootstrap()), text_field="prompt", renames=_COMPLETION_NAMES)
        rid = f"cmpl-{uuid.uuid4().hex}"
        if body.stream:
            return event_stream(_stream_completion(state, reqs, body, rid))
        collectors = await state.run_all(request, reqs)
        choices = [_completion_choice(i, c, state, body) for i, c in enumerate(collectors)]
        metas = [c.meta() for c in collectors]
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": state.model_name,
                "choices": choices, "usage": _usage(metas, metas[:: body.n])}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request):
        state.check_model(body.model)
        plan = chat_plan(state, body)
        prompt = render_chat(state, plan.messages, continue_final=body.continue_final_message,
                             tools=plan.template_tools)
        max_name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens is None:
            # Whatever fits: one request can use neither more than the context nor more than the KV pool.
            limits = state.manager.limits
            room = min(limits.max_context, limits.pool_size) - len(state.manager.tokenizer.encode(prompt))
            max_tokens = min(max(room, 1), 4096)
        sampling = _sampling(body, max_tokens)
        if plan.grammar is not None:  # tools, or an answer after a thinking block: the plan's grammar
            sampling = {**{k: v for k, v in sampling.items() if k not in CONSTRAINT_FIELDS}, "ebnf": plan.grammar}
        _, reqs = state.prepare(GenerateInput(
            text=prompt, sampling_params={**sampling, "n": body.n}, return_logprob=body.logprobs,
            top_logprobs_num=body.top_logprobs or 0 if body.logprobs else 0, timeout=body.timeout,
            priority=body.priority, session_id=body.session_id, **body.bootstrap()), text_field="prompt",
            renames={**_COMPLETION_NAMES, "max_new_tokens": max_name})
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            return event_stream(_stream_chat(state, reqs, body, plan, rid))
        collectors = await state.run_all(request, reqs)
        choices = []
        for i, c in enumerate(collectors):
            meta = c.meta()
            reader = ChatReader(plan)
            read = reader.read(c.text)
            message = {"role": "assistant", "content": read.content}
            if plan.reasoning is not None:
                message["reasoning_content"] = read.reasoning
            if reader.calls:
                message |= {"content": read.content if read.content.strip() else None,
                            "tool_calls": calls_json(reader.calls)}
            choice = {"index": i, "message": message, "finish_reason": _chat_finish(meta, reader),
                      "logprobs": None}
            if body.logprobs:
                choice["logprobs"] = {"content": _chat_logprobs(state, c.ids, c.out_lps)}
            choices.append(choice)
        metas = [c.meta() for c in collectors]
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": state.model_name,
                "choices": choices, "usage": _usage(metas, metas[:1])}


def _chat_finish(meta: dict, reader: ChatReader) -> str | None:
    reason = _finish_reason(meta)
    return "tool_calls" if reason == "stop" and reader.calls else reason


def _completion_prompts(prompt) -> dict:
    """OpenAI's `prompt` (a string, strings, token ids or lists of them) as the native `text` or `input_ids`."""
    if isinstance(prompt, str) or (prompt and all(isinstance(p, str) for p in prompt)):
        return {"text": prompt}
    if not prompt:
        raise bad_request("prompt: must not be empty", "prompt")
    return {"input_ids": prompt}


def chat_plan(state: ServerState, body: ChatBody) -> ChatPlan:
    """The body as a `ChatRequest` (text messages, earlier calls and results, checked tools), planned."""
    messages = []
    for i, m in enumerate(body.messages):
        content = m.content
        if isinstance(content, list):
            texts = [part.get("text") for part in content if part.get("type") == "text"]
            if len(texts) != len(content):
                raise bad_request(f"messages.{i}.content: only text parts are supported", f"messages.{i}.content")
            content = "".join(t or "" for t in texts)
        message = {"role": "system" if m.role == "developer" else m.role, "content": content or ""}
        if m.role == "assistant" and m.tool_calls:
            message["calls"] = [_earlier_call(i, j, call) for j, call in enumerate(m.tool_calls)]
        if m.role == "tool":
            message |= {"answers": m.tool_call_id, "field": f"messages.{i}.tool_call_id"}
        messages.append(message)
    if body.continue_final_message and messages[-1]["role"] != "assistant":
        raise bad_request("continue_final_message: the last message must be the assistant's to continue",
                          "continue_final_message")
    tools = [checked_tool(t.function.name, t.function.description, t.function.parameters,
                          f"tools.{i}.function.parameters") for i, t in enumerate(body.tools or [])]
    check_unique(tools, lambda i: f"tools.{i}.function.name")
    request = ChatRequest(messages, tools, _tool_choice(body, tools), body.parallel_tool_calls,
                          _response_format(body))
    config = state.config
    return plan_chat(request, state.manager.tokenizer.chat_template, config.tool_call_parser,
                     config.reasoning_parser)


def _tool_choice(body: ChatBody, tools: list[Tool]) -> str:
    """OpenAI's `tool_choice` as `ChatRequest` takes it: a mode, or the name of the function to call."""
    choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if choice.get("type") != "function" or name not in {t.name for t in tools}:
            raise bad_request(f"tool_choice: {name!r} is not one of the tools "
                              f"({', '.join(t.name for t in tools) or 'none given'})", "tool_choice")
        return name
    if choice != "none" and not tools:
        raise bad_request(f"tool_choice: {choice!r} needs tools", "tool_choice")
    return choice


def _earlier_call(i: int, j: int, call: dict) -> ToolCall:
    field_name = f"messages.{i}.tool_calls.{j}"
    fn = call.get("function") or {}
    if not isinstance(fn.get("name"), str):
        raise bad_request(f"{field_name}.function.name: required", f"{field_name}.function.name")
    arguments = fn.get("arguments", "{}")
    # Kept as sent: a call cut at max_tokens has unfinished arguments, and OpenAI takes it back as it is.
    return ToolCall(fn["name"], arguments if isinstance(arguments, str) else json.dumps(arguments),
                    id=call.get("id") or f"call_{i}_{j}")


def _completion_choice(index: int, collector, state: ServerState, body: CompletionBody) -> dict:
    meta = collector.meta()
    text = collector.text
    if body.echo:
        text = state.manager.tokenizer.decode(list(collector.req.prompt_ids)) + text
    logprobs = None
    if body.logprobs is not None:
        decode = state.manager.tokenizer.decode
        entries = (meta.get("input_token_logprobs", []) if body.echo else []) + meta["output_token_logprobs"]
        tops = (meta.get("input_top_logprobs", []) if body.echo else []) + meta["output_top_logprobs"]
        tokens = [decode([t]) for _, t, _ in entries]
        offsets = list(itertools.accumulate((len(t) for t in tokens[:-1]), initial=0)) if tokens else []
        logprobs = {"tokens": tokens, "token_logprobs": [lp for lp, _, _ in entries],
                    "top_logprobs": [{decode([t]): lp for lp, t, _ in row} if row else None for row in tops],
                    "text_offset": offsets}
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": _finish_reason(meta)}


def _chat_logprobs(state: ServerState, token_ids: list[int], logprobs) -> list[dict]:
    """OpenAI chat `logprobs.content` for tokens and their `TokenLogprobs`."""
    decode = state.manager.tokenizer.decode
    out = []
    for t, lp in zip(token_ids, logprobs):
        token = decode([t])
        out.append({"token": token, "logprob": lp.logprob, "bytes": list(token.encode()),
                    "top_logprobs": [{"token": decode([i]), "logprob": v, "bytes": list(decode([i]).encode())}
                                     for i, v in lp.top]})
    return out


async def _merged(state: ServerState, reqs: list[Req]):
    """(index, collector, delta) from several requests as they come."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, req):
        try:
            async for collector, out in state.stream(req):
                await queue.put((i, collector, out))
        finally:
            await queue.put((i, None, None))

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(reqs)]
    remaining = len(reqs)
    try:
        while remaining:
            i, collector, out = await queue.get()
            if collector is None:
                remaining -= 1
                continue
            yield i, collector, out
    finally:
        for task in tasks:
            task.cancel()  # the client went away: each request is aborted as its stream closes


async def _stream_completion(state: ServerState, reqs: list[Req], body: CompletionBody, rid: str):
    created = int(time.time())
    metas: dict[int, dict] = {}
    async for i, collector, out in _merged(state, reqs):
        meta = collector.meta() if out.finished else None
        chunk = {"id": rid, "object": "text_completion", "created": created, "model": state.model_name,
                 "choices": [{"index": i, "text": out.text, "logprobs": None,
                              "finish_reason": _finish_reason(meta) if meta else None}]}
        if meta:
            metas[i] = meta
        yield sse(chunk)
    if body.stream_options and body.stream_options.get("include_usage"):
        ordered = [metas[i] for i in sorted(metas)]
        yield sse({"id": rid, "object": "text_completion", "created": created, "model": state.model_name,
                   "choices": [], "usage": _usage(ordered, ordered[:: body.n])})
    yield sse("[DONE]")


async def _stream_chat(state: ServerState, reqs: list[Req], body: ChatBody, plan: ChatPlan, rid: str):
    created = int(time.time())
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.model_name}
    readers = [ChatReader(plan) for _ in reqs]
    metas: dict[int, dict] = {}
    opened: set[int] = set()
    async for i, collector, out in _merged(state, reqs):
        if i not in opened:  # at its first output, so a request that fails before it fails the stream's first event
            opened.add(i)
            yield sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                            "finish_reason": None}]})
        # The full meta (cumulative logprob lists) is built once, at the end: per token it would be O(n) each.
        meta = collector.meta() if out.finished else None
        read = readers[i].feed(out.text)
        if out.finished:
            end = readers[i].finish()
            read = ChatDelta(read.reasoning + end.reasoning, read.content + end.content, read.calls + end.calls)
        delta = {}
        if read.reasoning:
            delta["reasoning_content"] = read.reasoning
        if read.content:
            delta["content"] = read.content
        if read.calls:
            delta["tool_calls"] = call_deltas(read.calls)
        choice = {"index": i, "delta": delta, "finish_reason": _chat_finish(meta, readers[i]) if meta else None}
        if body.logprobs and out.output_logprobs:
            choice["logprobs"] = {"content": _chat_logprobs(state, out.token_ids, out.output_logprobs)}
        if meta:
            metas[i] = meta
        if delta or out.finished:
            yield sse({**base, "choices": [choice]})
    if body.stream_options and body.stream_options.get("include_usage"):
        ordered = [metas[i] for i in sorted(metas)]
        yield sse({**base, "choices": [], "usage": _usage(ordered, ordered[:1])})
    yield sse("[DONE]")
