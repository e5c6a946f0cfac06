"""The native SGLang-style API (`/generate`, `/abort_request`) and the operations endpoints (health, model and
server info, cache flush, metrics, integrity check).

Every handler validates before anything reaches the scheduler; a bad request is answered 4xx with the field named
and costs nothing else. A client that disconnects aborts its request, which frees its KV.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from radixflow.entrypoints.generate import GenerateInput
from radixflow.runtime.request import Req
from radixflow.server.common import ServerState, event_stream, sse
from radixflow.server.errors import APIError
from radixflow.server.protocol import (
    AbortRequestBody,
    CloseSessionBody,
    FlushCacheRequest,
    GenerateRequest,
    OpenSessionBody,
)


def add_native_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/generate")
    async def generate(body: GenerateRequest, request: Request):
        normalized, reqs = state.prepare(GenerateInput(**body.model_dump()))
        if normalized.stream:
            return event_stream(_native_stream(state, reqs[0]))
        collectors = await state.run_all(request, reqs)
        return normalized.shape([c.result() for c in collectors])

    @app.post("/abort_request")
    async def abort_request(body: AbortRequestBody):
        state.manager.abort_family(body.rid)
        return {"success": True}

    @app.post("/flush_cache")
    async def flush_cache(body: FlushCacheRequest | None = None):
        ok = await state.manager.control("flush_cache")
        if not ok:
            return JSONResponse({"success": False, "message": "requests are running; flush refused"}, status_code=409)
        return {"success": True}

    @app.post("/open_session")
    async def open_session(body: OpenSessionBody | None = None):
        body = body or OpenSessionBody()
        return {"session_id": await state.manager.control("open_session", session_id=body.session_id,
                                                          ttl_s=body.ttl_s)}

    @app.post("/close_session")
    async def close_session(body: CloseSessionBody):
        if not await state.manager.control("close_session", session_id=body.session_id):
            raise APIError(404, f"session_id: no open session {body.session_id!r} (closed already, expired, or "
                                "never opened)", param="session_id")
        return {"success": True}


def add_operations_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    async def health():
        if not state.manager.alive:
            return JSONResponse({"status": "error", "message": state.manager.dead_reason or "scheduler down"},
                                status_code=503)
        return {"status": "ok"}

    @app.get("/health_generate")
    async def health_generate():
        if not state.manager.alive:
            return await health()
        if state.manager.config.disaggregation.disaggregation_mode is not None:
            return {"status": "ok"}  # one phase cannot generate alone: the router checks the pair
        one_token = GenerateInput(input_ids=[state.manager.tokenizer.bos_token_id or 0, 42],
                                  sampling_params={"max_new_tokens": 1})
        _, reqs = state.prepare(one_token)
        await asyncio.wait_for(state.run(reqs[0]), timeout=60)
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
                "disaggregation": config.disaggregation.__dict__,
                "max_total_num_tokens": state.manager.limits.pool_size}

    @app.get("/cache_events")
    async def cache_events(since: int = 0):
        """The radix cache's inserted / evicted prefixes from event `since` on, as text (for a router's
        `--tree-source events`); `lost`: events before the ones given were dropped, start over from these."""
        try:
            log = await state.manager.control("cache_events", since=since)
        except RuntimeError as exc:
            raise APIError(400, str(exc).removeprefix("ValueError: "), "since") from exc
        decode = state.manager.tokenizer.decode
        return {"next": log["next"], "lost": log["lost"],
                "events": [{"op": op, "text": decode(list(tokens))} for op, tokens in log["events"]]}

    @app.get("/debug/check_integrity")
    async def check_integrity():
        await state.manager.control("check_integrity")
        return {"ok": True}

    @app.get("/metrics")
    async def metrics():
        stats = await state.manager.control("stats")
        return Response(state.metrics.render(stats), media_type="text/plain; version=0.0.4")


async def _native_stream(state: ServerState, req: Req):
    async for collector, _ in state.stream(req):
        yield sse(collector.result())  # cumulative, as SGLang streams
    yield sse("[DONE]")
