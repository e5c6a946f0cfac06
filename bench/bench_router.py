"""Data parallelism behind the router, and tensor parallelism (issue: scale-out).

    python -m bench.bench_router [--requests-per-tenant 6] [--rate 4] [--worker-pool 6144] [--skip-overhead]
        [--skip-tp] [--json out.json]

1. Policies: two `radixflow serve` workers on the embedded SmolLM2 (one thread each, KV pool --worker-pool tokens),
   8 tenants each with its own ~1,000-token system prompt and a short question per request, Poisson arrivals at
   --rate requests/s, 16 new tokens each (greedy). The same arrival schedule under `cache_aware` and
   `round_robin` (worker caches flushed in between): the cache hit rate (cached / prompt tokens over both
   workers) and throughput (requests / makespan). The pool holds about 6 tenants' prompts: round robin makes each
   worker serve all 8 tenants, cache_aware about 4.
2. Router overhead: one worker, 32 streamed requests (short prompts, 4 at a time), straight to the worker and
   through a router, alternating; throughput and p50 time to first token.
3. Tensor parallelism: a random-weight Llama with SmolLM2's hidden size whose heads split in two (8 heads, 4 KV
   heads; SmolLM2's 9 heads do not), TP=1 with 2 threads vs TP=2 with 1 thread per rank: batch-1 decode and
   batch-8 throughput, resident memory per rank.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from radixflow.runtime.model_source import resolve_model
from radixflow.runtime.tokenizer import load_tokenizer
from radixflow.server.launch import ServerProcess

TENANTS = 8


def tenant_prompts(tokens: int = 1000) -> list[str]:
    tokenizer = load_tokenizer(resolve_model(None))
    prompts = []
    for t in range(TENANTS):
        clauses, i = [], 0
        while len(tokenizer.encode(" ".join(clauses))) < tokens:
            clauses.append(f"Tenant {t} rule {i}: answer questions about product line {t * 37 + i} politely.")
            i += 1
        prompts.append(" ".join(clauses))
    return prompts


async def one(client: httpx.AsyncClient, url: str, text: str, max_new_tokens: int) -> dict:
    start = time.perf_counter()
    first = None
    async with client.stream("POST", f"{url}/generate", json={
            "text": text, "stream": True,
            "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0}}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and first is None:
                first = time.perf_counter() - start
    return {"ttft": first, "latency": time.perf_counter() - start}


async def poisson_run(url: str, texts: list[str], rate: float, seed: int = 0) -> dict:
    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        tasks = []
        for text in texts:
            tasks.append(asyncio.create_task(one(client, url, text, 16)))
            await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        makespan = time.perf_counter() - start
    return {"throughput_rps": len(texts) / makespan, "makespan_s": makespan,
            "ttft_p50_s": statistics.median(r["ttft"] for r in results),
            "latency_p50_s": statistics.median(r["latency"] for r in results)}


def fleet_stats(workers: list[ServerProcess]) -> dict:
    totals = {"prompt_tokens": 0, "cache_hit_tokens": 0}
    for w in workers:
        stats = httpx.get(f"{w.url}/get_server_info", timeout=30).json()["stats"]
        for k in totals:
            totals[k] += stats[k]
    return totals


def policies(args, logs: Path) -> dict:
    prompts = tenant_prompts()
    rng = random.Random(1)
    texts = [f"{prompts[t]}\nQuestion {i}: what is rule {rng.randrange(50)} of tenant {t}?"
             for i in range(args.requests_per_tenant) for t in rng.sample(range(TENANTS), TENANTS)]
    worker_args = ["--num-threads", "1", "--max-total-tokens", str(args.worker_pool), "--log-level", "warning"]
    workers = [ServerProcess(worker_args, log=logs / f"worker{i}.log").start() for i in range(2)]
    out = {}
    try:
        for w in workers:
            w.wait_ready()
        for policy in ("round_robin", "cache_aware"):
            for w in workers:
                assert httpx.post(f"{w.url}/flush_cache", json={}, timeout=30).status_code == 200
            before = fleet_stats(workers)
            with ServerProcess(["--worker-urls", *[w.url for w in workers], "--policy", policy,
                                "--log-level", "warning"], command="router", log=logs / f"router-{policy}.log"
                               ) as router:
                run = asyncio.run(poisson_run(router.url, texts, args.rate))
            after = fleet_stats(workers)
            prompt = after["prompt_tokens"] - before["prompt_tokens"]
            run["cache_hit_rate"] = (after["cache_hit_tokens"] - before["cache_hit_tokens"]) / prompt
            out[policy] = run
            print(f"{policy:>12}: hit rate {run['cache_hit_rate']:.3f}, {run['throughput_rps']:.2f} req/s, "
                  f"TTFT p50 {run['ttft_p50_s']:.2f} s, latency p50 {run['latency_p50_s']:.2f} s", flush=True)
    finally:
        for w in workers:
            w.stop()
    ca, rr = out["cache_aware"], out["round_robin"]
    out["hit_rate_ratio"] = ca["cache_hit_rate"] / max(rr["cache_hit_rate"], 1e-9)
    out["throughput_ratio"] = ca["throughput_rps"] / rr["throughput_rps"]
    print(f"cache_aware / round_robin: hit rate {out['hit_rate_ratio']:.2f}x, throughput "
          f"{out['throughput_ratio']:.2f}x", flush=True)
    return out


async def closed_loop(url: str, n: int, concurrency: int) -> dict:
    async with httpx.AsyncClient(timeout=600) as client:
        sem = asyncio.Semaphore(concurrency)

        async def task(i):
            async with sem:
                return await one(client, url, f"Request {i}: write one sentence about the number {i}.", 16)

        start = time.perf_counter()
        results = await asyncio.gather(*(task(i) for i in range(n)))
        return {"throughput_rps": n / (time.perf_counter() - start),
                "ttft_p50_ms": 1000 * statistics.median(r["ttft"] for r in results)}


def overhead(logs: Path) -> dict:
    with ServerProcess(["--num-threads", "2", "--log-level", "warning"], log=logs / "single.log") as worker, \
            ServerProcess(["--worker-urls", worker.url, "--log-level", "warning"], command="router",
                          log=logs / "router-single.log") as router:
        asyncio.run(closed_loop(worker.url, 8, 4))  # warm-up
        runs = {"direct": [], "router": []}
        for _ in range(3):
            for name, url in (("direct", worker.url), ("router", router.url)):
                runs[name].append(asyncio.run(closed_loop(url, 32, 4)))
    out = {name: {"throughput_rps": statistics.median(r["throughput_rps"] for r in rs),
                  "ttft_p50_ms": statistics.median(r["ttft_p50_ms"] for r in rs)} for name, rs in runs.items()}
    out["throughput_ratio"] = out["router"]["throughput_rps"] / out["direct"]["throughput_rps"]
    out["ttft_p50_added_ms"] = out["router"]["ttft_p50_ms"] - out["direct"]["ttft_p50_ms"]
    print(f"router overhead: throughput {out['throughput_ratio']:.3f}x of direct, TTFT p50 "
          f"{out['ttft_p50_added_ms']:+.1f} ms ({out['direct']['ttft_p50_ms']:.1f} direct)", flush=True)
    return out


def tensor_parallel(logs: Path) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from radixflow import Engine

    tokenizer = load_tokenizer(resolve_model(None))
    torch.manual_seed(0)
    model_dir = logs / "tp-model"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=576, intermediate_size=1536,
                                 num_hidden_layers=30, num_attention_heads=8, num_key_value_heads=4,
                                 max_position_embeddings=2048, tie_word_embeddings=True)
                     ).save_pretrained(str(model_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(model_dir))
    out = {}
    for tp, threads in ((1, 2), (2, 1)):
        engine = Engine(model_path=str(model_dir), tp_size=tp, num_threads=threads, max_total_tokens=16384)
        try:
            params = {"max_new_tokens": 64, "temperature": 0, "ignore_eos": True}
            engine.generate("warm up", params)
            start = time.perf_counter()
            engine.generate("Once upon a time", params)
            batch1 = 64 / (time.perf_counter() - start)
            start = time.perf_counter()
            engine.generate([f"Story {i}: once upon a time" for i in range(8)], params)
            batch8 = 8 * 64 / (time.perf_counter() - start)
            me = psutil.Process()
            ranks = [me, *[p for p in me.children(recursive=True) if "follower_main" in " ".join(p.cmdline())]]
            rss = [round(p.memory_info().rss / 2**20) for p in ranks]
        finally:
            engine.shutdown()
        out[f"tp{tp}"] = {"decode_batch1_tok_s": batch1, "batch8_tok_s": batch8, "rss_mib_per_rank": rss}
        print(f"TP={tp} ({threads} thread(s) per rank): batch 1 {batch1:.1f} tok/s, batch 8 {batch8:.1f} tok/s, "
              f"RSS per rank {rss} MiB (rank 0 includes the bench itself)", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests-per-tenant", type=int, default=6)
    parser.add_argument("--rate", type=float, default=4.0, help="Poisson arrival rate, requests/s")
    parser.add_argument("--worker-pool", type=int, default=6144, help="KV pool tokens per worker")
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--skip-tp", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="bench-router-"))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"commit": commit, "worker_pool": args.worker_pool, "policies": policies(args, logs)}
    if not args.skip_overhead:
        result["overhead"] = overhead(logs)
    if not args.skip_tp:
        result["tensor_parallel"] = tensor_parallel(logs)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
