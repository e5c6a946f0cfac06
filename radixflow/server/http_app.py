"""The HTTP app: native SGLang-style API (`/generate`), operations endpoints, and the OpenAI API (openai_api.py).

Every handler validates before anything reaches the scheduler; a bad request is answered 4xx with the field
named and costs nothing else. A client that disconnects aborts its request, which frees its KV.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from radixflow.runtime.request import Req
from radixflow.runtime.request_builder import build_reqs, logprob_options, prompt_batch
from radixflow.runtime.result import ResultCollector
from radixflow.runtime.sampling_params import InvalidRequestError
from radixflow.server.errors import APIError, bad_request
from radixflow.server.metrics import ServerMetrics
from radixflow.server.tokenizer_manager import SchedulerDiedError, TokenizerManager

MAX_BODY_BYTES = 8 * 2**20

logger = logging.getLogger(__name__)


class ServerState:
    def __init__(self, manager: TokenizerManager, served_model_name: str, api_key: str | None):
        self.manager = manager
        self.model_name = served_model_name
        self.api_key = api_key
        self.metrics = ServerMetrics()
        self.started = time.time()

    def build(self, prompt, params, logprob, rid=None) -> list[Req]:
        if not self.manager.alive:  # checked here, before a streamed response has sent its 200
            raise SchedulerDiedError(self.manager.dead_reason or "scheduler process is not running")
        return build_reqs(self.manager.tokenizer, self.manager.eos_ids, self.manager.limits, prompt, params, logprob,
                          rid)

    async def stream(self, req: Req) -> AsyncIterator[tuple[ResultCollector, object]]:
        """(collector, delta) pairs for one request; records metrics as outputs arrive."""
        collector = ResultCollector(req)
        last = None
        async for out in self.manager.submit(req):
            collector.add(out)
            now = time.monotonic()
            if out.token_ids:
                if last is None:
                    self.metrics.ttft.observe(now - collector.start)
                else:
                    self.metrics.itl.observe(now - last)
                last = now
            if out.finished:
                self.metrics.observe_finished(collector.meta())
            yield collector, out

    async def run(self, req: Req) -> ResultCollector:
        collector = None
        async for collector, _ in self.stream(req):
            pass
        reason = collector.last.finish_reason
        if reason and reason.type == "abort" and not self.manager.alive:
            raise SchedulerDiedError(self.manager.dead_reason)  # an error (503), not a truncated success
        return collector


async def read_json(request: Request) -> dict | list:
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise APIError(413, f"request body is {len(body)} bytes; the limit is {MAX_BODY_BYTES}")
    try:
        return json.loads(body)
    except json.JSONDecodeError as exc:
        raise bad_request(f"malformed JSON body: {exc}") from exc


async def until_disconnect(request: Request, work):
    """Run `work`; if the client goes away first, cancel it (its request is aborted on the way out).

    The disconnect is awaited on `receive()`: `request.is_disconnected()` never reports it behind an
    `@app.middleware` (Starlette's BaseHTTPMiddleware), so abandoned requests would run to the end.
    """
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        _cancel(task)
        raise
    finally:
        gone.cancel()
    if not task.done():
        _cancel(task)
        raise APIError(499, "client disconnected")
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":  # the body was read: only this can come
        pass


def _cancel(task: asyncio.Future) -> None:
    task.cancel()
    task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved, so asyncio logs nothing


def sse(payload) -> bytes:
    return f"data: {json.dumps(payload) if not isinstance(payload, str) else payload}\n\n".encode()


def event_stream(events: AsyncIterator[bytes]) -> StreamingResponse:
    """An SSE response. Its 200 is sent before the first event, so a failure after that is sent as an event."""
    async def guarded():
        try:
            async for event in events:
                yield event
        except SchedulerDiedError as exc:
            yield sse({"error": {"message": str(exc), "type": "server_error", "param": None, "code": None}})

    return StreamingResponse(guarded(), media_type="text/event-stream")


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="radixflow", version="0.1.0")
    app.state.server = state

    @app.on_event("startup")
    async def _start():
        await state.manager.start()

    @app.on_event("shutdown")
    async def _stop():
        await state.manager.close()

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if state.api_key and request.url.path != "/health":
            if request.headers.get("authorization", "") != f"Bearer {state.api_key}":
                return APIError(401, "invalid or missing API key (Authorization: Bearer ...)", type_="authentication_error").response()
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > MAX_BODY_BYTES:
            return APIError(413, f"request body is {length} bytes; the limit is {MAX_BODY_BYTES}").response()
        try:
            return await call_next(request)
        except APIError as exc:
            return exc.response()
        except InvalidRequestError as exc:
            return bad_request(str(exc), exc.field).response()
        except SchedulerDiedError as exc:
            return APIError(503, str(exc), type_="server_error").response()
        except Exception as exc:  # noqa: BLE001 - a bug answers 500 in the API's shape and keeps the connection
            logger.exception("internal error on %s %s", request.method, request.url.path)
            return APIError(500, f"internal server error: {type(exc).__name__}: {exc}", type_="server_error").response()

    @app.exception_handler(APIError)
    async def _api_error(_, exc: APIError):
        return exc.response()

    @app.exception_handler(InvalidRequestError)
    async def _invalid(_, exc: InvalidRequestError):
        return bad_request(str(exc), exc.field).response()

    @app.exception_handler(SchedulerDiedError)
    async def _died(_, exc: SchedulerDiedError):
        return APIError(503, str(exc), type_="server_error").response()

    _add_operations(app, state)
    _add_native(app, state)
    from radixflow.server.openai_api import add_openai_routes

    add_openai_routes(app, state)
    return app


def _add_operations(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    async def health():
        if not state.manager.alive:
            return JSONResponse({"status": "error", "message": state.manager.dead_reason or "scheduler down"},
                                status_code=503)
        return {"status": "ok"}

    @app.get("/health_generate")
    async def health_generate():
        req = state.build([state.manager.tokenizer.bos_token_id or 0, 42], {"max_new_tokens": 1}, logprob_options(False, -1, 0))[0]
        await asyncio.wait_for(state.run(req), timeout=60)
        return {"status": "ok"}

    @app.get("/get_model_info")
    async def model_info():
        m = state.manager
        return {"model_path": str(m.source.path), "served_model_name": state.model_name,
                "is_generation": True, "max_context_length": m.limits.max_context, "vocab_size": m.limits.vocab_size,
                "chat_template": m.tokenizer.chat_template, "bos_token": m.tokenizer.bos_token,
                "eos_token": m.tokenizer.eos_token}

    @app.get("/get_server_info")
    async def server_info():
        stats = await state.manager.control("stats")
        config = state.manager.config
        return {"version": "0.1.0", "uptime_s": time.time() - state.started, "stats": stats,
                "model": config.model.__dict__, "cache": config.cache.__dict__, "scheduler": config.scheduler.__dict__,
                "max_total_num_tokens": state.manager.limits.pool_size}

    @app.post("/flush_cache")
    async def flush_cache():
        ok = await state.manager.control("flush_cache")
        if not ok:
            return JSONResponse({"success": False, "message": "requests are running; flush refused"}, status_code=409)
        return {"success": True}

    @app.get("/debug/check_integrity")
    async def check_integrity():
        await state.manager.control("check_integrity")
        return {"ok": True}

    @app.post("/abort_request")
    async def abort_request(request: Request):
        body = await read_json(request)
        rid = body.get("rid") if isinstance(body, dict) else None
        if not isinstance(rid, str):
            raise bad_request("rid: a string request id is required", "rid")
        state.manager.abort_family(rid)
        return {"success": True}

    @app.get("/metrics")
    async def metrics():
        stats = await state.manager.control("stats")
        return Response(state.metrics.render(stats), media_type="text/plain; version=0.0.4")


def _add_native(app: FastAPI, state: ServerState) -> None:
    @app.post("/generate")
    async def generate(request: Request):
        body = await read_json(request)
        if not isinstance(body, dict):
            raise bad_request("body must be a JSON object")
        prompts, batched = _native_prompts(body)
        params = body.get("sampling_params") or {}
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts) or not all(isinstance(p, dict) for p in params_list):
            raise bad_request("sampling_params: an object, or a list with one object per prompt", "sampling_params")
        logprob = logprob_options(body.get("return_logprob", False), body.get("logprob_start_len", -1),
                                  body.get("top_logprobs_num", 0))
        rid = body.get("rid")
        if rid is not None and not isinstance(rid, (str, list)):
            raise bad_request("rid: must be a string (or a list of strings for a batch)", "rid")
        rids = rid if isinstance(rid, list) else [rid] * len(prompts)
        groups = [state.build(p, sp, logprob, r if not batched or isinstance(rid, list) else None)
                  for p, sp, r in zip(prompts, params_list, rids)]
        with_text = bool(body.get("return_text_in_logprobs"))
        if body.get("stream"):
            if batched or len(groups[0]) != 1:
                raise bad_request("stream: streaming takes a single prompt with n=1", "stream")
            return event_stream(_native_stream(state, groups[0][0], with_text))
        reqs = [r for g in groups for r in g]
        collectors = await until_disconnect(request, asyncio.gather(*(state.run(r) for r in reqs)))
        results = [_with_token_text(c.result(), state, with_text) for c in collectors]
        return results if batched or len(results) > 1 else results[0]


def _native_prompts(body: dict) -> tuple[list, bool]:
    return prompt_batch(body.get("text"), body.get("input_ids"), text_field="text")


async def _native_stream(state: ServerState, req: Req, with_text: bool):
    async for collector, _ in state.stream(req):
        yield sse(_with_token_text(collector.result(), state, with_text))  # cumulative, as SGLang streams
    yield sse("[DONE]")


def _with_token_text(result: dict, state: ServerState, with_text: bool) -> dict:
    if not with_text:
        return result
    decode = state.manager.tokenizer.decode
    meta = result["meta_info"]
    for key in ("output_token_logprobs", "input_token_logprobs"):
        if key in meta:
            meta[key] = [(lp, t, decode([t])) for lp, t, _ in meta[key]]
    for key in ("output_top_logprobs", "input_top_logprobs"):
        if key in meta:
            meta[key] = [[(lp, t, decode([t])) for lp, t, _ in row] if row else row for row in meta[key]]
    return result
