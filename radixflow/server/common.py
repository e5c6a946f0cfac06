"""What the native and OpenAI routes share: the server's state, and the helpers for running requests against the
scheduler, streaming SSE and noticing a client that went away."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import StreamingResponse

from radixflow.entrypoints.generate import GenerateInput, NormalizedInput
from radixflow.entrypoints.result import ResultCollector
from radixflow.errors import KV_TRANSFER_FAILED, InvalidRequestError
from radixflow.runtime.config import ServerConfig
from radixflow.runtime.request import Req
from radixflow.server.errors import APIError, KVTransferFailedError, SchedulerDiedError, bad_request
from radixflow.server.metrics import ServerMetrics
from radixflow.server.tokenizer_manager import TokenizerManager


class ServerState:
    def __init__(self, manager: TokenizerManager, served_model_name: str, config: ServerConfig):
        self.manager = manager
        self.model_name = served_model_name
        self.config = config
        self.draining_since: float | None = None  # set on SIGTERM: new requests get 503 while running ones end
        self.metrics = ServerMetrics()
        self.started = time.time()

    def check_model(self, name: str) -> None:
        """A request names the served model (OpenAI's and Anthropic's APIs both ask for it)."""
        if name != self.model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {self.model_name!r}",
                           "model", code="model_not_found")

    def prepare(self, request: GenerateInput, text_field: str = "text",
                renames: dict[str, str] | None = None) -> tuple[NormalizedInput, list[Req]]:
        """Normalise a generate request and build its `Req`s (entrypoints/generate.py). `renames` maps the
        runtime's field names to those this API's client sent, for error messages (OpenAI's `max_tokens`)."""
        if not self.manager.alive:  # checked here, before a streamed response has sent its 200
            raise SchedulerDiedError(self.manager.dead_reason or "scheduler process is not running")
        if request.timeout is None and self.config.request_timeout_s is not None:
            request = dataclasses.replace(request, timeout=self.config.request_timeout_s)
        mode = self.manager.config.disaggregation.disaggregation_mode
        if mode is not None and request.bootstrap_room is None:
            raise bad_request(f"this server runs --disaggregation-mode {mode}: it serves one phase of requests "
                              "that radixflow router --pd-disaggregation sends (with bootstrap_host, "
                              "bootstrap_port, bootstrap_room)", "bootstrap_room")
        try:
            normalized = request.normalize(text_field)
            reqs = normalized.build(self.manager.tokenizer, self.manager.eos_ids, self.manager.limits)
        except InvalidRequestError as exc:
            if renames:
                raise exc.renamed(renames) from None
            raise
        self.manager.admit(reqs, self.config.max_queued_requests, self.config.max_queued_tokens)
        return normalized, reqs

    async def stream(self, req: Req) -> AsyncIterator[tuple[ResultCollector, object]]:
        """(collector, delta) pairs for one request; records metrics as outputs arrive."""
        collector = ResultCollector(req, self.manager.tokenizer)
        last = None
        async for out in self.manager.submit(req):
            reason = out.finish_reason
            if reason and reason.type == "abort" and (reason.message or "").startswith(KV_TRANSFER_FAILED):
                raise KVTransferFailedError(reason.message)  # nothing was generated: another pair may serve it
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
        async for collector, _ in self.stream(req):  # noqa: B007 - the last collector is the whole result
            pass
        reason = collector.last.finish_reason
        if reason and reason.type == "abort" and not self.manager.alive:
            raise SchedulerDiedError(self.manager.dead_reason)  # an error (503), not a truncated success
        return collector

    async def run_all(self, request: Request, reqs: list[Req]) -> list[ResultCollector]:
        """Run `reqs` together; if the client goes away first, they are aborted."""
        return await until_disconnect(request, asyncio.gather(*(self.run(r) for r in reqs)))


async def until_disconnect(request: Request, work):
    """Run `work`; if the client goes away first, cancel it (its request is aborted on the way out).

    The disconnect is awaited on `receive()` (the body has been read, so only a disconnect can come).
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
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _cancel(task: asyncio.Future) -> None:
    task.cancel()
    task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved, so asyncio logs nothing


def sse(payload, event: str | None = None) -> bytes:
    """One SSE event; `event` names its type (Anthropic's streams name every event, OpenAI's none)."""
    data = f"data: {json.dumps(payload) if not isinstance(payload, str) else payload}\n\n"
    return (f"event: {event}\n{data}" if event else data).encode()


def event_stream(events: AsyncIterator[bytes], error_event: Callable[[Exception], bytes] | None = None
                 ) -> StreamingResponse:
    """An SSE response. Its 200 is sent before the first event, so a failure after that is sent as an event
    (`error_event`, default OpenAI's error object)."""
    async def guarded():
        try:
            async for event in events:
                yield event
        except SchedulerDiedError as exc:
            yield (error_event or _openai_error_event)(exc)

    return StreamingResponse(guarded(), media_type="text/event-stream")


def _openai_error_event(exc: Exception) -> bytes:
    return sse({"error": {"message": str(exc), "type": "server_error", "param": None, "code": None}})


def render_chat(state: ServerState, messages: list[dict], continue_final: bool = False,
                tools: list[dict] | None = None) -> str:
    """The prompt for `messages` ({"role", "content": text}) by the model's chat template, ending with the
    assistant's generation prompt; with `continue_final` the last (assistant) message is continued instead (a
    prefill: the answer extends its text). `tools` go to a template that renders tools itself."""
    history, prefill = (messages[:-1], messages[-1]["content"]) if continue_final else (messages, "")
    try:
        prompt = state.manager.tokenizer.apply_chat_template(history, tools=tools, tokenize=False,
                                                             add_generation_prompt=True)
    except Exception as exc:  # jinja raises for templates that refuse a role order
        raise bad_request(f"messages: the chat template rejected them ({exc})", "messages") from exc
    return prompt + prefill
