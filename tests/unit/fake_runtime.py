"""A model-free runtime for scheduler tests.

`Rig` builds a real `Scheduler` over a real `CacheManager` (a tiny CPU `KVPool` and `ReqToTokenPool`), a fake
tokenizer and a fake runner, and drives the engine step

    batch = scheduler.schedule(); output = runner.run(batch); scheduler.process_output(batch, output)

checking after every `schedule` and every `process_output` the invariants that hold for any workload: KV
integrity, the step's token budget, the running-request cap, decodes first, and chunks that start where the
request's computed KV ends. The fake runner's next token depends only on (rid, output position), so a request's
output is the same whatever the batching, chunking or retractions, and can be predicted by `expected_tokens`.
"""

from __future__ import annotations

import time
import zlib
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from radixflow.runtime.cache.kv_pool import KVPool, ReqToTokenPool
from radixflow.runtime.cache.manager import CacheManager
from radixflow.runtime.cache.prefix_cache import NoPrefixCache
from radixflow.runtime.cache.radix_cache import RadixCache
from radixflow.runtime.config import SchedulerConfig
from radixflow.runtime.limits import RequestLimits
from radixflow.runtime.request import FinishReason, Req, ReqStatus
from radixflow.runtime.sampling_params import SamplingParams
from radixflow.runtime.scheduler.batch import ModelOutput, ScheduledBatch
from radixflow.runtime.scheduler.output import RequestOutput
from radixflow.runtime.scheduler.scheduler import Scheduler

CPU = torch.device("cpu")


class FakeTokenizer:
    """Just what the scheduler's detokenizer calls: `backend_tokenizer.decode(ids, skip_special_tokens=...)`."""

    def __init__(self) -> None:
        self.backend_tokenizer = self

    @staticmethod
    def decode(ids, skip_special_tokens: bool = True) -> str:
        return " ".join(f"t{i}" for i in ids)


def next_token(rid: str, position: int) -> int:
    """The fake model's choice for output position `position` of request `rid` (in [1000, 2000))."""
    return 1000 + zlib.crc32(f"{rid}:{position}".encode()) % 1000


def expected_tokens(rid: str, n: int) -> list[int]:
    return [next_token(rid, i) for i in range(n)]


def tokens(start: int, n: int) -> tuple[int, ...]:
    """A run of `n` distinct prompt tokens; prompts built from disjoint runs share no prefix."""
    return tuple(range(start, start + n))


def make_req(rid: str, prompt: Iterable[int], max_new_tokens: int = 4, arrival: float | None = None,
             stop_ids: Iterable[int] = (), **params) -> Req:
    kwargs = {} if arrival is None else {"arrival": arrival}
    return Req(rid=rid, prompt_ids=tuple(prompt), params=SamplingParams(max_new_tokens=max_new_tokens, **params),
               stop_ids=frozenset(stop_ids), **kwargs)


@dataclass
class Chunk:
    """What one request computed in one step (a snapshot: the Req itself keeps changing)."""

    rid: str
    start: int
    num_new: int
    samples_next: bool

    @property
    def end(self) -> int:
        return self.start + self.num_new


class FakeRunner:
    """Returns `next_token(rid, position)` for each scheduled request that samples, None for the others.

    `script[rid]` overrides the first tokens of a request. `computed` logs every chunk, step by step.
    """

    def __init__(self, script: dict[str, list[int]] | None = None) -> None:
        self.script = script or {}
        self.computed: list[list[Chunk]] = []

    def token_for(self, req: Req, ahead: int = 0) -> int:
        scripted = self.script.get(req.rid, [])
        pos = req.num_output + ahead
        return scripted[pos] if pos < len(scripted) else next_token(req.rid, pos)

    def run(self, batch: ScheduledBatch) -> list[ModelOutput]:
        self.computed.append([Chunk(s.req.rid, s.start, s.num_new, s.samples_next) for s in batch.reqs])
        return [self._verify(s) if s.draft else ModelOutput(self.token_for(s.req) if s.samples_next else None)
                for s in batch.reqs]

    def _verify(self, s) -> ModelOutput:
        """A speculative step as greedy verification does it: the model's tokens while they equal the draft, then
        its first different one (or the one after the whole draft)."""
        tokens = []
        for i, d in enumerate(s.draft):
            tokens.append(self.token_for(s.req, i))
            if tokens[-1] != d:
                break
        else:
            tokens.append(self.token_for(s.req, len(s.draft)))
        return ModelOutput(tokens[0], extra_token_ids=tokens[1:])


@dataclass
class StepRecord:
    chunks: list[Chunk]
    outputs: list[RequestOutput]
    admitted: list[str] = field(default_factory=list)  # rids scheduled for the first time, in batch order


class Rig:
    """A scheduler with a real cache manager over a tiny KV pool, driven by a fake runner."""

    def __init__(self, pool_size: int = 2048, max_context: int | None = None, disable_radix_cache: bool = False,
                 script: dict[str, list[int]] | None = None, length_scorer=None, kv_sender=None,
                 **scheduler_options) -> None:
        self.config = SchedulerConfig(**scheduler_options)
        self.max_context = max_context or pool_size
        kv = KVPool(pool_size, num_layers=1, num_kv_heads=1, head_dim=1, dtype=torch.float32, device=CPU)
        req_to_token = ReqToTokenPool(self.config.max_running_requests, self.max_context + 1, CPU)
        prefix_cache = NoPrefixCache() if disable_radix_cache else RadixCache(kv.free)
        self.cache = CacheManager(kv, req_to_token, prefix_cache)
        self.scheduler = Scheduler(self.config, self.cache, FakeTokenizer(),
                                   RequestLimits(self.max_context, pool_size, vocab_size=100_000),
                                   length_scorer=length_scorer, kv_sender=kv_sender)
        self.runner = FakeRunner(script)
        self.t0 = time.monotonic()
        self.reqs: dict[str, Req] = {}
        self.tokens: dict[str, list[int]] = defaultdict(list)
        self.text: dict[str, str] = defaultdict(str)
        self.finish: dict[str, FinishReason] = {}
        self.first_start: dict[str, int] = {}   # start of a request's first chunk = its cache hit at admission
        self.admission_step: dict[str, int] = {}
        self.steps: list[StepRecord] = []

    # -- driving -----------------------------------------------------------------------------------------------
    def add(self, rid: str, prompt: Iterable[int], max_new_tokens: int = 4, arrival: float | None = None,
            priority: int = 0, bootstrap=None, **kwargs) -> Req:
        """Queue a request. `arrival` is in seconds relative to when the rig was built (negative: it has been
        waiting that long); by default requests arrive 1 ms apart in the order they are added."""
        offset = arrival if arrival is not None else len(self.reqs) * 1e-3
        req = make_req(rid, prompt, max_new_tokens, arrival=self.t0 + offset, **kwargs)
        req.priority, req.bootstrap = priority, bootstrap
        self.scheduler.add_request(req)
        self.reqs[rid] = req
        return req

    def step(self) -> StepRecord:
        s = self.scheduler
        decoding = [(r, r.num_retractions) for r in s.running if r.num_pending == 1]
        batch = s.schedule()
        s.check_integrity()
        self._check_batch(batch, decoding)
        record = StepRecord([], [])
        for sched in batch.reqs:
            rid = sched.req.rid
            if rid not in self.admission_step:
                self.admission_step[rid] = len(self.steps)
                self.first_start[rid] = sched.start
                record.admitted.append(rid)
        if batch:
            output = self.runner.run(batch)
            record.chunks = self.runner.computed[-1]
            record.outputs = s.process_output(batch, output)
        else:
            record.outputs = s.drain_outputs()
        s.check_integrity()
        self._collect(record.outputs)
        self.steps.append(record)
        return record

    def run(self, max_steps: int = 2000) -> None:
        """Step until nothing is waiting or running."""
        for _ in range(max_steps):
            if self.scheduler.idle:
                self._collect(self.scheduler.drain_outputs())
                return
            self.step()
        raise AssertionError(f"scheduler still busy after {max_steps} steps: "
                             f"{len(self.scheduler.running)} running, {len(self.scheduler.waiting)} waiting")

    def abort(self, rid: str) -> None:
        self.scheduler.abort(rid)
        self.scheduler.check_integrity()
        self._collect(self.scheduler.drain_outputs())

    def warm(self, *prompts: tuple[int, ...]) -> None:
        """Run one single-token request per prompt to completion, so the tree caches each whole prompt."""
        for i, prompt in enumerate(prompts):
            self.add(f"warm{len(self.reqs)}-{i}", prompt, max_new_tokens=1)
        self.run()
        for prompt in prompts:
            assert len(self.cache.prefix_cache.match_prefix(prompt).kv_indices) == len(prompt)

    # -- views -------------------------------------------------------------------------------------------------
    def admission_order(self, rids: Iterable[str]) -> list[str]:
        wanted = set(rids)
        order = [rid for step in self.steps for rid in step.admitted if rid in wanted]
        assert set(order) == wanted, f"never admitted: {wanted - set(order)}"
        return order

    def chunks_of(self, rid: str) -> list[tuple[int, Chunk]]:
        """(step index, chunk) for every chunk `rid` computed."""
        return [(i, c) for i, step in enumerate(self.steps) for c in step.chunks if c.rid == rid]

    def kv_free_when_idle(self) -> int:
        """Free + evictable: the whole pool when no request runs."""
        return self.cache.kv.free_count() + self.cache.prefix_cache.evictable_size()

    # -- invariants --------------------------------------------------------------------------------------------
    def _check_batch(self, batch: ScheduledBatch, decoding_before: list[tuple[Req, int]]) -> None:
        s = self.scheduler
        assert len(s.running) <= self.config.max_running_requests
        assert len(set(id(x.req) for x in batch.reqs)) == len(batch.reqs), "a request scheduled twice in a step"
        if self.config.enable_chunked_prefill:
            assert batch.num_tokens <= self.config.chunked_prefill_size, (
                f"step computes {batch.num_tokens} tokens, budget {self.config.chunked_prefill_size}")
        for x in batch.reqs:
            assert x.req.status is ReqStatus.RUNNING and any(r is x.req for r in s.running)
            assert x.start == x.req.num_computed, f"{x.req.rid}: chunk at {x.start}, computed {x.req.num_computed}"
            assert 1 <= x.num_new and x.end - len(x.draft) <= x.req.num_tokens
            assert not x.draft or x.samples_next, "a draft on a chunk that does not reach the last token"
            assert x.req.num_allocated == x.end, \
                f"{x.req.rid}: KV allocated to {x.req.num_allocated}, chunk ends at {x.end}"
        # Stall-free: every request that was decoding and was not retracted gets its one token, ahead of prefills.
        still_decoding = [r for r, retractions in decoding_before
                          if r.status is ReqStatus.RUNNING and r.num_retractions == retractions]
        head = batch.reqs[:len(still_decoding)]
        assert {id(x.req) for x in head} == {id(r) for r in still_decoding}, "a decode was left out or not first"
        assert all(x.num_new == 1 + len(x.draft) for x in head)

    def _collect(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            assert out.rid not in self.finish, f"{out.rid}: output after its finished output"
            self.tokens[out.rid].extend(out.token_ids)
            self.text[out.rid] += out.text
            if out.finished:
                self.finish[out.rid] = out.finish_reason
