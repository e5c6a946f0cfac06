"""Prefill/decode disaggregation behind the router (`radixflow router --pd-disaggregation --prefill URL [PORT]
--decode URL`), as Splitwise and DistServe split a request's two phases and SGLang's router pairs them.

A request goes to a pair: a prefill server chosen by the routing policy (cache-aware by default, so the next turn
of a conversation goes where its prefix is cached) and a decode server chosen by load (fewest requests in
flight). The router draws a `bootstrap_room` and sends the request, with the prefill server's bootstrap address
and that room, to both at once. The prefill server computes the prompt and the first token and sends the KV;
the decode server receives it and generates; the client gets the decode server's answer, streamed or not. The
prefill server's own answer (its one token) only tells the router whether the prefill failed.

Retries, while nothing has reached the client: a server that refuses the connection or answers 503, and a decode
server whose KV never came (503 "KV transfer failed: ...", or a stream whose first event says so), put the
request on another pair, without the server that failed; the router closes both connections of the failed
attempt, and both servers drop their part. A prefill server's 4xx is the client's error and is relayed.
"""

from __future__ import annotations

import asyncio
import json
import random
from urllib.parse import urlsplit

import httpx
from fastapi import Request
from fastapi.responses import Response

from radixflow.errors import KV_TRANSFER_FAILED
from radixflow.router.app import _REQUEST_HEADERS, Router, _normalize, _NotStarted, routing_text
from radixflow.router.config import RouterConfig
from radixflow.router.policy import Worker
from radixflow.server.errors import APIError

DEFAULT_BOOTSTRAP_PORT = 8998  # the servers' --disaggregation-bootstrap-port default


class PDRouter(Router):
    def __init__(self, prefill: list[tuple[str, int | None]], decode: list[str], config: RouterConfig):
        """`prefill`: (URL, bootstrap port or None for the default) per prefill server."""
        super().__init__([], config)
        if not prefill or not decode:
            raise ValueError("pd_disaggregation: give at least one --prefill and one --decode server")
        self.prefill = [Worker(_normalize(url), role="prefill", bootstrap_port=port or DEFAULT_BOOTSTRAP_PORT)
                        for url, port in prefill]
        self.decode = [Worker(_normalize(url), role="decode") for url in decode]
        self.workers = [*self.prefill, *self.decode]  # health checks, metrics, /list_workers see them all
        self._rng = random.Random()

    def ready(self) -> bool:
        return any(w.healthy for w in self.prefill) and any(w.healthy for w in self.decode)

    async def route(self, request: Request, path: str) -> Response:
        if path == "/v1/messages/count_tokens":  # no generation: any server answers it
            return await super().route(request, path)
        raw = await request.body()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        headers = {k: v for k, v in request.headers.items() if k.lower() in _REQUEST_HEADERS}
        params = dict(request.query_params)
        text = routing_text(path, body)
        failed: set[Worker] = set()
        refusal: Response | None = None
        for _ in range(self.config.retry_max_retries + 1):
            prefills = [w for w in self.prefill if w.healthy and w not in failed]
            decodes = [w for w in self.decode if w.healthy and w not in failed]
            if not prefills or not decodes:
                break
            decision = self.policy.select(prefills, text)
            decode = min(decodes, key=lambda w: (w.load, self._rng.random()))
            self.metrics.decisions.labels(decision.reason).inc()
            answer = await self._send_pair(decision.worker, decode, path, body, headers, params)
            if isinstance(answer, Response):
                return answer
            failed.add(answer.worker)
            refusal = answer.refusal or refusal
            self.metrics.retries.labels(answer.worker.url, answer.cause).inc()
        if refusal is not None:
            return refusal
        raise APIError(503, "no prefill/decode pair is available to take the request"
                       + (f" (failed: {', '.join(w.url for w in failed)})" if failed else ""),
                       type_="server_error", code="unavailable", headers={"Retry-After": "1"})

    async def _send_pair(self, prefill: Worker, decode: Worker, path: str, body: dict, headers: dict,
                         params: dict) -> Response | _PairFailed:
        """The decode server's answer as the client's response, or the server that failed and why."""
        boot = {"bootstrap_host": urlsplit(prefill.url).hostname, "bootstrap_port": prefill.bootstrap_port,
                "bootstrap_room": self._rng.getrandbits(63)}
        to_prefill = json.dumps({**body, **boot, "stream": False}).encode()
        to_decode = json.dumps({**body, **boot}).encode()
        prefill_task = asyncio.create_task(self._send(prefill, path, to_prefill, headers, params, False))
        decode_task = asyncio.create_task(self._send(decode, path, to_decode, headers, params,
                                                     body.get("stream") is True))
        done, _ = await asyncio.wait({prefill_task, decode_task}, return_when=asyncio.FIRST_COMPLETED)
        if prefill_task in done:
            failure = _prefill_failure(prefill, prefill_task.result())
            if failure is not None:  # the decode server would only wait for KV that never comes
                await _drop(decode_task)
                return failure
        answer = await decode_task
        if _transfer_failed(answer):  # the prefill side's fault: another prefill server may do it
            await _drop(prefill_task)
            await _close(answer)
            return _PairFailed(prefill, "kv_transfer", None)
        if isinstance(answer, _NotStarted):
            await _drop(prefill_task)
            return _PairFailed(decode, answer.cause, answer.refusal)
        if answer.status_code != 200:  # refused by the decode server (a 4xx): the prefill is not needed
            await _drop(prefill_task)
            return answer
        prefill_task.add_done_callback(_discard)  # its one token is not needed; it ends on its own
        return answer


class _PairFailed:
    """An attempt that did not start: the server to leave out of the next pair, the cause (for the metrics), and
    a refusal (503) to give the client if no other pair takes the request."""

    def __init__(self, worker: Worker, cause: str, refusal: Response | None):
        self.worker, self.cause, self.refusal = worker, cause, refusal


def _prefill_failure(prefill: Worker, answer: Response | _NotStarted) -> _PairFailed | Response | None:
    """None if the prefill server took the request; a `_PairFailed` if another pair may; its 4xx otherwise."""
    if isinstance(answer, _NotStarted):
        return _PairFailed(prefill, answer.cause, answer.refusal)
    if answer.status_code == 200:
        return None
    if answer.status_code >= 500:
        return _PairFailed(prefill, "prefill_failed", answer)
    return answer


def _transfer_failed(answer: Response | _NotStarted) -> bool:
    """The decode server's KV never came: its 503 (which `_send` hands back as a refusal), or a stream whose first
    event is that error."""
    marker = KV_TRANSFER_FAILED.encode()
    if isinstance(answer, _NotStarted):
        return answer.refusal is not None and marker in answer.refusal.body
    held = getattr(answer, "held", None)
    return held is not None and b"error" in held.first and marker in held.first


async def _drop(task: asyncio.Task) -> None:
    """Stop waiting for a server's answer: its connection closes, and the server aborts the request."""
    task.cancel()
    try:
        answer = await task
    except (asyncio.CancelledError, httpx.HTTPError):
        return
    await _close(answer)


async def _close(answer) -> None:
    """Close a stream the client will not get (a plain response is already read and closed)."""
    held = getattr(answer, "held", None)
    if held is not None:
        await held.close()


def _discard(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: asyncio logs nothing
