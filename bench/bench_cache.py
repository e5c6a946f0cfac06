"""RadixAttention and stall-free batching benchmarks (issue: RadixAttention and the cache-aware scheduler).

    python -m bench.bench_cache [--quick] [--json out.json] [--only shared_prefix,multi_turn,no_reuse,stall_free]

Every figure is a ratio of two configurations measured in the same run on the same requests:
  shared_prefix  64 questions behind one ~1,000-token 5-shot prefix, 16 output tokens: radix cache on vs off.
  multi_turn     chat sessions of 4 turns, each turn re-sending the whole conversation: radix cache on vs off.
  no_reuse       random prompts with nothing to share: cost of keeping the cache (on vs off).
  stall_free     16 requests decoding when a 4,000-token prompt arrives: p99 inter-token latency of the decodes
                 and total throughput, chunked prefill on vs off (--prefill-context-tokens 0: chunks by token
                 count only).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import threading
import time

import torch

from radixflow import Engine

SEED = 0


def random_ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(200, 40000) for _ in range(n)]


def make_engine(**config) -> Engine:
    return Engine(num_threads=2, max_total_tokens=32768, **config)


def timed_batch(engine: Engine, prompts, params) -> tuple[float, list[dict]]:
    start = time.perf_counter()
    outs = engine.generate(input_ids=prompts, sampling_params=params)
    return time.perf_counter() - start, outs


# -- workloads ---------------------------------------------------------------------------------------------------
def shared_prefix(quick: bool) -> dict:
    rng = random.Random(SEED)
    prefix = random_ids(rng, 1000)  # stands in for a 5-shot prefix: only its length and sharing matter here
    questions = [prefix + random_ids(rng, 40) for _ in range(16 if quick else 64)]
    params = {"max_new_tokens": 16, "ignore_eos": True, "temperature": 0}
    return compare_cache(lambda engine: [timed_batch(engine, questions, params)])


def multi_turn(quick: bool) -> dict:
    rng = random.Random(SEED + 1)
    sessions = 4 if quick else 16
    system = random_ids(rng, 200)
    histories = [system + random_ids(rng, 60) for _ in range(sessions)]
    params = {"max_new_tokens": 32, "ignore_eos": True, "temperature": 0}

    def run(engine):
        convs = [list(h) for h in histories]
        turn_rng = random.Random(SEED + 2)
        results = []
        for _turn in range(4):
            elapsed, outs = timed_batch(engine, convs, params)
            results.append((elapsed, outs))
            convs = [c + o["output_ids"] + random_ids(turn_rng, 40) for c, o in zip(convs, outs)]
        return results

    return compare_cache(run)


def no_reuse(quick: bool) -> dict:
    rng = random.Random(SEED + 3)
    prompts = [random_ids(rng, 300) for _ in range(16 if quick else 48)]
    params = {"max_new_tokens": 32, "ignore_eos": True, "temperature": 0}
    return compare_cache(lambda engine: [timed_batch(engine, prompts, params)], repeats=1 if quick else 3)


def compare_cache(run, repeats: int = 1) -> dict:
    """Run the workload with the radix cache on and off (fresh engine each); tokens/s, hit rate, ratio."""
    figures = {}
    for name, disable in (("radix", False), ("no_cache", True)):
        engine = make_engine(disable_radix_cache=disable)
        try:
            engine.generate(input_ids=list(range(300, 364)), sampling_params={"max_new_tokens": 4})  # warm-up
            base = engine.stats()
            times, tokens = [], 0
            for _ in range(repeats):
                engine.flush_cache()
                results = run(engine)
                times.append(sum(t for t, _ in results))
                tokens = sum(o["meta_info"]["prompt_tokens"] + o["meta_info"]["completion_tokens"]
                             for _, outs in results for o in outs)
            stats = engine.stats()
            hits = stats["cache_hit_tokens"] - base["cache_hit_tokens"]
            prompt = stats["prompt_tokens"] - base["prompt_tokens"]
            figures[name] = {"seconds": statistics.median(times), "tokens_per_s": tokens / statistics.median(times),
                             "hit_rate": hits / prompt if prompt else 0.0}
            engine.check_integrity()
        finally:
            engine.shutdown()
    figures["speedup"] = figures["radix"]["tokens_per_s"] / figures["no_cache"]["tokens_per_s"]
    return figures


def stall_free(quick: bool, prefill_context_tokens: int | None = None) -> dict:
    rng = random.Random(SEED + 4)
    decoders = [random_ids(rng, 64) for _ in range(16)]
    long_prompt = random_ids(rng, 1500 if quick else 4000)
    figures = {}
    for name, chunked in (("chunked", True), ("unchunked", False)):
        engine = make_engine(enable_chunked_prefill=chunked, chunked_prefill_size=512,
                             prefill_context_tokens=prefill_context_tokens)
        try:
            engine.generate(input_ids=decoders[0], sampling_params={"max_new_tokens": 2})  # warm-up
            engine.flush_cache()
            figures[name] = _stall_run(engine, decoders, long_prompt)
        finally:
            engine.shutdown()
    figures["p99_itl_ratio"] = figures["unchunked"]["p99_itl_ms"] / figures["chunked"]["p99_itl_ms"]
    figures["throughput_ratio"] = figures["chunked"]["tokens_per_s"] / figures["unchunked"]["tokens_per_s"]
    return figures


def _stall_run(engine: Engine, decoders, long_prompt) -> dict:
    gaps: list[float] = []
    done = []

    def decode(ids):
        last = None
        count = 0
        for chunk in engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 48, "ignore_eos": True},
                                     stream=True):
            now = time.perf_counter()
            if last is not None and chunk["output_ids"]:
                gaps.append(now - last)
            last = now
            count += len(chunk["output_ids"])
        done.append(count)

    start = time.perf_counter()
    threads = [threading.Thread(target=decode, args=(ids,)) for ids in decoders]
    for t in threads:
        t.start()
    while engine.stats()["generated_tokens"] < 16 * 4:  # the decodes are running
        time.sleep(0.005)
    long = engine.generate(input_ids=long_prompt, sampling_params={"max_new_tokens": 8, "ignore_eos": True})
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    tokens = sum(done) + long["meta_info"]["completion_tokens"] + len(long_prompt) + 16 * 64
    gaps.sort()
    return {"p50_itl_ms": 1000 * gaps[len(gaps) // 2], "p99_itl_ms": 1000 * gaps[int(len(gaps) * 0.99) - 1],
            "max_itl_ms": 1000 * gaps[-1], "seconds": elapsed, "tokens_per_s": tokens / elapsed}


WORKLOADS = {"shared_prefix": shared_prefix, "multi_turn": multi_turn, "no_reuse": no_reuse, "stall_free": stall_free}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller workloads (a smoke run, not for the README)")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--only", help="comma-separated subset of: " + ", ".join(WORKLOADS))
    parser.add_argument("--prefill-context-tokens", type=int, default=None,
                        help="stall_free: the engine's cost-aware chunking constant (0 = plain token budget; "
                             "default: the engine's own)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    names = args.only.split(",") if args.only else list(WORKLOADS)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    results = {"commit": commit, "torch": torch.__version__, "threads": torch.get_num_threads()}
    for name in names:
        start = time.perf_counter()
        extra = {"prefill_context_tokens": args.prefill_context_tokens} if name == "stall_free" else {}
        results[name] = WORKLOADS[name](args.quick, **extra)
        print(f"## {name} ({time.perf_counter() - start:.0f}s)\n{json.dumps(results[name], indent=2)}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
