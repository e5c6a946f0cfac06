"""The HTTP process's side of the runtime: tokenize and validate, send requests to the scheduler process, route
its outputs back to the waiting HTTP handlers, and supervise that process.

Supervision: when the scheduler process dies (a crash, an OOM kill), every request in flight ends at once with an
error, new requests get 503, and the process is started again (up to `max_restarts` times, after 1, 2, 4, ...
seconds); once the new one reports ready, requests are served again.

Admission: a request counts as queued from the moment it is admitted until its first output (or its end); past
the configured bounds on queued requests or their prompt tokens, new requests are refused (503, Retry-After)
instead of queueing without bound.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
import tempfile
import time
import uuid
import weakref
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
from radixflow.server.errors import QueueFullError, SchedulerDiedError
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
    def __init__(self, config: EngineConfig, log_level: str = "info", startup_timeout_s: float = 600.0,
                 max_restarts: int = 3):
        self.config = config
        self.log_level = log_level
        self.startup_timeout_s = startup_timeout_s
        self.max_restarts = max_restarts
        self.restarts = 0
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
        self.process = self._spawn()
        ready = self._wait_ready(out, startup_timeout_s)
        out.close(linger=0)
        self.limits = RequestLimits(ready.max_context, ready.pool_size, ready.vocab_size)
        self._queues: dict[str, asyncio.Queue] = {}
        self._calls: dict[int, asyncio.Future] = {}
        self._call_ids = itertools.count()
        self._receiver: asyncio.Task | None = None
        self.dead_reason: str | None = None
        self.stopping = False  # the server is shutting down: a scheduler that dies now is not restarted
        # Admitted requests without an output yet -> their prompt tokens. Weak: a request never submitted (its client
        # left before its stream began) stops counting when it is dropped.
        self._queued: weakref.WeakKeyDictionary[Req, int] = weakref.WeakKeyDictionary()

    def _spawn(self) -> multiprocessing.Process:
        # spawn, not fork: the child must not inherit this process's threads or zmq state.
        process = multiprocessing.get_context("spawn").Process(
            target=run_scheduler_process, args=(self.config, self._in_addr, self._out_addr, self.log_level),
            name="radixflow-scheduler", daemon=True)
        process.start()
        return process

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
        self.stopping = True
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
    def admit(self, reqs: list[Req], max_requests: int | None, max_tokens: int | None) -> None:
        """Count `reqs` as queued, or raise QueueFullError if that passes a bound. A request stays counted until
        its first output or its end (or, never submitted, until it is dropped)."""
        tokens = sum(len(r.prompt_ids) for r in reqs)
        if max_requests is not None and len(self._queued) + len(reqs) > max_requests:
            raise QueueFullError(f"{len(self._queued)} requests are queued and {len(reqs)} more would pass the limit "
                                 f"of {max_requests} (--max-queued-requests); retry later")
        queued_tokens = sum(self._queued.values())
        if max_tokens is not None and queued_tokens + tokens > max_tokens:
            raise QueueFullError(f"{queued_tokens} prompt tokens are queued and {tokens} more would pass the limit "
                                 f"of {max_tokens} (--max-queued-tokens); retry later")
        for req in reqs:
            self._queued[req] = len(req.prompt_ids)

    @property
    def in_flight(self) -> int:
        """Requests admitted and not yet finished."""
        return len(self._queues) + sum(req.rid not in self._queues for req in list(self._queued))

    async def submit(self, req: Req) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; the request is aborted if the consumer stops early (client gone)."""
        if not self.alive:
            self._queued.pop(req, None)
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
                self._queued.pop(req, None)  # it has started (or ended): no longer queued
                finished = out.finished
                yield out
        finally:
            self._queues.pop(req.rid, None)
            self._queued.pop(req, None)
            if not finished:
                self.abort(req.rid)

    def abort_all(self, reason: str) -> None:
        """End every request in flight now, with `reason` (the drain's grace period is over)."""
        for rid, queue in list(self._queues.items()):
            queue.put_nowait(RequestOutput(rid=rid, finished=True, finish_reason=FinishReason("abort",
                                                                                              message=reason)))
            self.abort(rid)

    def abort(self, rid: str) -> None:
        if self.alive:
            self._push.send(dumps(AbortRequest(rid)))

    def abort_family(self, rid: str) -> None:
        """Abort `rid` and the requests made from it (a batch's or n samples' `{rid}_{k}`)."""
        self.abort(rid)
        for other in list(self._queues):
            if is_sample_of(other, rid):
                self.abort(other)

    async def control(self, op: str, timeout_s: float = 30.0, **args):
        if not self.alive:
            raise SchedulerDiedError(self.dead_reason or "scheduler process is not running")
        call_id = next(self._call_ids)
        future = asyncio.get_running_loop().create_future()
        self._calls[call_id] = future
        self._push.send(dumps(ControlRequest(call_id, op, args)))
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
                reason = f"scheduler process died (exit code {self.process.exitcode})"
                self._fail_everything(reason)
                if self.stopping or not await self._restart(reason):
                    return

    async def _restart(self, reason: str) -> bool:
        """Start the scheduler process again, with backoff, until it reports ready or the restarts run out.
        `dead_reason` says what is going on meanwhile (health answers 503 with it)."""
        while self.restarts < self.max_restarts and not self.stopping:
            self.restarts += 1
            delay = 2 ** (self.restarts - 1)
            self.dead_reason = (f"{reason}; restarting it (restart {self.restarts} of {self.max_restarts}, "
                                f"in {delay} s)")
            logger.error(self.dead_reason)
            await asyncio.sleep(delay)
            started = time.monotonic()
            self.dead_reason = f"{reason}; restarting it (restart {self.restarts} of {self.max_restarts}: loading)"
            self.process = self._spawn()
            error = await self._await_ready()
            if error is None:
                logger.warning("scheduler process restarted in %.1f s", time.monotonic() - started)
                self.dead_reason = None
                return True
            reason = error
        self.dead_reason = f"{reason}; not restarted again ({self.restarts} restarts, --max-scheduler-restarts)"
        logger.error(self.dead_reason)
        return False

    async def _await_ready(self) -> str | None:
        """Wait for the new process's Ready: None, or why it did not come."""
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if await self._pull.poll(500):
                message = loads(await self._pull.recv())
                if isinstance(message, Ready):
                    return f"model failed to load: {message.error}" if message.error else None
            elif not self.process.is_alive():
                return f"scheduler process exited during start-up (exit code {self.process.exitcode})"
        self.process.kill()
        return f"scheduler process not ready after {self.startup_timeout_s:.0f} s"

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
        self._queued.clear()
        for rid, queue in list(self._queues.items()):
            queue.put_nowait(RequestOutput(rid=rid, finished=True, finish_reason=FinishReason("abort", message=reason)))
        for future in self._calls.values():
            if not future.done():
                future.set_result(ControlReply(-1, error=reason))
