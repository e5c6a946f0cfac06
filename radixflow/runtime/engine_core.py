"""The runtime in one object: model, KV memory, scheduler, and the step loop.

`EngineCore.step()` is the whole engine step (schedule -> run -> process output). `serve_forever` wraps it
in a loop fed by an inbox; the in-process `Engine` runs that loop on a thread, the server in its own process.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import logging
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from radixflow.errors import InvalidRequestError
from radixflow.runtime.cache.events import CacheEventLog
from radixflow.runtime.cache.hiradix_cache import HiRadixCache
from radixflow.runtime.cache.kv_pool import KVPool, ReqToTokenPool
from radixflow.runtime.cache.manager import CacheManager
from radixflow.runtime.cache.prefix_cache import NoPrefixCache, PrefixCache
from radixflow.runtime.cache.radix_cache import RadixCache
from radixflow.runtime.cache.storage import KVPageStore, make_backend
from radixflow.runtime.config import EngineConfig
from radixflow.runtime.constrained.grammar import GrammarCompiler
from radixflow.runtime.disaggregation.transfer import TRANSFER_BACKENDS, KVReceiver, KVSender
from radixflow.runtime.inbox import AbortRequest, AddRequest, Call, InboxItem
from radixflow.runtime.limits import RequestLimits
from radixflow.runtime.model import blockq
from radixflow.runtime.model.attention import paged_kernels_supported
from radixflow.runtime.model.compiled import CompiledDecode
from radixflow.runtime.model.llama import LlamaModel, ModelArgs, prepack_onednn, quantize_int8, rope_inv_freq
from radixflow.runtime.model.loader import load_weights
from radixflow.runtime.model.parallel import (
    LeaderForward,
    TensorParallel,
    TensorParallelError,
    check_divisible,
    shard_weights,
    start_leader,
)
from radixflow.runtime.model.quant import int4_kernel_available
from radixflow.runtime.model.runner import ModelRunner
from radixflow.runtime.model_source import ModelSource, resolve_model
from radixflow.runtime.scheduler.output import RequestOutput
from radixflow.runtime.scheduler.ranker import EMBEDDED_RANKER, RankerLoadError, load_ranker
from radixflow.runtime.scheduler.scheduler import Scheduler
from radixflow.runtime.scheduler.speculative import SpeculativeStats
from radixflow.runtime.tokenizer import eos_token_ids, load_tokenizer

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_WEIGHT_FORMATS = ("auto", "int4", "fp32")
_ATTENTION_BACKENDS = ("auto", "torch_native")


@dataclass
class LoadedModel:
    source: ModelSource
    args: ModelArgs
    model: LlamaModel
    tokenizer: object
    eos_ids: frozenset[int]


def dtype_of(config: EngineConfig) -> torch.dtype:
    return _DTYPES[config.model.dtype]


def load_model(config: EngineConfig, tp: TensorParallel | None = None) -> LoadedModel:
    """The model (with tensor parallelism: this rank's shard of it), its tokenizer and EOS ids."""
    mc = config.model
    if mc.dtype not in _DTYPES:
        raise ValueError(f"dtype: {mc.dtype!r} is not one of {', '.join(_DTYPES)}")
    if mc.quantization not in (None, "int8"):
        raise ValueError(f"quantization: {mc.quantization!r} is not supported (use int8, or none)")
    if mc.weight_format not in _WEIGHT_FORMATS:
        raise ValueError(f"weight_format: {mc.weight_format!r} is not one of {', '.join(_WEIGHT_FORMATS)}")
    if mc.attention_backend not in _ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend: {mc.attention_backend!r} is not one of {', '.join(_ATTENTION_BACKENDS)}")
    if mc.quantization == "int8" and (mc.device != "cpu" or mc.dtype != "float32"):
        raise ValueError("quantization: int8 runs on the CPU with dtype float32 activations")
    if mc.tp_size < 1:
        raise ValueError(f"tp_size: must be >= 1, got {mc.tp_size}")
    if mc.num_threads or mc.tp_size > 1:  # tensor-parallel ranks share the cores unless told otherwise
        torch.set_num_threads(mc.num_threads or max(1, (os.cpu_count() or 1) // mc.tp_size))
    device = torch.device(mc.device)
    source = resolve_model(mc.model_path)
    checkpoint = load_weights(source, _DTYPES[mc.dtype])
    args = checkpoint.args
    weights = checkpoint.weights
    if tp is not None:
        check_divisible(args, tp.size)
        weights = shard_weights(weights, args, tp)
        args = dataclasses.replace(args, num_heads=args.num_heads // tp.size,
                                   num_kv_heads=args.num_kv_heads // tp.size,
                                   intermediate_size=args.intermediate_size // tp.size)
    with torch.device("meta"):
        model = LlamaModel(args, tp)
    model = model.to_empty(device=device).to(_DTYPES[mc.dtype])
    # `to_empty` leaves buffers uninitialised too, and the RoPE frequencies are not in the checkpoint.
    model.inv_freq = rope_inv_freq(args).float().to(device)
    model.load_weights(weights)
    model.eval()
    if mc.quantization == "int8":
        quantize_int8(model)
    elif mc.onednn_linear and device.type == "cpu" and mc.dtype == "float32" and not prepack_onednn(model):
        logger.info("oneDNN linear layers unavailable in this torch build; using torch's matmul")
    kept_4bit = mc.weight_format != "fp32" and mc.quantization is None and checkpoint.int4
    if kept_4bit and tp is not None:
        logger.info("4-bit weights dequantized: the block-quant kernels are not split for tensor parallelism")
    elif kept_4bit:
        # On other devices (or a torch without the CPU kernel) the dequantized weights serve every call.
        if mc.dtype == "float32" and int4_kernel_available(device):
            kernel = "blockq" if mc.weight_format == "auto" and blockq.available() else "int4"
            logger.info("%s kernel for %d linear layers", kernel, model.use_int4(checkpoint.int4, kernel))
        else:
            logger.info("4-bit weights dequantized: the block-quant kernels need the CPU and dtype float32")
    model.paged_kernels = (mc.attention_backend == "auto"
                           and paged_kernels_supported(args.num_heads, args.num_kv_heads, args.head_dim,
                                                       _DTYPES[mc.dtype], device) and blockq.available())
    logger.info("attention: %s", "paged kernels" if model.paged_kernels else "torch SDPA")
    tokenizer = load_tokenizer(source, mc.chat_template)
    return LoadedModel(source, args, model, tokenizer, eos_token_ids(tokenizer, source))


def _primary_eos(loaded: LoadedModel) -> int | None:
    """The EOS a grammar allows at its end: the tokenizer's own if it is among the model's EOS ids."""
    eos = getattr(loaded.tokenizer, "eos_token_id", None)
    return eos if eos in loaded.eos_ids or not loaded.eos_ids else min(loaded.eos_ids)


def kv_pool_size(config: EngineConfig, args: ModelArgs) -> int:
    if config.cache.max_total_tokens:
        return config.cache.max_total_tokens
    per_token = KVPool.bytes_per_token(args.num_layers, args.num_kv_heads, args.head_dim,
                                       _DTYPES[config.model.dtype])
    return int(config.cache.kv_cache_gb * 2**30 // per_token)


# Attention kernels reach a smaller share of the machine's peak than GEMMs (on the CPU measured, torch's flash
# attention ran at about 0.4x oneDNN's GEMM rate; bench/RESULTS.md). On other devices assume parity.
_ATTENTION_EFFICIENCY = {"cpu": 0.4}


def prefill_context_tokens(args: ModelArgs, device: torch.device) -> int:
    """The context length at which a prefill token's attention costs as much as its linear layers: per layer,
    2 * linear params FLOPs against 4 * heads * head_dim * context, scaled by how fast attention runs relative to
    GEMMs (SmolLM2-135M on a CPU: 3,070 * 0.4 = 1,228)."""
    q_out, kv_out = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    linear = args.hidden_size * (2 * q_out + 2 * kv_out) + 3 * args.hidden_size * args.intermediate_size
    return max(1, int(_ATTENTION_EFFICIENCY.get(device.type, 1.0) * linear / (2 * q_out)))


class EngineCore:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None):
        self.config = config
        self.tp, self._followers = start_leader(config) if config.model.tp_size > 1 else (None, [])
        self.loaded = loaded or load_model(config, self.tp)
        args = self.loaded.model.args  # this rank's shape under tensor parallelism: its KV heads
        device = torch.device(config.model.device)
        dtype = _DTYPES[config.model.dtype]
        pool_size = kv_pool_size(config, args)
        self.max_context = min(config.model.context_length or args.max_position, args.max_position)
        kv = KVPool(pool_size, args.num_layers, args.num_kv_heads, args.head_dim, dtype, device)
        req_to_token = ReqToTokenPool(config.scheduler.max_running_requests, self.max_context + 1, device)
        self.cache = CacheManager(kv, req_to_token, self._prefix_cache(kv, args, dtype),
                                  config.cache.session_ttl_s)
        self.limits = RequestLimits(self.max_context, pool_size, args.vocab_size)
        self.grammar = GrammarCompiler(self.loaded.tokenizer, args.vocab_size, _primary_eos(self.loaded),
                                      config.scheduler.grammar_cache_size)
        if config.scheduler.prefill_context_tokens is None:
            config = dataclasses.replace(config, scheduler=dataclasses.replace(
                config.scheduler, prefill_context_tokens=prefill_context_tokens(args, device)))
            self.config = config
        scorer = None
        if config.scheduler.schedule_policy == "ltr":
            scorer = self._length_scorer()
            if scorer is None:
                config = dataclasses.replace(config, scheduler=dataclasses.replace(config.scheduler,
                                                                                   schedule_policy="fcfs"))
                self.config = config
        self.kv_sender, self.kv_receiver = self._kv_transfer(args, dtype)
        self.scheduler = Scheduler(config.scheduler, self.cache, self.loaded.tokenizer, self.limits, self.grammar,
                                   scorer, self.kv_sender, self.kv_receiver)
        self.runner = ModelRunner(self.loaded.model, kv, req_to_token, device, config.seed,
                                  config.scheduler.lazy_grammar_masks,
                                  forward=LeaderForward(self.loaded.model, self.tp) if self.tp else None,
                                  compiled=self._compiled_decode(kv))
        self._was_busy = False

    def _compiled_decode(self, kv: KVPool) -> CompiledDecode | None:
        mc = self.config.model
        if not mc.enable_torch_compile:
            return None
        if self.tp is not None:
            # The followers run their shards eagerly in lockstep with rank 0; one compiled graph per rank around
            # the collectives is not built.
            raise ValueError("enable_torch_compile: not supported with --tp-size > 1")
        compiled = CompiledDecode(self.loaded.model, kv, mc.torch_compile_max_bs)
        compiled.warmup()
        return compiled

    def _prefix_cache(self, kv: KVPool, args: ModelArgs, dtype: torch.dtype) -> PrefixCache:
        cc = self.config.cache
        events = CacheEventLog(1024) if cc.enable_cache_events else None
        if cc.disable_radix_cache:
            if cc.enable_hierarchical_cache:
                raise ValueError("enable_hierarchical_cache: needs the radix cache (drop --disable-radix-cache)")
            return NoPrefixCache()
        if not cc.enable_hierarchical_cache:
            if cc.hicache_storage_backend is not None:
                raise ValueError("hicache_storage_backend: needs --enable-hierarchical-cache")
            return RadixCache(kv.free, events)
        if self.tp is not None:
            # Each follower rank holds its own heads' KV in its own pool, which the tiers (run by rank 0) do not see.
            raise ValueError("enable_hierarchical_cache: not supported with tp_size > 1")
        per_token = KVPool.bytes_per_token(args.num_layers, args.num_kv_heads, args.head_dim, dtype)
        if cc.hicache_size > 0:
            host_tokens = int(cc.hicache_size * 2**30 / per_token)
        else:
            host_tokens = int(kv.size * cc.hicache_ratio)
        if host_tokens < 1:
            raise ValueError(f"hicache_ratio / hicache_size: the host pool would hold {host_tokens} tokens")
        on_gpu = kv.k[0].device.type == "cuda"
        host = KVPool(host_tokens, args.num_layers, args.num_kv_heads, args.head_dim, dtype, torch.device("cpu"),
                      pin_memory=on_gpu)
        storage = None
        if cc.hicache_storage_backend is not None:
            backend = make_backend(cc.hicache_storage_backend, cc.hicache_storage_backend_extra_config)
            shape = (2, args.num_layers, cc.page_size, args.num_kv_heads, args.head_dim)
            storage = KVPageStore(backend, cc.page_size, self._kv_identity(args, dtype), shape, dtype)
        return HiRadixCache(kv, host, cc.hicache_write_policy, storage, events)

    def _kv_identity(self, args: ModelArgs, dtype: torch.dtype) -> str:
        """What KV pages depend on: the weights (a digest of the token embeddings and of every layer's norms, which
        tell models and their fine-tunes apart), the way the linear layers run and the KV layout."""
        mc = self.config.model
        digest = hashlib.sha256()
        for name, param in self.loaded.model.named_parameters():
            if name.startswith("embed_tokens") or "norm" in name:
                digest.update(param.detach().to("cpu", torch.float32).contiguous().view(torch.uint8).numpy())
        weights = digest.hexdigest()
        return (f"radixflow-kv-1|{weights}|{mc.weight_format}|{mc.quantization}|{args.num_layers}x"
                f"{args.num_kv_heads}x{args.head_dim}|{dtype}|{self.config.cache.page_size}")

    def _kv_transfer(self, args: ModelArgs, dtype: torch.dtype) -> tuple[KVSender | None, KVReceiver | None]:
        """Prefill/decode disaggregation: the prefill side's sender (it listens on the bootstrap port) or the
        decode side's receiver."""
        dc = self.config.disaggregation
        if dc.disaggregation_mode is None:
            return None, None
        if dc.disaggregation_mode not in ("prefill", "decode"):
            raise ValueError(f"disaggregation_mode: {dc.disaggregation_mode!r} is not one of prefill, decode")
        if dc.disaggregation_transfer_backend not in TRANSFER_BACKENDS:
            raise ValueError(f"disaggregation_transfer_backend: {dc.disaggregation_transfer_backend!r} is not one "
                             f"of {', '.join(TRANSFER_BACKENDS)}")
        if self.tp is not None:
            raise ValueError("disaggregation_mode: not supported with tp_size > 1 (each rank would send its shard)")
        if dc.disaggregation_mode == "prefill":
            return KVSender(dc.disaggregation_bootstrap_port, dc.disaggregation_transfer_timeout_s), None
        return None, KVReceiver(args.num_layers, args.num_kv_heads, args.head_dim, dtype,
                                dc.disaggregation_transfer_timeout_s, self.config.scheduler.max_running_requests)

    def _length_scorer(self):
        """`ltr`'s prompt scorer, or None (with a warning: the engine then runs fcfs) when there is no ranker for
        this model."""
        path = self.config.scheduler.ltr_ranker_path
        if path is None and self.loaded.source.path != resolve_model(None).path:
            logger.warning("schedule_policy ltr: no ranker ships for %s (give --ltr-ranker-path); using fcfs",
                           self.loaded.source.path.name)
            return None
        embedding = self.loaded.model.embed_tokens.weight.detach()
        try:
            ranker = load_ranker(Path(path) if path else EMBEDDED_RANKER, embedding)
        except RankerLoadError as exc:
            logger.warning("schedule_policy ltr: %s; using fcfs", exc)
            return None
        return lambda ids: ranker.score(embedding, ids)

    def step(self) -> list[RequestOutput]:
        """One engine step. A failing forward aborts the requests of that batch, never the engine."""
        try:
            batch = self.scheduler.schedule()
        except Exception as exc:  # noqa: BLE001 - a scheduler bug must fail requests loudly, not hang them
            logger.exception("scheduling failed; aborting all requests")
            self.scheduler.abort_all(f"internal scheduler error: {exc}")
            return self.scheduler.drain_outputs()
        if not batch:
            self.scheduler.wait_for_work(timeout=0.01)  # nothing runnable: grammars compiling or KV on the way
            return self.scheduler.drain_outputs()
        try:
            output = self.runner.run(batch)
        except TensorParallelError:
            raise  # the ranks are out of step: this engine cannot go on (the server restarts the scheduler)
        except Exception as exc:  # noqa: BLE001 - one bad batch must not take the engine down
            logger.exception("forward failed for requests %s", [s.req.rid for s in batch.reqs])
            for s in batch.reqs:
                self.scheduler.abort(s.req.rid, f"internal error: {exc}")
            return self.scheduler.drain_outputs()
        return self.scheduler.process_output(batch, output)

    def check_integrity(self) -> None:
        self.scheduler.check_integrity()

    def close(self) -> None:
        """Stop the tensor-parallel followers and the KV transfer threads (those there are)."""
        for transfer in (self.kv_sender, self.kv_receiver):
            if transfer is not None:
                transfer.close()
        storage = getattr(self.cache.prefix_cache, "storage", None)
        if storage is not None:
            storage.close()
        if self.tp is not None:
            self.runner.forward.shutdown()
            for proc in self._followers:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
            self.tp = None

    def stats(self) -> dict:
        """Scheduler figures plus KV pool and cache sizes (the engine's `stats()`, the server's stats call)."""
        s = self.scheduler.refresh_stats()
        g = self.grammar.stats
        masker = self.runner.masker
        prefix_cache = self.cache.prefix_cache
        drafter = self.scheduler.drafter
        spec = drafter.stats if drafter is not None else SpeculativeStats()
        return {**s.__dict__, "cache_hit_rate": s.cache_hit_rate, "kv_free_tokens": self.cache.kv.free_count(),
                "spec_verify_steps": spec.verify_steps, "spec_draft_tokens": spec.draft_tokens,
                "spec_accepted_tokens": spec.accepted_tokens, "spec_accept_length": spec.accept_length,
                **self._transfer_stats(),
                "grammar_compiled": g.compiled, "grammar_cache_hits": g.cache_hits,
                "grammar_compile_seconds": g.compile_seconds, "jump_forward_tokens": g.jump_forward_tokens,
                "jump_forward_steps": g.jump_forward_steps,
                "grammar_mask_us_per_row": 1e6 * masker.mask_seconds / max(masker.mask_rows, 1),
                "grammar_lazy_refusals": masker.lazy_refusals,
                "cached_tokens_in_tree": prefix_cache.total_size(),
                "kv_evictable_tokens": prefix_cache.evictable_size(),
                "sessions_open": len(self.cache.sessions),
                "session_retained_tokens": sum(prefix_cache.session_sizes().values()),
                **prefix_cache.tier_stats()}

    def _transfer_stats(self) -> dict:
        transfer = self.kv_sender or self.kv_receiver
        if transfer is None:
            return {}
        t = transfer.stats
        return {"kv_transfers": t.transfers, "kv_transfer_failures": t.failures, "kv_transfer_bytes": t.bytes,
                "kv_transfer_seconds": t.seconds}

    def serve_forever(self, inbox: queue.Queue[InboxItem], emit: Callable[[list[RequestOutput]], None],
                      stop: threading.Event) -> None:
        """Drain `inbox` (runtime/inbox.py), step, and hand each step's outputs to `emit(list)` in one call (one
        message per step across a process boundary)."""
        while not stop.is_set():
            self._drain(inbox, block=self.scheduler.idle)
            if self.scheduler.idle:
                if self._was_busy:
                    self._was_busy = False
                    self._idle_integrity_check()
                    release_free_memory()
                outputs = self.scheduler.drain_outputs()
            else:
                self._was_busy = True
                outputs = self.step()
            if outputs:
                emit(outputs)

    def _idle_integrity_check(self) -> None:
        """A leak shows at once, not hours later. It is logged, not raised: the engine keeps serving."""
        try:
            self.check_integrity()
        except Exception:  # noqa: BLE001
            logger.exception("KV cache integrity check failed")

    def _drain(self, inbox: queue.Queue[InboxItem], block: bool) -> None:
        try:
            item = inbox.get(timeout=0.05) if block else inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(item)
            try:
                item = inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, item: InboxItem) -> None:
        match item:
            case AddRequest(req=req):
                try:
                    self.scheduler.add_request(req)
                except InvalidRequestError as exc:  # callers validate first; this is the last line of defence
                    self.scheduler.reject(req.rid, str(exc))
            case AbortRequest(rid=rid):
                self.scheduler.abort(rid)
            case Call(fn=fn):
                fn()
            case _:
                raise TypeError(f"unexpected inbox item {item!r}")


_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None  # the process's own symbols: glibc's


def release_free_memory() -> None:
    """Give the C heap's free pages back to the system (glibc's malloc_trim), when the engine goes idle. A step's
    tensors come in as many sizes as there are batch shapes; glibc keeps the freed space in its heap, fragmented,
    so a long-running server's memory grew with every burst of traffic (bench/RESULTS.md, the soak)."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)
