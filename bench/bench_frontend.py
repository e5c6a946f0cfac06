"""Frontend benchmarks (issue: the frontend language), on the embedded SmolLM2 with an in-process engine.

    python -m bench.bench_frontend [--quick] [--json out.json]

  overhead     run_batch of 64 few-shot programs vs the same requests sent straight to the engine (target <= 1.1x)
  parallelism  skeleton-of-thought: fork into 5 expansions vs expanding them one after another (target >= 2x)
  select       20-shot 4-way select over N questions vs scoring every choice with its own request and the radix
               cache off (target >= 5x)
  prefetch     run_batch of N 20-shot programs on an empty cache, with its constant-prefix prefetch vs without
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time

import torch

import radixflow as sgl

SHOTS = [("What is the capital of France?", "Paris"), ("What color is the sky on a clear day?", "blue"),
         ("How many legs does a spider have?", "eight"), ("What is the opposite of hot?", "cold"),
         ("Which animal says moo?", "cow")]


def few_shot_prefix(k: int) -> str:
    return "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in (SHOTS * (k // len(SHOTS) + 1))[:k])


@sgl.function
def few_shot(s, question):
    s += few_shot_prefix(5) + f"Question: {question}\nAnswer:"
    s += sgl.gen("answer", max_tokens=16, temperature=0, ignore_eos=True)


def overhead(engine: sgl.Engine, n: int) -> dict:
    questions = [f"What is {i} plus {i + 1}?" for i in range(n)]
    prompts = [few_shot_prefix(5) + f"Question: {q}\nAnswer:" for q in questions]
    params = {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True}
    engine.generate(prompts[:2], params)  # warm-up (and the shared prefix is cached for both sides alike)
    start = time.perf_counter()
    engine.generate(prompts, params)
    direct = time.perf_counter() - start
    engine.flush_cache()
    engine.generate(prompts[:2], params)
    start = time.perf_counter()
    states = few_shot.run_batch([{"question": q} for q in questions], backend=engine)
    program = time.perf_counter() - start
    assert all(s.error() is None for s in states)
    return {"direct_s": direct, "frontend_s": program, "ratio": program / direct}


@sgl.function
def skeleton(s, topic, parallel):
    s += f"Here are five short points about {topic}:\n1. health\n2. energy\n3. mood\n4. sleep\n5. focus\n\n"
    if parallel:
        forks = s.fork(5)
        forks += lambda i: f"Explain point {i + 1} in one sentence:" + sgl.gen("point", max_tokens=24,
                                                                                 temperature=0, ignore_eos=True)
        forks.join()
    else:
        for i in range(5):
            with s.copy() as branch:  # the copy is joined (waited for) at the end of the block
                branch += f"Explain point {i + 1} in one sentence:" + sgl.gen("point", max_tokens=24,
                                                                              temperature=0, ignore_eos=True)


def parallelism(engine: sgl.Engine) -> dict:
    skeleton.run(topic="exercise", parallel=True, backend=engine)  # warm-up
    timings = {}
    for name, parallel in (("sequential", False), ("forked", True)):
        engine.flush_cache()
        start = time.perf_counter()
        skeleton.run(topic="walking", parallel=parallel, backend=engine).sync()
        timings[f"{name}_s"] = time.perf_counter() - start
    timings["speedup"] = timings["sequential_s"] / timings["forked_s"]
    return timings


@sgl.function
def choose(s, question):
    s += few_shot_prefix(20) + f"Question: {question}\nAnswer:"
    s += sgl.select("answer", choices=[" red", " green", " blue", " yellow"])


@sgl.function
def long_few_shot(s, question):
    s += few_shot_prefix(20) + f"Question: {question}\nAnswer:"
    s += sgl.gen("answer", max_tokens=8, temperature=0, ignore_eos=True)


class _NoPrefetch(sgl.EngineBackend):
    """run_batch without its prefix prefetch (the program has no fork, the other caller of cache_prefix)."""

    def cache_prefix(self, text: str) -> None:
        pass


def prefetch(engine: sgl.Engine, n: int) -> dict:
    batch = [{"question": f"What is {i} plus {i + 1}?"} for i in range(n)]
    long_few_shot.run_batch(batch[:2], backend=engine)  # warm-up
    results = {}
    for name, backend in (("without", _NoPrefetch(engine)), ("with", sgl.EngineBackend(engine))):
        engine.flush_cache()
        start = time.perf_counter()
        states = long_few_shot.run_batch(batch, backend=backend)
        results[f"{name}_s"] = time.perf_counter() - start
        results[f"{name}_cached_tokens"] = sum(s.get_meta_info("answer")["cached_tokens"] for s in states)
    results["speedup"] = results["without_s"] / results["with_s"]
    return results


def select_sharing(n: int, quick: bool) -> dict:
    questions = [f"Which color is item number {i}?" for i in range(n)]
    engine = sgl.Engine(max_total_tokens=32768, num_threads=2)
    try:
        choose.run(question="warm-up", backend=engine)
        engine.flush_cache()
        start = time.perf_counter()
        states = choose.run_batch([{"question": q} for q in questions], backend=engine)
        ours = time.perf_counter() - start
        picks = [s["answer"] for s in states]
    finally:
        engine.shutdown()
    baseline_engine = sgl.Engine(max_total_tokens=32768, num_threads=2, disable_radix_cache=True)
    try:
        prompts = [few_shot_prefix(20) + f"Question: {q}\nAnswer:" + c for q in questions
                   for c in (" red", " green", " blue", " yellow")]
        start = time.perf_counter()
        baseline_engine.generate(prompts, {"max_new_tokens": 0}, return_logprob=True, logprob_start_len=0)
        baseline = time.perf_counter() - start
    finally:
        baseline_engine.shutdown()
    return {"questions": n, "frontend_select_s": ours, "per_choice_no_cache_s": baseline,
            "speedup": baseline / ours, "picks": sorted(set(picks))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json")
    parser.add_argument("--only", default="overhead,parallelism,select,prefetch", help="comma-separated subset")
    args = parser.parse_args()
    only = set(args.only.split(","))
    torch.set_num_threads(2)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    results = {"commit": commit}
    engine = sgl.Engine(max_total_tokens=32768, num_threads=2)
    try:
        if "overhead" in only:
            results["overhead"] = overhead(engine, 16 if args.quick else 64)
            print("overhead", json.dumps(results["overhead"]), flush=True)
        if "parallelism" in only:
            results["parallelism"] = parallelism(engine)
            print("parallelism", json.dumps(results["parallelism"]), flush=True)
        if "prefetch" in only:
            results["prefetch"] = prefetch(engine, 16 if args.quick else 64)
            print("prefetch", json.dumps(results["prefetch"]), flush=True)
    finally:
        engine.shutdown()
    if "select" in only:
        results["select"] = select_sharing(8 if args.quick else 64, args.quick)
        print("select", json.dumps(results["select"]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
