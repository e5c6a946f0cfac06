"""The paged attention kernels (decode_attention.cpp) against what `--attention-backend torch_native` runs: gather
the context's K/V from the pool, then torch's SDPA. SmolLM2-135M's attention shape (9 query heads, 3 KV heads, head
dimension 64), 30 layers each with its own pool (so K/V come from memory as in a step), fp32.

    python -m bench.bench_attention [--reps 9] [--json FILE] [--against REV]

Each case times all 30 layers' calls for both sides, taking turns rep by rep; the median is reported with the ratio.
With `--against REV` (a git revision) the other side is the kernels as they were at REV, built beside today's in
this process (their op library renamed), instead of gather + SDPA: a kernel change measured against its parent.
Cases: decode (one query per request) at batch 1 and 4 over 1,020 keys; a 15-token extend behind a 1,020-token
prefix (a few-shot question) at batch 1 and 4; a 512-token causal prefill chunk; the second 490-token chunk of a
1,002-token prompt (masked); a whole 1,002-token causal prompt; the last 512-token chunk (masked) of a 2,048- and of
a 4,096-token prompt.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from radixflow.runtime.model import blockq
from radixflow.runtime.model.attention import _gather, decode_kernel, extend_kernel

HEADS, KV_HEADS, DIM, LAYERS = 9, 3, 64, 30
SCALE = DIM ** -0.5

# (name, batch, queries, context, causal flag: the whole prompt with no mask)
CASES = [
    ("decode", 1, 1, 1020, False),
    ("decode", 4, 1, 1020, False),
    ("extend: a 15-token question", 1, 15, 1035, False),
    ("extend: a 15-token question", 4, 15, 1035, False),
    ("prefill: a 512-token chunk, causal", 1, 512, 512, True),
    ("prefill: the 490-token second chunk of 1,002", 1, 490, 1002, False),
    ("prefill: 1,002 tokens, causal", 1, 1002, 1002, True),
    ("prefill: the last 512-token chunk of 2,048", 1, 512, 2048, False),
    ("prefill: the last 512-token chunk of 4,096", 1, 512, 4096, False),
]


def sdpa(q, k_cache, v_cache, kv_indices, mask, causal):
    keys, values = _gather(k_cache, v_cache, kv_indices)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask, is_causal=causal,
                                         enable_gqa=True)
    return out.transpose(1, 2)


def paged(q, k_cache, v_cache, kv_indices, mask, causal):
    if q.shape[1] == 1:
        return decode_kernel(q[:, 0], k_cache, v_cache, kv_indices, mask)
    return extend_kernel(q, k_cache, v_cache, kv_indices, mask, causal)


def kernels_at(rev: str):
    """decode_attention.cpp (and the header it includes) as of git revision `rev`, built as op library
    `radixflow_attention_then` -> a `paged`-like function calling it."""
    from torch.utils import cpp_extension

    src = Path(blockq.__file__).parent
    repo = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=src, capture_output=True, text=True,
                          check=True).stdout.strip()
    build = Path(tempfile.mkdtemp(prefix="radixflow_attention_then_"))
    for name in ("decode_attention.cpp", "simd.h"):
        rel = (src / name).relative_to(repo).as_posix()
        text = subprocess.run(["git", "show", f"{rev}:{rel}"], cwd=repo, capture_output=True, text=True,
                              check=True).stdout
        for macro in ("TORCH_LIBRARY", "TORCH_LIBRARY_IMPL"):
            text = text.replace(f"{macro}(radixflow_attention,", f"{macro}(radixflow_attention_then,")
        (build / name).write_text(text)
    cpp_extension.load(name="radixflow_attention_then", sources=[str(build / "decode_attention.cpp")],
                       extra_cflags=["-O3", "-fopenmp", *blockq.ISAS[blockq.cpu_isa()][1]],
                       extra_ldflags=["-fopenmp"], build_directory=str(build), is_python_module=False)
    ops = torch.ops.radixflow_attention_then

    def then(q, k_cache, v_cache, kv_indices, mask, causal):
        if q.shape[1] == 1:
            return ops.decode_attention(q[:, 0], k_cache, v_cache, kv_indices, mask, None, None, None, SCALE)
        return ops.extend_attention(q, k_cache, v_cache, kv_indices, mask, causal, SCALE)

    return then


def run_case(pools, batch: int, queries: int, context: int, causal: bool, reps: int, other=sdpa) -> dict:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, queries, HEADS, DIM, generator=gen)
    # Each request's context: consecutive pool rows, as a prompt prefilled in one go gets them.
    kv_indices = torch.stack([torch.arange(context) + 100 + b * (context + 100) for b in range(batch)])
    mask = None
    if not causal and queries > 1:
        mask = (torch.arange(context)[None, :] <= torch.arange(queries)[:, None] + context - queries)
        mask = mask[None, None].expand(batch, 1, queries, context).contiguous()
    times = {"paged": [], "baseline": []}
    for _ in range(reps):
        for name, fn in (("paged", paged), ("baseline", other)):
            start = time.perf_counter()
            for k_cache, v_cache in pools:
                fn(q, k_cache, v_cache, kv_indices, mask, causal)
            times[name].append(time.perf_counter() - start)
    ours, theirs = statistics.median(times["paged"]), statistics.median(times["baseline"])
    return {"paged_ms": round(1e3 * ours, 2), "baseline_ms": round(1e3 * theirs, 2),
            "speedup": round(theirs / ours, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--json")
    parser.add_argument("--against", metavar="REV", help="the baseline: the kernels at this git revision (the same "
                        "op signatures) instead of gather + SDPA")
    args = parser.parse_args()
    if not blockq.available():
        raise SystemExit("the paged kernels need an x86 CPU with AVX2 (and a C++ compiler to build them)")
    torch.set_num_threads(2)
    pool_rows = max(4 * (1035 + 100), 4096) + 100
    pools = [(torch.randn(pool_rows, KV_HEADS, DIM), torch.randn(pool_rows, KV_HEADS, DIM)) for _ in range(LAYERS)]
    other, other_name = sdpa, "gather + SDPA"
    if args.against:
        other, other_name = kernels_at(args.against), f"kernels at {args.against}"
    rows = []
    print(f"| case | batch | paged kernels ({LAYERS} layers, ms) | {other_name} (ms) | speedup |")
    print("|---|---:|---:|---:|---:|")
    for name, batch, queries, context, causal in CASES:
        reps = args.reps if queries < 100 else max(2, args.reps // 3)
        result = run_case(pools, batch, queries, context, causal, reps, other)
        rows.append({"case": name, "batch": batch, "queries": queries, "context": context, **result})
        print(f"| {name} over {context} keys | {batch} | {result['paged_ms']} | {result['baseline_ms']} | "
              f"{result['speedup']}x |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
