"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions.

Request bodies are pydantic models; a validation error becomes a 400 in OpenAI's error shape with `param` set to
the offending field. Unknown fields are ignored, as OpenAI's own server does for forward compatibility.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from radixflow.runtime.constrained.spec import json_object_schema
from radixflow.runtime.request import Req
from radixflow.runtime.request_builder import logprob_options
from radixflow.runtime.sampling_params import InvalidRequestError
from radixflow.server.errors import APIError, bad_request
from radixflow.server.http_app import ServerState, event_stream, read_json, sse, until_disconnect


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    seed: int | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    # Extensions SGLang also accepts.
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    # Structured output: OpenAI's response_format, plus SGLang's regex / ebnf extensions.
    response_format: dict | None = None
    regex: str | None = None
    ebnf: str | None = None


class CompletionBody(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list | None = None


def _parse(model_cls, body):
    try:
        return model_cls.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if not _is_union_member(p)) or None
        raise bad_request(f"{param or 'body'}: {first['msg']}", param) from exc


def _is_union_member(part) -> bool:
    # pydantic names the union member it tried in the location (`stop.list[str].0`); clients know only fields.
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part)


def _build(state: ServerState, prompt, params: dict, logprob, renames: dict[str, str]) -> list[Req]:
    """`state.build`, with the runtime's parameter names in its errors replaced by the ones this client sent."""
    try:
        return state.build(prompt, params, logprob)
    except InvalidRequestError as exc:
        message, field = str(exc), renames.get(exc.field, exc.field)
        for runtime_name, api_name in renames.items():
            message = message.replace(runtime_name, api_name)
        raise bad_request(message, field) from exc


def _response_format(body: _Body) -> dict:
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


def _sampling(body: _Body, max_tokens: int) -> dict:
    stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    return {**_response_format(body), "max_new_tokens": max_tokens, "temperature": body.temperature, "top_p": body.top_p,
            "top_k": body.top_k, "min_p": body.min_p, "presence_penalty": body.presence_penalty,
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
    def check_model(name: str) -> None:
        if name != state.model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {state.model_name!r}",
                           "model", code="model_not_found")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": int(state.started),
                                             "owned_by": "radixflow"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = _parse(CompletionBody, await read_json(request))
        check_model(body.model)
        prompts = _completion_prompts(body.prompt)
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        top = body.logprobs or 0
        logprob = logprob_options(body.logprobs is not None, 0 if body.echo and body.logprobs is not None else -1, top)
        params = {**_sampling(body, max_tokens), "n": body.n}
        renames = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "input_ids": "prompt",
                   "json_schema": "response_format"}
        groups = [_build(state, p, params, logprob, renames) for p in prompts]
        reqs = [r for g in groups for r in g]
        rid = f"cmpl-{uuid.uuid4().hex}"
        if body.stream:
            return event_stream(_stream_completion(state, reqs, body, rid))
        collectors = await until_disconnect(request, asyncio.gather(*(state.run(r) for r in reqs)))
        choices = [_completion_choice(i, c, state, body) for i, c in enumerate(collectors)]
        metas = [c.meta() for c in collectors]
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": state.model_name,
                "choices": choices, "usage": _usage(metas, metas[:: body.n])}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = _parse(ChatBody, await read_json(request))
        check_model(body.model)
        if body.tools:
            raise bad_request("tools: tool calling is not supported by this server yet", "tools")
        prompt = _chat_prompt(state, body.messages)
        max_name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens is None:
            # Whatever fits: one request can use neither more than the context nor more than the KV pool.
            limits = state.manager.limits
            room = min(limits.max_context, limits.pool_size) - len(state.manager.tokenizer.encode(prompt))
            max_tokens = min(max(room, 1), 4096)
        logprob = logprob_options(body.logprobs, -1, body.top_logprobs or 0 if body.logprobs else 0)
        reqs = _build(state, prompt, {**_sampling(body, max_tokens), "n": body.n}, logprob,
                      {"max_new_tokens": max_name, "min_new_tokens": "min_tokens", "json_schema": "response_format"})
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            return event_stream(_stream_chat(state, reqs, body, rid))
        collectors = await until_disconnect(request, asyncio.gather(*(state.run(r) for r in reqs)))
        choices = []
        for i, c in enumerate(collectors):
            meta = c.meta()
            choice = {"index": i, "message": {"role": "assistant", "content": c.text},
                      "finish_reason": _finish_reason(meta), "logprobs": None}
            if body.logprobs:
                choice["logprobs"] = {"content": _chat_logprobs(state, c.ids, c.out_lps)}
            choices.append(choice)
        metas = [c.meta() for c in collectors]
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": state.model_name,
                "choices": choices, "usage": _usage(metas, metas[:1])}


def _completion_prompts(prompt) -> list:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise bad_request("prompt: must not be empty", "prompt")
    if all(isinstance(p, int) for p in prompt):
        return [prompt]
    return list(prompt)


def _chat_prompt(state: ServerState, messages: list[ChatMessage]) -> str:
    converted = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            texts = [part.get("text") for part in content if part.get("type") == "text"]
            if len(texts) != len(content):
                raise bad_request(f"messages.{i}.content: only text parts are supported", f"messages.{i}.content")
            content = "".join(t or "" for t in texts)
        converted.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})
    try:
        return state.manager.tokenizer.apply_chat_template(converted, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # jinja raises for templates that refuse a role order
        raise bad_request(f"messages: the chat template rejected them ({exc})", "messages") from exc


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
        logprobs = {"tokens": [decode([t]) for _, t, _ in entries], "token_logprobs": [lp for lp, _, _ in entries],
                    "top_logprobs": [{decode([t]): lp for lp, t, _ in row} if row else None for row in tops],
                    "text_offset": []}
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


async def _stream_chat(state: ServerState, reqs: list[Req], body: ChatBody, rid: str):
    created = int(time.time())
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.model_name}
    for i in range(len(reqs)):
        yield sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None}]})
    metas: dict[int, dict] = {}
    async for i, collector, out in _merged(state, reqs):
        # The full meta (cumulative logprob lists) is built once, at the end: per token it would be O(n) each.
        meta = collector.meta() if out.finished else None
        delta = {"content": out.text} if out.text else {}
        choice = {"index": i, "delta": delta, "finish_reason": _finish_reason(meta) if meta else None}
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
