"""The HTTP process's side of the runtime: tokenize and validate, send requests to the scheduler process, route
its outputs back to the waiting HTTP handlers, and notice when that process dies."""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
import tempfile
import uuid
from collections.abc import AsyncIterator

import zmq
import zmq.asyncio

from radixflow.entrypoints.generate import is_sample_of
from radixflow.errors import InvalidRequestError
from radixflow.runtime.config import EngineConfig
from radixflow.runtime.limits import RequestLimits
from radixflow.runtime.model_source import resolve_model
from radixflow.runtime.request import FinishReason, Req
from radixflow.runtime.scheduler.output import RequestOutput
from radixflow.runtime.tokenizer import eos_token_ids, load_tokenizer
from radixflow.server.errors import SchedulerDiedError
from radixflow.server.messages import (
    AbortRequest,
    AddRequest,
    ControlReply,
    ControlRequest,
    OutputBatch,
    Ready,
    dumps,
    loads,
)
from radixflow.server.scheduler_process import run_scheduler_process

logger = logging.getLogger(__name__)


class TokenizerManager:
    def __init__(self, config: EngineConfig, log_level: str = "info", startup_timeout_s: float = 600.0):
        self.config = config
        self.source = resolve_model(config.model.model_path)
        self.tokenizer = load_tokenizer(self.source, config.model.chat_template)
        self.eos_ids = eos_token_ids(self.tokenizer, self.source)
        base = os.path.join(tempfile.gettempdir(), f"radixflow-{uuid.uuid4().hex[:12]}")
        self._in_addr, self._out_addr = f"ipc://{base}-in", f"ipc://{base}-out"
        self._sync_ctx = zmq.Context()
        out = self._sync_ctx.socket(zmq.PULL)
        out.bind(self._out_addr)
        self._push = self._sync_ctx.socket(zmq.PUSH)
        self._push.bind(self._in_addr)
        # spawn, not fork: the child must not inherit this process's threads or zmq state.
        self.process = multiprocessing.get_context("spawn").Process(
            target=run_scheduler_process, args=(config, self._in_addr, self._out_addr, log_level),
            name="radixflow-scheduler", daemon=True)
        self.process.start()
        ready = self._wait_ready(out, startup_timeout_s)
        out.close(linger=0)
        self.limits = RequestLimits(ready.max_context, ready.pool_size, ready.vocab_size)
        self._queues: dict[str, asyncio.Queue] = {}
        self._calls: dict[int, asyncio.Future] = {}
        self._call_ids = itertools.count()
        self._receiver: asyncio.Task | None = None
        self.dead_reason: str | None = None

    def _wait_ready(self, out, timeout_s: float) -> Ready:
        poller_deadline = timeout_s * 1000
        while poller_deadline > 0:
            if out.poll(500):
                ready = loads(out.recv())
                if isinstance(ready, Ready) and ready.error:
                    self.process.join(timeout=5)
                    raise RuntimeError(f"model failed to load: {ready.error}")
                return ready
            if not self.process.is_alive():
                raise RuntimeError(f"scheduler process exited during start-up (exit code {self.process.exitcode})")
            poller_deadline -= 500
        self.process.terminate()
        raise RuntimeError(f"scheduler process not ready after {timeout_s:.0f}s")

    # -- lifecycle (called from the server's event loop) -----------------------------------------------------
    async def start(self) -> None:
        self._actx = zmq.asyncio.Context()
        self._pull = self._actx.socket(zmq.PULL)
        self._pull.bind(self._out_addr)
        self._receiver = asyncio.create_task(self._receive_loop())

    async def close(self) -> None:
        if self._receiver:
            self._receiver.cancel()
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
        self._pull.close(linger=0)
        self._push.close(linger=0)
        for path in (self._in_addr, self._out_addr):
            try:
                os.unlink(path.removeprefix("ipc://"))
            except FileNotFoundError:
                pass

    @property
    def alive(self) -> bool:
        return self.dead_reason is None and self.process.is_alive()

    # -- requests ---------------------------------------------------------------------------------------------
    async def submit(self, req: Req) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; the request is aborted if the consumer stops early (client gone)."""
        if not self.alive:
            raise SchedulerDiedError(self.dead_reason or "scheduler process is not running")
        if req.rid in self._queues:
            raise InvalidRequestError("rid", f"request id {req.rid!r} is already in use")
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[req.rid] = queue
        self._push.send(dumps(AddRequest(req)))
        finished = False
        try:
            while not finished:
                out = await queue.get()
                finished = out.finished
                yield out
        finally:
            self._queues.pop(req.rid, None)
            if not finished:
                self.abort(req.rid)

    def abort(self, rid: str) -> None:
        if self.alive:
            self._push.send(dumps(AbortRequest(rid)))

    def abort_family(self, rid: str) -> None:
        """Abort `rid` and the requests made from it (a batch's or n samples' `{rid}_{k}`)."""
        self.abort(rid)
        for other in list(self._queues):
            if is_sample_of(other, rid):
                self.abort(other)

    async def control(self, op: str, timeout_s: float = 30.0):
        if not self.alive:
            raise SchedulerDiedError(self.dead_reason or "scheduler process is not running")
        call_id = next(self._call_ids)
        future = asyncio.get_running_loop().create_future()
        self._calls[call_id] = future
        self._push.send(dumps(ControlRequest(call_id, op)))
        try:
            reply: ControlReply = await asyncio.wait_for(future, timeout_s)
        finally:
            self._calls.pop(call_id, None)
        if reply.error:
            raise RuntimeError(reply.error)
        return reply.result

    async def _receive_loop(self) -> None:
        while True:
            if await self._pull.poll(500):
                self._dispatch(loads(await self._pull.recv()))
            elif not self.process.is_alive():
                self._fail_everything(f"scheduler process died (exit code {self.process.exitcode})")
                return

    def _dispatch(self, message) -> None:
        if isinstance(message, OutputBatch):
            for out in message.outputs:
                queue = self._queues.get(out.rid)
                if queue is not None:
                    queue.put_nowait(out)
        elif isinstance(message, ControlReply):
            future = self._calls.get(message.call_id)
            if future is not None and not future.done():
                future.set_result(message)

    def _fail_everything(self, reason: str) -> None:
        """In-flight requests end with an error instead of hanging."""
        logger.error(reason)
        self.dead_reason = reason
        for rid, queue in list(self._queues.items()):
            queue.put_nowait(RequestOutput(rid=rid, finished=True, finish_reason=FinishReason("abort", message=reason)))
        for future in self._calls.values():
            if not future.done():
                future.set_result(ControlReply(-1, error=reason))
