"""The scheduler: waiting queue, running batch, and the two calls around the model of each step.

    batch = scheduler.schedule()            # what to compute this step
    output = runner.run(batch)              # one forward + sampling
    outputs = scheduler.process_output(batch, output)   # via OutputProcessor (output.py)

`schedule` is stall-free (Sarathi-Serve): running decodes go in first, one token each; then the request whose
prefill is in flight continues; then waiting requests are admitted in policy order under what remains of the
step's token budget and of KV memory. Memory pressure first evicts unlocked cache entries, then retracts
running requests (they keep their output and resume later, mostly from the cache).

Disaggregated (`--disaggregation-mode`, runtime/disaggregation/transfer.py): a prefill server's requests end after
their first token and hand their KV to a `KVSender`; a decode server's requests are admitted without compute
(slots and KV for the prompt are allocated, then they wait, RECEIVING, for a `KVReceiver` to fill them) and join
the running batch with the first token the prefill server sampled.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import random
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from radixflow.errors import KV_TRANSFER_FAILED, InvalidRequestError
from radixflow.runtime.cache.manager import CacheManager
from radixflow.runtime.config import SchedulerConfig
from radixflow.runtime.constrained.grammar import GrammarCompiler, RequestGrammar
from radixflow.runtime.disaggregation.transfer import FirstToken, KVReceiver, KVSender
from radixflow.runtime.limits import RequestLimits
from radixflow.runtime.request import FinishReason, Req, ReqStatus
from radixflow.runtime.scheduler.batch import ModelOutput, ScheduledBatch, ScheduledReq
from radixflow.runtime.scheduler.output import OutputProcessor, RequestOutput
from radixflow.runtime.scheduler.policy import (
    PolicyContext,
    by_priority,
    get_policy,
    priority_victim,
    retraction_victim,
)
from radixflow.runtime.scheduler.speculative import Drafter

logger = logging.getLogger(__name__)

# Two waiting requests whose uncached parts share at least this many tokens are not prefilled in the same step:
# the second waits one step and then hits the cache instead of computing the prefix again.
SHARED_PREFIX_DEFER_TOKENS = 32

# A request whose prefix is being read from the storage tier waits for it at most this long; then it is admitted
# and reads what remains synchronously.
PREFETCH_WAIT_S = 5.0

# The step budget with chunked prefill off: more than any step can spend, so every prompt is prefilled whole.
UNCHUNKED_BUDGET = sys.maxsize


@dataclass
class SchedulerStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_used_tokens: int = 0
    kv_total_tokens: int = 0
    cache_hit_tokens: int = 0
    cache_hit_host_tokens: int = 0  # of those, brought back from the host tier (hierarchical cache)
    cache_hit_storage_tokens: int = 0  # ... and from storage
    prompt_tokens: int = 0
    num_retractions: int = 0
    num_priority_preemptions: int = 0  # retractions to make room for a request of higher priority
    num_receiving: int = 0  # disaggregated decode: requests whose KV is on its way from a prefill server
    generated_tokens: int = 0

    @property
    def cache_hit_rate(self) -> float:
        return self.cache_hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


class Scheduler:
    def __init__(self, config: SchedulerConfig, cache: CacheManager, tokenizer, limits: RequestLimits,
                 grammar: GrammarCompiler | None = None,
                 length_scorer: Callable[[Sequence[int]], float] | None = None,
                 kv_sender: KVSender | None = None, kv_receiver: KVReceiver | None = None):
        """`length_scorer`: a prompt's predicted output-length score (ranker.py), which `ltr` orders by.
        `kv_sender` / `kv_receiver`: this is a disaggregated prefill / decode server (one of them at most)."""
        self.config = config
        self.kv_sender, self.kv_receiver = kv_sender, kv_receiver
        if config.schedule_policy == "ltr" and length_scorer is None:
            raise ValueError("schedule_policy: ltr needs an output-length ranker (--ltr-ranker-path)")
        self.length_scorer = length_scorer if config.schedule_policy == "ltr" else None
        self.priority_scheduling = config.enable_priority_scheduling or config.schedule_policy == "priority"
        self.grammar = grammar
        self.cache = cache
        self.limits = limits
        self.policy = get_policy(config.schedule_policy)
        if config.speculative_algorithm not in (None, "ngram"):
            raise ValueError(f"speculative_algorithm: {config.speculative_algorithm!r} is not supported (ngram, or "
                             "none)")
        if config.speculative_algorithm and not (
                1 <= config.speculative_ngram_min_match_window_size <= config.speculative_ngram_max_match_window_size):
            raise ValueError("speculative_ngram_min_match_window_size must be >= 1 and <= "
                             "speculative_ngram_max_match_window_size")
        for name in ("speculative_num_draft_tokens", "speculative_max_batch_size"):
            if config.speculative_algorithm and getattr(config, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
        self.drafter = Drafter(config, cache.prefix_cache) if config.speculative_algorithm else None
        self.output = OutputProcessor(tokenizer, config.enable_jump_forward)
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self.receiving: list[Req] = []
        self.new_token_ratio = config.new_token_ratio
        self.stats = SchedulerStats(kv_total_tokens=cache.kv.size)
        self._outputs: list[RequestOutput] = []  # this step's deltas (and aborts between steps), in order
        self._rng = random.Random(0)  # the `random` policy's; one stream across steps

    # -- requests in and out ---------------------------------------------------------------------------------
    def add_request(self, req: Req) -> None:
        """Queue a validated request. Raises InvalidRequestError for one that can never fit."""
        self.limits.check_fits(len(req.prompt_ids), req.params.max_new_tokens)
        if (self.kv_sender or self.kv_receiver) and req.bootstrap is None:
            raise InvalidRequestError("bootstrap_room", "this server serves one phase of disaggregated requests "
                                                        "(--disaggregation-mode): send them through radixflow "
                                                        "router --pd-disaggregation")
        if self.kv_sender is not None:  # the prefill phase: up to the first token
            params = req.params
            req.params = dataclasses.replace(params, max_new_tokens=min(params.max_new_tokens, 1),
                                             min_new_tokens=min(params.min_new_tokens, 1))
        constraint = req.params.constraint
        if constraint is not None:
            if self.grammar is None:
                raise InvalidRequestError(constraint.kind, "constrained decoding is not available in this engine")
            # Compiled off this thread; the request waits in the queue until its grammar is ready.
            req.grammar_future = self.grammar.submit(constraint)
            req.grammar_deadline = time.monotonic() + self.config.grammar_compile_timeout_s
        if self.length_scorer is not None:
            req.length_score = self.length_scorer(req.prompt_ids)
        self.cache.prefetch(req)
        req.prefetch_deadline = time.monotonic() + PREFETCH_WAIT_S
        self.output.add(req)
        self.waiting.append(req)

    def abort(self, rid: str, message: str = "aborted by the client") -> None:
        req = next((r for r in [*self.waiting, *self.running, *self.receiving] if r.rid == rid), None)
        if req is not None:
            self._end(req, FinishReason("abort", message=message))

    def reject(self, rid: str, message: str) -> None:
        """Answer a request that never entered the queue with an abort."""
        reason = FinishReason("abort", message=message)
        self._outputs.append(RequestOutput(rid=rid, finished=True, finish_reason=reason))

    def abort_all(self, message: str) -> None:
        for req in [*self.waiting, *self.running, *self.receiving]:
            self._end(req, FinishReason("abort", message=message))

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running and not self.receiving

    def drain_outputs(self) -> list[RequestOutput]:
        """Outputs produced since the last call (a step's deltas, and aborts between steps)."""
        out, self._outputs = self._outputs, []
        return out

    def _end(self, req: Req, reason: FinishReason, delta: RequestOutput | None = None) -> None:
        """The one way a queued request ends: out of its queue, KV released, its last output queued."""
        if req.status is ReqStatus.RUNNING:
            self.running.remove(req)
        elif req.status is ReqStatus.RECEIVING:
            self.receiving.remove(req)
            self.kv_receiver.cancel(req)
        else:
            self.waiting.remove(req)
        if self.kv_sender is not None and req.bootstrap is not None:
            self._send_kv(req, reason)
        if req.slot is not None:
            self.cache.release(req)
        req.status = ReqStatus.FINISHED
        req.finish_reason = reason
        if self.drafter is not None:
            self.drafter.forget(req)
        self._outputs.append(self.output.finish(req, reason, delta))

    # -- schedule --------------------------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        self._expire()
        self._poll_grammars()
        if self.kv_receiver is not None:
            self._finish_transfers()
        budget = self.config.chunked_prefill_size if self.config.enable_chunked_prefill else UNCHUNKED_BUDGET
        budget = self._schedule_decodes(batch, budget)
        if self.kv_sender is not None:
            budget = self._admit_shorter_prompts(batch, budget)
        budget = self._schedule_inflight(batch, budget)
        if self.kv_receiver is not None:
            self._admit_transfers()
        self._admit_waiting(batch, budget)
        self.refresh_stats()
        return batch

    def _expire(self) -> None:
        """Requests past their deadline (a `timeout`) end, waiting or running, and free their KV; sessions idle past
        their TTL close."""
        self.cache.expire_sessions()
        now = time.time()
        for req in [r for r in (*self.waiting, *self.running, *self.receiving)
                    if r.deadline is not None and now > r.deadline]:
            self._end(req, FinishReason("abort", message="timeout: the request did not finish within its timeout"))

    def _poll_grammars(self) -> None:
        """Requests whose grammar finished compiling become schedulable; a failed or overdue compile ends the
        request with an error (the others are untouched)."""
        now = time.monotonic()
        for req in [r for r in self.waiting if r.grammar_future is not None]:
            future, kind = req.grammar_future, req.params.constraint.kind
            if future.done():
                req.grammar_future = None
                try:
                    req.grammar = RequestGrammar(future.result(), self.grammar)
                except Exception as exc:  # noqa: BLE001 - any compile failure is this request's error only
                    self._end(req, FinishReason("abort", message=f"{kind}: grammar compilation failed: {exc}"))
            elif now > req.grammar_deadline:
                future.cancel()
                req.grammar_future = None
                self._end(req, FinishReason("abort", message=f"{kind}: grammar compilation exceeded "
                                                             f"{self.config.grammar_compile_timeout_s} s"))

    def wait_for_work(self, timeout: float) -> None:
        """Called when a step had nothing to run: sleep until a pending grammar compiles, a storage prefetch is in or
        a KV transfer arrives (or `timeout`), instead of spinning a core the model's threads (and the storage
        reader) need."""
        pending = [f for r in self.waiting for f in (r.grammar_future, r.storage_prefetch) if f is not None]
        if pending:
            concurrent.futures.wait(pending, timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED)
        elif self.receiving:
            self.kv_receiver.wait(timeout)

    def _schedule_decodes(self, batch: ScheduledBatch, budget: int) -> int:
        decoding = [r for r in self.running if r.num_pending == 1]
        for req in sorted(decoding, key=lambda r: r.arrival):
            if req.status is not ReqStatus.RUNNING:
                continue  # retracted earlier in this loop
            draft = self._draft(req, len(decoding), budget)
            if draft and self.cache.alloc(req, req.num_computed, 1 + len(draft)):
                batch.reqs.append(ScheduledReq(req, req.num_computed, 1 + len(draft), draft))
                budget -= 1 + len(draft)
                continue
            while not self.cache.alloc(req, req.num_computed, 1):
                if not self._retract_one(batch, exclude=req):
                    self._end(req, FinishReason("abort", message="KV cache exhausted even after retracting all "
                                                                 "others"))
                    break
            else:
                batch.reqs.append(ScheduledReq(req, req.num_computed, 1))
                budget -= 1
        self.new_token_ratio = max(self.new_token_ratio - self.config.new_token_ratio_decay,
                                   self.config.min_new_token_ratio)
        return budget

    def _draft(self, req: Req, num_decoding: int, budget: int) -> tuple[int, ...]:
        """Speculative tokens for a decoding request (none without `--speculative-algorithm`). A draft fits in the
        step's budget and in free memory: speculation never evicts cached prefixes."""
        if self.drafter is None:
            return ()
        room = min(budget, self.cache.kv.free_count()) - 1
        return self.drafter.propose(req, num_decoding)[:room] if room > 0 else ()

    def _schedule_inflight(self, batch: ScheduledBatch, budget: int) -> int:
        scheduled = {id(s.req) for s in batch.reqs}
        for req in [r for r in self.running if r.num_pending > 1 and id(r) not in scheduled]:
            num, cost = self._continuing_chunk(req, budget)
            if num <= 0:
                break
            if not self.cache.alloc(req, req.num_computed, num):
                break  # memory is short; decodes are already in, the prefill continues next step
            batch.reqs.append(ScheduledReq(req, req.num_computed, num))
            budget -= cost
        return budget

    def _admit_shorter_prompts(self, batch: ScheduledBatch, budget: int) -> int:
        """Prefill server: waiting prompts shorter than what an in-flight chunked prefill has left go first, in up
        to half the step's budget. A prefill server runs no decodes, so its one latency figure is time to first
        token, and shortest-remaining-first is what minimises its mean: a chat turn that arrives while a
        4,000-token prompt is being prefilled shares the next step with it instead of waiting out the whole prompt.
        The long prompt keeps at least half of every step, so it is slowed, never starved. (A colocated server
        keeps Sarathi's order, in-flight chunks first, which bounds how many prompts hold partial KV at once.)"""
        inflight = [r.num_pending for r in self.running if r.num_pending > 1]
        if not inflight or not self.waiting:
            return budget
        share = budget // 2
        left = self._admit_waiting(batch, share, shorter_than=min(inflight))
        return budget - (share - left)

    def _continuing_chunk(self, req: Req, budget: int) -> tuple[int, int]:
        """Tokens of the next chunk of a running request with several pending tokens (a prompt prefilled in
        chunks, or text jump-forward appended), and the budget they use. Each token also attends to the context
        before the chunk, which grows chunk by chunk; counting that (1 + context / C per token) keeps late chunks
        as cheap as the first, so decodes sharing those steps are not stalled by them. Fresh prompts and cached
        prefixes count tokens only (shared prefixes are attended once for all requests)."""
        if budget <= 0:
            return 0, 0
        per_token = 1.0
        if self.config.prefill_context_tokens:
            per_token += req.num_computed / self.config.prefill_context_tokens
        num = min(req.num_pending, max(1, int(budget / per_token)))  # some progress every step, however long
        return num, min(budget, math.ceil(num * per_token))

    def _admit_waiting(self, batch: ScheduledBatch, budget: int, shorter_than: int | None = None) -> int:
        """Admit waiting requests in policy order within `budget` tokens (only those with fewer than
        `shorter_than` tokens to prefill, if given); returns the budget left."""
        if not self.waiting:
            return budget
        ctx = PolicyContext(self.cache.match, self._rng)
        now = time.monotonic()
        starved_before = now - self.config.starvation_timeout_s
        # A decode server's requests that still wait for their KV are admitted by `_admit_transfers`.
        ready = [r for r in self.waiting
                 if r.grammar_future is None and (self.kv_receiver is None or r.bootstrap is None)
                 and (r.storage_prefetch is None or r.storage_prefetch.done() or now > r.prefetch_deadline)]
        starving = sorted((r for r in ready if r.arrival < starved_before), key=lambda r: r.arrival)
        rest = self.policy([r for r in ready if r.arrival >= starved_before], ctx)
        if self.priority_scheduling:
            rest = by_priority(rest)
        prefill_tokens = 0
        for req in starving + rest:
            if not self._has_slot() and not self._preempt_for(req, batch, starved_before):
                break
            # Match again: admitting an earlier request may have evicted what the policy saw cached. This match
            # also brings back what slower cache tiers hold.
            match = self.cache.match(req, load=True)
            extend = req.num_tokens - len(match)
            if shorter_than is not None and extend >= shorter_than:
                continue
            num = min(extend, budget)
            # Without chunking a prompt is prefilled whole; a step still takes at most one context of prefill.
            if num <= 0 or (prefill_tokens and prefill_tokens + num > self.limits.max_context):
                break
            # Compared with every prefill of this step, the in-flight chunk included: its tokens are not cached yet.
            prefilling = [s.req for s in batch.reqs if not s.is_decode]
            if shorter_than is not None:  # the in-flight chunks come after these in this step
                prefilling += [r for r in self.running if r.num_pending > 1]
            if self._shares_uncached_prefix(req, len(match), prefilling):
                continue
            while not self._try_admit(req, match, num, extend, batch):
                if not self._preempt_for(req, batch, starved_before):
                    return budget
                match = self.cache.match(req, load=True)  # the victim's KV went back to the tree: more may be cached
                extend = req.num_tokens - len(match)
                num = min(extend, budget)
            prefill_tokens += num
            budget -= num
            if num < extend:
                break  # this request is now the one in-flight chunked prefill
        return budget

    def _has_slot(self) -> bool:
        return (len(self.running) + len(self.receiving) < self.config.max_running_requests
                and self.cache.req_to_token.free_count() > 0)

    def _preempt_for(self, req: Req, batch: ScheduledBatch, starved_before: float) -> bool:
        """Priority scheduling: retract a running request of lower priority than `req` to make room for it."""
        if not self.priority_scheduling:
            return False
        victim = priority_victim(self.running, req, starved_before)
        if victim is None:
            return False
        self._retract(victim, batch, "to make room for a request of higher priority")
        self.stats.num_priority_preemptions += 1
        return True

    def _try_admit(self, req: Req, match, num: int, extend: int, batch: ScheduledBatch) -> bool:
        """Admit `req` with its first `num` tokens if memory allows; False leaves it waiting, untouched."""
        # Lock the matched prefix first: locking takes those tokens out of the evictable pool, so the memory
        # check must see the state after the lock.
        self.cache.admit(req, match)
        if not self._memory_allows(req, num, extend) or not self.cache.alloc(req, req.num_computed, num):
            self.cache.release(req)
            req.num_computed = 0
            return False
        self.waiting.remove(req)
        if req.num_retractions == 0:
            req.cached_prompt_tokens = req.num_computed
            self.stats.cache_hit_tokens += req.cached_prompt_tokens
            self.stats.cache_hit_host_tokens += match.from_host
            self.stats.cache_hit_storage_tokens += match.from_storage
            self.stats.prompt_tokens += len(req.prompt_ids)
        req.status = ReqStatus.RUNNING
        self.running.append(req)
        batch.reqs.append(ScheduledReq(req, req.num_computed, num))
        return True

    def _memory_allows(self, req: Req, num: int, extend: int) -> bool:
        """Admit only if this chunk plus the decode room running requests will still need fits.

        The room is estimated as remaining max_new_tokens x new_token_ratio; the ratio decays while memory is
        plentiful and jumps back up after a retraction (an estimate that adapts to how long outputs really are).
        """
        others = (r for r in (*self.running, *self.receiving) if r is not req)
        reserve = sum(r.remaining_new_tokens for r in others) * self.new_token_ratio
        own = req.remaining_new_tokens * self.new_token_ratio if num == extend else 0
        return self.cache.available() >= num + reserve + own

    @staticmethod
    def _shares_uncached_prefix(req: Req, cached: int, prefilling: list[Req]) -> bool:
        if not prefilling:
            return False
        head = req.all_ids(cached, cached + SHARED_PREFIX_DEFER_TOKENS)
        if len(head) < SHARED_PREFIX_DEFER_TOKENS:
            return False
        return any(other.all_ids(cached, cached + SHARED_PREFIX_DEFER_TOKENS) == head for other in prefilling)

    def _retract_one(self, batch: ScheduledBatch, exclude: Req) -> bool:
        """Preempt a running request (the policy's victim) to free its KV; it keeps its output and waits first."""
        candidates = [r for r in self.running if r is not exclude]
        if not candidates:
            return False
        self._retract(retraction_victim(candidates), batch, "to free KV memory")
        self.new_token_ratio = min(self.new_token_ratio + self.config.retract_new_token_ratio_step, 1.0)
        return True

    def _retract(self, victim: Req, batch: ScheduledBatch, why: str) -> None:
        batch.reqs = [s for s in batch.reqs if s.req is not victim]
        self.running.remove(victim)
        self.cache.release(victim)
        victim.status = ReqStatus.WAITING
        victim.num_computed = 0
        victim.num_retractions += 1
        self.stats.num_retractions += 1
        self.waiting.appendleft(victim)
        logger.info("retracted %s (%d tokens) %s", victim.rid, victim.num_tokens, why)

    # -- disaggregation -------------------------------------------------------------------------------------
    def _send_kv(self, req: Req, reason: FinishReason) -> None:
        """Prefill side, as a request ends: its first token and the prompt's KV go to the decode server (from
        where that server's own cache ends, if it registered already)."""
        boot, req.bootstrap = req.bootstrap, None
        if reason.type == "abort":
            self.kv_sender.send(boot, FirstToken(None, None, [], 0, error=reason.message), None, 0)
            return
        registered = self.kv_sender.registration(boot.room)
        skip = registered["skip"] if registered else 0
        indices = self.cache.req_to_token.table[req.slot, skip:len(req.prompt_ids)]
        lp = req.output_logprobs[0] if req.output_logprobs else None
        first = FirstToken(req.output_ids[0] if req.output_ids else None, lp, list(req.prompt_logprobs),
                           req.cached_prompt_tokens)
        self.kv_sender.send(boot, first, self.cache.kv.gather(indices).cpu(), skip)

    def _admit_transfers(self) -> None:
        """Decode side: give waiting requests slots and KV for their prompts (past what this server has cached),
        in arrival order while memory allows, and ask the prefill server for the rest."""
        for req in [r for r in self.waiting if r.bootstrap is not None and r.grammar_future is None]:
            if not self._has_slot():
                return
            match = self.cache.match(req)
            extend = req.num_tokens - len(match)
            self.cache.admit(req, match)
            if not self._memory_allows(req, extend, extend) or not self.cache.alloc(req, req.num_computed, extend):
                self.cache.release(req)
                req.num_computed = 0
                return  # first come, first served: later requests wait behind this one
            self.waiting.remove(req)
            req.status = ReqStatus.RECEIVING
            self.receiving.append(req)
            self.kv_receiver.expect(req, req.bootstrap, req.num_computed, extend)

    def _finish_transfers(self) -> None:
        """Decode side: requests whose KV arrived start decoding from the prefill server's first token."""
        for done in self.kv_receiver.poll():
            req = done.token
            if req.status is not ReqStatus.RECEIVING:
                continue  # ended while its KV was on the way (its slots were freed then)
            if done.error is not None:
                self._end(req, FinishReason("abort", message=f"{KV_TRANSFER_FAILED}: {done.error}"))
                continue
            prompt_len = len(req.prompt_ids)
            self.cache.kv.scatter(self.cache.req_to_token.table[req.slot, done.skip:prompt_len], done.kv)
            self.receiving.remove(req)
            req.status, req.bootstrap, req.num_computed = ReqStatus.RUNNING, None, prompt_len
            self.running.append(req)
            req.cached_prompt_tokens = done.first.cached_tokens
            self.stats.cache_hit_tokens += req.cached_prompt_tokens
            self.stats.prompt_tokens += prompt_len
            req.prompt_logprobs.extend(done.first.prompt_logprobs)
            self.cache.share_computed_prefix(req)  # the next turn of this conversation finds it here
            token = done.first.token if done.first.token is not None else 0  # max_new_tokens 0: ends unsampled
            delta, reason = self.output.advance(req, [token], done.first.logprob, req.unsent_prompt_logprobs())
            self.stats.generated_tokens += len(delta.token_ids)
            if reason is None:
                self._outputs.append(delta)
            else:
                self._end(req, reason, delta)

    # -- process output --------------------------------------------------------------------------------------
    def process_output(self, batch: ScheduledBatch, outputs: list[ModelOutput]) -> list[RequestOutput]:
        for sched, out in zip(batch.reqs, outputs, strict=True):
            req = sched.req
            if req.status is not ReqStatus.RUNNING:
                continue  # aborted while the step ran
            req.num_computed = sched.end - len(sched.draft)
            req.prompt_logprobs.extend(out.prompt_logprobs)
            if not sched.is_decode and not sched.draft:
                # Share a prefill with others at once (not when the request ends): a request deferred by the
                # in-step dedupe, or the next turn of a conversation, hits it while this one still decodes.
                self.cache.share_computed_prefix(req)
            if out.next_token_id is None:
                continue  # a chunk before the last: its prompt logprobs go out with the first token
            delta, reason = self.output.advance(req, [out.next_token_id, *out.extra_token_ids], out.next_logprobs,
                                                req.unsent_prompt_logprobs())
            self.stats.generated_tokens += len(delta.token_ids)
            if sched.draft:
                # The accepted drafts' KV is valid (they are the tokens now at those positions); the rest is freed.
                self.drafter.record(req, len(sched.draft), len(out.extra_token_ids))
                req.num_computed = min(sched.start + 1 + len(out.extra_token_ids), req.num_tokens - 1)
                if reason is None:
                    self.cache.trim(req)
            if reason is None:
                self._outputs.append(delta)
            else:
                self._end(req, reason, delta)
        return self.drain_outputs()

    # -- figures and checks ----------------------------------------------------------------------------------
    def refresh_stats(self) -> SchedulerStats:
        self.stats.num_running = len(self.running)
        self.stats.num_waiting = len(self.waiting)
        self.stats.num_receiving = len(self.receiving)
        self.stats.kv_used_tokens = self.cache.used()
        return self.stats

    def check_integrity(self) -> None:
        self.cache.check_integrity([*self.running, *self.receiving])

    def flush_cache(self) -> bool:
        """Drop all cached KV. Refused (False) while requests run: their KV is in the tree."""
        if not self.idle:
            return False
        self.cache.flush()
        return True
