"""The offline, in-process engine: `Engine(model_path=...).generate(...)`.

The runtime loop runs on a background thread, so many caller threads (a frontend `run_batch`, say) can submit at
once and all of them are batched together. Requests are tokenized and validated on the caller's thread: a bad
request raises there and never reaches the loop.

The model is loaded on that same thread, so torch's OpenMP thread team belongs to it alone: once a second thread
(the caller's) has run parallel torch work, every matmul of both gets slower (bench/RESULTS.md).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future

from radixflow.backends.engine_backend import EngineBackend
from radixflow.entrypoints.generate import GenerateInput, is_sample_of
from radixflow.entrypoints.result import ResultCollector
from radixflow.errors import InvalidRequestError
from radixflow.runtime.config import EngineConfig
from radixflow.runtime.engine_core import EngineCore
from radixflow.runtime.inbox import AbortRequest, AddRequest, Call
from radixflow.runtime.request import Req
from radixflow.runtime.scheduler.output import RequestOutput


class Engine:
    """In-process engine. Keyword arguments are the fields of the config dataclasses (see `radixflow --help`)."""

    def __init__(self, model_path: str | None = None, *, config: EngineConfig | None = None, **kwargs):
        self.config = config or EngineConfig.from_kwargs(model_path=model_path, **kwargs)
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, Callable[[RequestOutput], None]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._endpoint: EngineBackend | None = None
        started: Future = Future()
        self._thread = threading.Thread(target=self._loop, args=(started,), name="radixflow-engine", daemon=True)
        self._thread.start()
        self.core: EngineCore = started.result()  # re-raises a load error (bad path, corrupt file) here
        self.tokenizer = self.core.loaded.tokenizer
        self.max_context = self.core.max_context
        self.limits = self.core.limits

    @classmethod
    def from_config(cls, config: EngineConfig) -> "Engine":
        return cls(config=config)

    # -- public API ------------------------------------------------------------------------------------------
    def generate(self, prompt: str | list[str] | None = None, sampling_params: dict | list[dict] | None = None,
                 input_ids: list[int] | list[list[int]] | None = None, return_logprob: bool = False,
                 logprob_start_len: int = -1, top_logprobs_num: int = 0, stream: bool = False,
                 rid: str | list[str] | None = None, return_text_in_logprobs: bool = False,
                 timeout: float | None = None, priority: int | None = None, bootstrap_host: str | None = None,
                 bootstrap_port: int | None = None, bootstrap_room: int | None = None,
                 session_id: str | None = None):
        """Generate for one prompt (returns a dict) or a batch (a flat list of dicts, prompt by prompt).

        The shapes are `POST /generate`'s (radixflow/entrypoints/generate.py): a prompt with `n > 1` gives a list
        of its n results. With `stream=True` (a single prompt, n == 1) returns an iterator of incremental dicts.
        `timeout` (seconds): a request not finished by then ends with finish_reason abort ("timeout: ...").
        `priority`: with priority scheduling, lower values are served first. `bootstrap_*`: a disaggregated
        engine's request (its prefill server's bootstrap address and the transfer's room; docs/disaggregation.md).
        `session_id`: the cache retains the request's KV for that session (`open_session`; docs/hicache.md).
        """
        normalized = GenerateInput(text=prompt, input_ids=input_ids, sampling_params=sampling_params, rid=rid,
                                   return_logprob=return_logprob, logprob_start_len=logprob_start_len,
                                   top_logprobs_num=top_logprobs_num, return_text_in_logprobs=return_text_in_logprobs,
                                   stream=stream, timeout=timeout, priority=priority, bootstrap_host=bootstrap_host,
                                   bootstrap_port=bootstrap_port, bootstrap_room=bootstrap_room,
                                   session_id=session_id).normalize(text_field="prompt")
        reqs = normalized.build(self.tokenizer, self.core.loaded.eos_ids, self.limits)
        if normalized.stream:
            return self._stream(reqs[0])
        futures = [self._submit(r) for r in reqs]
        return normalized.shape([f.result() for f in futures])

    def generate_stream(self, prompt: str | None = None, sampling_params: dict | None = None,
                        **kwargs) -> Iterator[dict]:
        return self.generate(prompt, sampling_params, stream=True, **kwargs)

    async def async_generate(self, prompt=None, sampling_params=None, **kwargs):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, lambda: self.generate(prompt, sampling_params, **kwargs))

    def abort(self, rid: str) -> None:
        """Abort the request `rid`, and the requests made from it (a batch's or n samples' `{rid}_{k}`)."""
        with self._lock:
            family = [r for r in self._streams if r == rid or is_sample_of(r, rid)]
        for r in family or [rid]:
            self._inbox.put(AbortRequest(r))

    @property
    def endpoint(self) -> EngineBackend:
        """This engine as a frontend backend (`set_default_backend(engine)` and `run(backend=engine)` use it)."""
        if self._endpoint is None:
            self._endpoint = EngineBackend(self)
        return self._endpoint

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def flush_cache(self) -> bool:
        """Drop the prefix cache; returns False (and does nothing) while requests are running."""
        return self._call(self.core.scheduler.flush_cache)

    def open_session(self, session_id: str | None = None, ttl_s: float | None = None) -> str:
        """Open a session (or set an open one's TTL) and return its id (a new one if none is given). Requests that
        carry it (`session_id=`) have their KV retained until `close_session` or `ttl_s` seconds of idleness."""
        return self._call(lambda: self.core.cache.open_session(session_id, ttl_s))

    def close_session(self, session_id: str, wait: bool = True) -> bool | None:
        """Release a session's retained prefix; False if it was not open. `wait=False` queues the close for the
        engine's next turn and returns None at once (a program ending does not wait for a step)."""
        if not wait:
            self._inbox.put(Call(lambda: self.core.cache.close_session(session_id)))
            return None
        return self._call(lambda: self.core.cache.close_session(session_id))

    def check_integrity(self) -> None:
        """Raise if any KV index leaked or is owned twice (runs on the engine thread)."""
        self._call(self.core.check_integrity)

    def stats(self) -> dict:
        return self._call(self.core.stats)

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.core.grammar.shutdown()
        self.core.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    # -- internals -------------------------------------------------------------------------------------------
    def _register(self, req: Req, sink) -> None:
        """`sink(output)` is called on the engine thread for each of the request's outputs."""
        with self._lock:
            if req.rid in self._streams:
                raise InvalidRequestError("rid", f"request id {req.rid!r} is already in use")
            self._streams[req.rid] = sink
        self._inbox.put(AddRequest(req))

    def _submit(self, req: Req) -> Future:
        fut: Future = Future()
        collector = ResultCollector(req, self.tokenizer)

        def sink(out: RequestOutput) -> None:
            collector.add(out)
            if out.finished:
                fut.set_result(collector.result())
        self._register(req, sink)
        return fut

    def _stream(self, req: Req) -> Iterator[dict]:
        q: queue.Queue = queue.Queue()
        self._register(req, q.put)
        collector = ResultCollector(req, self.tokenizer)
        try:
            while True:
                out = q.get()
                collector.add(out)
                yield collector.delta(out)
                if out.finished:
                    return
        finally:
            if not collector.finished:
                self.abort(req.rid)  # the consumer stopped early: free the request's KV

    def _call(self, fn):
        fut: Future = Future()

        def run():
            try:
                fut.set_result(fn())
            except Exception as exc:  # noqa: BLE001 - handed back to the caller's thread
                fut.set_exception(exc)
        self._inbox.put(Call(run))
        return fut.result()

    def _loop(self, started: Future) -> None:
        try:
            core = EngineCore(self.config)
        except BaseException as exc:  # noqa: BLE001 - handed to the constructor on the caller's thread
            started.set_exception(exc)
            return
        started.set_result(core)
        core.serve_forever(self._inbox, self._emit, self._stop)

    def _emit(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            with self._lock:
                sink = self._streams.get(out.rid)
                if out.finished:
                    self._streams.pop(out.rid, None)
            if sink is not None:
                sink(out)
