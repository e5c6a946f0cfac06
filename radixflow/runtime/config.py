"""Configuration: frozen dataclasses, one per component, composed into `EngineConfig`.

Each component receives only its own part. The CLI (`radixflow.cli`) builds its flags from these fields, so a
new field is a new flag with no further wiring. A field's `metadata["help"]` is its CLI help text.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass(frozen=True)
class ModelConfig:
    model_path: str | None = _help(
        "GGUF file or Hugging Face style directory; default: the embedded SmolLM2-135M-Instruct", default=None
    )
    device: str = _help("torch device: cpu, cuda, cuda:1, ...", default="cpu")
    dtype: str = _help("weights and activations dtype (float32 on CPU; bfloat16/float16 on GPU)", default="float32")
    context_length: int | None = _help("maximum tokens per request (prompt + output); default: the model's",
                                       default=None)
    num_threads: int | None = _help("torch intra-op threads on CPU; default: all cores (shared out between "
                                    "tensor-parallel ranks)", default=None)
    tp_size: int = _help(
        "tensor parallelism: split the model's heads, MLP and vocabulary over this many processes (one "
        "torch.distributed group: gloo on the CPU, NCCL on GPUs); the scheduler runs on rank 0", default=1)
    chat_template: str | None = _help("Jinja chat template (file path or literal) overriding the model's", default=None)
    onednn_linear: bool = _help("on CPU in float32, run multi-row linear layers on oneDNN with prepacked weights "
                                "(faster than MKL on CPUs where MKL skips AVX-512); off: torch's default matmul",
                                default=True)
    weight_format: str = _help(
        "auto: the linear layers a GGUF file stores as Q4_0, Q4_1 or Q8_0 also stay in their blocks, and "
        "decode-sized calls run on radixflow's block-quant kernel (x86 CPUs with AVX512-VNNI or AVX2; integer dot "
        "products with the inputs rounded to about 15 bits per block of 32) or else torch's int4 kernel; int4: "
        "torch's int4 kernel (bf16 inside) for all of them; fp32: dequantized weights only", default="auto")
    attention_backend: str = _help(
        "attention: auto (radixflow's paged decode and extend kernels where they run: x86 CPUs with AVX2, float32; "
        "they read each request's K/V where they sit in the pool), torch_native (gather the K/V, then torch's SDPA: "
        "always the path for shared-prefix attention and long prefill chunks)", default="auto")
    enable_torch_compile: bool = _help(
        "compile pure-decode steps with torch.compile (Inductor: fused C++ loops on CPU, Triton on GPU), which "
        "removes most of a small batch's per-op overhead; compiling at startup takes a minute or more per batch-size "
        "class the first time (then Inductor's on-disk cache)", default=False)
    torch_compile_max_bs: int = _help(
        "largest decode batch the compiled step serves; larger ones run eager (on a 2-core CPU the compiled step "
        "won at 1 and 8 requests and lost at 32: bench/RESULTS.md)", default=8)
    quantization: str | None = _help("int8: linear layers in int8 with dynamic activation quantization (CPU, "
                                     "fbgemm); several times faster GEMMs, logits no longer bit-equal to fp32",
                                     default=None)


@dataclass(frozen=True)
class CacheConfig:
    max_total_tokens: int | None = _help("KV pool size in tokens; default: derived from --kv-cache-gb", default=None)
    kv_cache_gb: float = _help("memory budget for the KV pool, in GiB", default=1.0)
    disable_radix_cache: bool = _help("do not reuse KV across requests (ablation)", default=False)
    enable_cache_events: bool = _help(
        "log the radix cache's inserted and evicted prefixes (the last 1,024) for a router building its view of "
        "this server's cache from them (GET /cache_events; radixflow router --tree-source events)", default=False)
    enable_hierarchical_cache: bool = _help(
        "keep KV evicted from the device pool in a host-memory pool (L2) and, with --hicache-storage-backend, in "
        "storage (L3); a match brings it back instead of computing it again", default=False)
    hicache_ratio: float = _help("host pool size as a multiple of the device pool's", default=2.0)
    hicache_size: float = _help("host pool size in GiB; overrides --hicache-ratio when > 0", default=0.0)
    hicache_write_policy: str = _help(
        "when KV is copied to the host pool: write_through (as it enters the cache), write_through_selective "
        "(once it has been matched twice; cold entries are dropped, not demoted), write_back (when it is "
        "evicted from the device pool)", default="write_through")
    hicache_storage_backend: str | None = _help(
        "storage tier (L3) for the hierarchical cache: file (a directory; survives restarts) or redis (a Redis "
        "server several servers can share); pages of --page-size tokens keyed by a hash chain of the tokens",
        default=None)
    hicache_storage_backend_extra_config: str | None = _help(
        "JSON options of the storage backend: file takes dir (default ~/.cache/radixflow/hicache); redis takes "
        "url (default redis://127.0.0.1:6379/0), prefix, ttl_s", default=None)
    page_size: int = _help("tokens per page of the storage tier (the device and host pools are token-granular)",
                           default=64)
    session_ttl_s: float = _help(
        "a session (a request's session_id) whose last request finished this many seconds ago is closed and its "
        "retained prefix released; POST /open_session may set its own", default=600.0)


@dataclass(frozen=True)
class SchedulerConfig:
    max_running_requests: int = _help("requests decoding at once (request-table slots)", default=64)
    chunked_prefill_size: int = _help("token budget of one step; a longer prompt is prefilled in chunks", default=512)
    enable_chunked_prefill: bool = _help("split long prompts across steps (stall-free batching)", default=True)
    prefill_context_tokens: int | None = _help(
        "a continuing prefill chunk's tokens each cost 1 + (context before the chunk) / this many tokens of the "
        "step budget, so the late chunks of a long prompt shrink and every step costs about the same; 0 counts "
        "tokens only; default: derived from the model's shape", default=None)
    schedule_policy: str = _help(
        "waiting-queue order: lpm, dfs-weight, fcfs, lof, random, ltr (shortest predicted output first: a ranker "
        "learned over the model's input embeddings; --ltr-ranker-path), priority (a request's `priority`, then "
        "fcfs)", default="lpm")
    ltr_ranker_path: str | None = _help(
        "ltr: the ranker's weights (python -m radixflow.tools.train_ranker); default: the one shipped for the "
        "embedded SmolLM2. A missing or mismatched file falls back to fcfs with a warning", default=None)
    enable_priority_scheduling: bool = _help(
        "order waiting requests by their `priority` (lower value first) before the policy's own order, and "
        "preempt a running request of lower priority when a waiting one finds no room", default=False)
    starvation_timeout_s: float = _help("a request waiting longer than this is admitted first (whatever its "
                                        "predicted length or priority) and is not preempted for priority",
                                        default=10.0)
    new_token_ratio: float = _help("initial share of max_new_tokens reserved for running decodes", default=0.7)
    min_new_token_ratio: float = _help("floor of that share as it adapts", default=0.15)
    new_token_ratio_decay: float = _help("per-step decay of the reserved share", default=0.002)
    retract_new_token_ratio_step: float = _help("rise of the reserved share after each retraction (capped at 1)",
                                                default=0.1)
    enable_jump_forward: bool = _help("constrained decoding appends text the grammar forces in one extend step "
                                      "instead of decoding it token by token", default=True)
    grammar_compile_timeout_s: float = _help("a constrained request whose grammar takes longer to compile fails",
                                             default=30.0)
    lazy_grammar_masks: bool = _help(
        "greedy constrained requests check the model's choice against the grammar and fill the full token mask "
        "only when it is refused (same tokens as masking first)", default=True)
    grammar_cache_size: int = _help("compiled grammars kept, keyed by their spec (LRU)", default=256)
    speculative_algorithm: str | None = _help(
        "ngram: draft-free speculative decoding; decoding requests draft the continuation of their recent tokens "
        "from the radix tree or from their own earlier tokens, verified in one step (greedy: the tokens plain decoding "
        "picks, except at bf16 near-ties on the int4 weights; sampled: the same distribution)", default=None)
    speculative_num_draft_tokens: int = _help("tokens drafted per request and step", default=4)
    speculative_ngram_min_match_window_size: int = _help("shortest suffix of a request's tokens looked up",
                                                         default=2)
    speculative_ngram_max_match_window_size: int = _help("longest suffix of a request's tokens looked up", default=8)
    speculative_max_batch_size: int = _help(
        "draft only while at most this many requests decode: a verify step costs about one decode step at small "
        "batches, and more rows than that once the matmuls are compute-bound", default=4)


@dataclass(frozen=True)
class DisaggregationConfig:
    disaggregation_mode: str | None = _help(
        "prefill/decode disaggregation: prefill (compute prompts and their first token, send the KV to the "
        "request's decode server) or decode (receive prompts' KV, decode); requests come through radixflow "
        "router --pd-disaggregation. Default: both phases here", default=None)
    disaggregation_bootstrap_port: int = _help(
        "prefill mode: the port decode servers connect to for KV transfers (a TCPStore and gloo groups)",
        default=8998)
    disaggregation_transfer_backend: str = _help(
        "how KV moves between the servers: gloo (torch.distributed point-to-point over TCP; on a GPU staged "
        "through host memory)", default="gloo")
    disaggregation_transfer_timeout_s: float = _help(
        "a transfer (the decode server's registration, the prefill server's first token, the KV itself) not done "
        "within this many seconds fails its request with an error; a peer that dies fails them at once",
        default=30.0)


@dataclass(frozen=True)
class ServerConfig:
    host: str = _help("address to listen on", default="127.0.0.1")
    port: int = _help("port to listen on", default=30000)
    api_key: str | None = _help("require 'Authorization: Bearer KEY' on every endpoint but /health", default=None)
    served_model_name: str | None = _help("model name in the OpenAI API; default: the model file's name",
                                          default=None)
    log_level: str = _help("debug, info, warning, error", default="info")
    tool_call_parser: str = _help(
        "how the model writes tool calls, for the OpenAI API's tools: hermes (also qwen25, qwen), llama3, "
        "pythonic. A chat template without tool support gets this format's instructions", default="hermes")
    max_queued_requests: int | None = _help(
        "requests accepted but not yet producing output beyond which new ones get 503 with Retry-After; default: "
        "no bound", default=None)
    max_queued_tokens: int | None = _help(
        "prompt tokens of those queued requests beyond which new ones get 503 with Retry-After; default: no bound",
        default=None)
    request_timeout_s: float | None = _help(
        "a request not finished this many seconds after it arrived ends (finish_reason abort, 'timeout: ...') and "
        "frees its KV; a request's own `timeout` field overrides it", default=None)
    graceful_shutdown_timeout: float = _help(
        "on SIGTERM: new requests get 503 while running ones finish, for at most this many seconds; then the rest "
        "are aborted and the server exits", default=20.0)
    max_scheduler_restarts: int = _help(
        "times the server restarts a scheduler process that died (backoff 1, 2, 4, ... s); then it stays down "
        "(503)", default=3)
    reasoning_parser: str | None = _help(
        "split the model's <think> block into reasoning_content: deepseek-r1, deepseek-v3, qwen3, qwen3-thinking, "
        "glm45, kimi; constraints then apply to the answer after the thinking", default=None)
    dp_size: int = _help(
        "data parallelism: start this many servers (each with its own scheduler, KV pool and radix cache, on free "
        "local ports, with the cores split between them) behind a router on --host/--port; --router-* flags set "
        "the router (radixflow router --help)", default=1)


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    disaggregation: DisaggregationConfig = field(default_factory=DisaggregationConfig)
    seed: int = 0

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineConfig":
        """Build from flat keyword arguments (`Engine(model_path=..., chunked_prefill_size=...)`)."""
        hints = typing.get_type_hints(cls)
        parts = {}
        for part in fields(cls):
            part_cls = hints[part.name]
            if dataclasses.is_dataclass(part_cls):
                names = {f.name for f in fields(part_cls)}
                parts[part.name] = part_cls(**{k: kwargs.pop(k) for k in list(kwargs) if k in names})
        seed = kwargs.pop("seed", 0)
        if kwargs:
            raise TypeError(f"unknown engine option(s): {', '.join(sorted(kwargs))}")
        return cls(**parts, seed=seed)


def _base_type(tp):
    """`int | None` -> int; used to pick the argparse converter."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def add_cli_args(parser: argparse.ArgumentParser, config_cls, prefix: str = "") -> None:
    """Add one `--flag` per leaf field of a (possibly composed) config dataclass; `prefix` goes before each name
    (`router_`: `--router-policy`)."""
    hints = typing.get_type_hints(config_cls)
    for f in fields(config_cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            add_cli_args(parser, tp, prefix)
            continue
        flag = "--" + (prefix + f.name).replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f.metadata.get("help", "")
        base = _base_type(tp)
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            parser.add_argument(flag, type=base, default=default, help=f"{help_text} (default: {default})")


def from_cli_args(config_cls, args: argparse.Namespace, prefix: str = ""):
    """Inverse of `add_cli_args`."""
    hints = typing.get_type_hints(config_cls)
    values = {}
    for f in fields(config_cls):
        tp = hints[f.name]
        values[f.name] = (from_cli_args(tp, args, prefix) if dataclasses.is_dataclass(tp)
                          else getattr(args, prefix + f.name))
    return config_cls(**values)


def to_cli_args(config) -> list[str]:
    """The flags that rebuild `config` through `add_cli_args` (fields left at their defaults are left out): how
    `serve --dp-size N` passes its own options on to the N servers it starts."""
    out = []
    for f in fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out += to_cli_args(value)
            continue
        if value == f.default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            out += [flag, str(value)]
    return out
