"""The hierarchical cache (device -> host -> storage) and sessions, on the embedded SmolLM2 (issue: hierarchical
radix cache and session-aware KV retention).

    python -m bench.bench_hicache [--only multiturn,agent,restart,shared,overhead] [--quick] [--threads 2]
        [--json out.json]

Every figure runs in-process Engines (one at a time, each with --threads torch threads; a "second server" is a
second Engine in this process with its own pools and cache), on random token-id prompts (ids >= 100, clear of
SmolLM2's special tokens), greedy with ignore_eos, and reports a ratio against a baseline from the same run:

  multiturn  64 conversations x 6 turns (each turn: 40 new user tokens on the history, 16 answer tokens), every
             conversation's turn sent together, turn after turn. The device pool holds about a quarter of the final
             working set. Throughput (turn tokens / s) with the hierarchical cache on vs off, and the cache hit rate
             of both against a device pool big enough for everything ("unbounded").
  agent      16 agent sessions with a 400-token history each; between turns, "tool pauses" while 48 other 400-token
             requests fill both pools; then each session's next turn alone (TTFT = a 1-token request's latency).
             p50 with session_id on vs off, both with the hierarchical cache on.
  restart    a 2,000-token prompt on a server with a disk storage tier; a new server over the same directory; TTFT
             of that prompt there (median of 3, the device and host tiers emptied before each) vs its cold TTFT
             (median of 3 on an engine without the hierarchical cache).
  shared     two servers on one Redis (redis-server started here, persistence off); TTFT of a 2,000-token prompt
             on the second after the first computed it (median of 3, as above) vs its cold TTFT.
  overhead   64 unique 300-token prompts with 32 output tokens, all at once, no reuse: throughput with the
             hierarchical cache on (write_through: every new entry copied to the host pool) vs off; best of 3 reps,
             interleaved.

On this CPU machine the device pool and the host pool are both host memory: the mechanism is the one a GPU uses,
and the copies between the pools cost real time (memory bandwidth, on the same two cores as the model).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench.bench_serving import environment
from bench.serving_data import LOWEST_ID
from radixflow import Engine
from radixflow.server.launch import free_port

GREEDY = {"temperature": 0.0, "ignore_eos": True}
VOCAB = 49152


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(LOWEST_ID, VOCAB) for _ in range(n)]


def engine(threads: int, **options) -> Engine:
    return Engine(num_threads=threads, **options)


def ttft(eng: Engine, ids: list[int]) -> float:
    """Latency of a one-token request issued alone: its time to first token."""
    start = time.perf_counter()
    eng.generate(input_ids=ids, sampling_params={"max_new_tokens": 1, **GREEDY})
    return time.perf_counter() - start


def warm(eng: Engine) -> None:
    eng.generate(input_ids=tokens(random.Random(99), 600), sampling_params={"max_new_tokens": 4, **GREEDY})
    eng.flush_cache()


# ---- multi-turn ----

def multiturn(threads: int, quick: bool) -> dict:
    conversations, turns, user, answer, system = (16, 4, 40, 16, 150) if quick else (64, 6, 40, 16, 150)
    final = system + turns * (user + answer)
    device = conversations * final // 4
    configs = {"off": dict(max_total_tokens=device),
               "on": dict(max_total_tokens=device, enable_hierarchical_cache=True, hicache_ratio=6.0),
               "unbounded": dict(max_total_tokens=conversations * final * 2)}
    out = {"conversations": conversations, "turns": turns, "device_pool_tokens": device,
           "working_set_tokens": conversations * final}
    for name, options in configs.items():
        rng = random.Random(1)
        histories = [tokens(rng, system) for _ in range(conversations)]
        eng = engine(threads, **options)
        try:
            warm(eng)
            start, done = time.perf_counter(), 0
            for _ in range(turns):
                histories = [h + tokens(rng, user) for h in histories]
                results = eng.generate(input_ids=histories, sampling_params={"max_new_tokens": answer, **GREEDY})
                histories = [h + r["output_ids"] for h, r in zip(histories, results)]
                done += sum(r["meta_info"]["prompt_tokens"] + r["meta_info"]["completion_tokens"] for r in results)
            seconds = time.perf_counter() - start
            stats = eng.stats()
            eng.check_integrity()
        finally:
            eng.shutdown()
        out[name] = {"seconds": seconds, "tokens_per_s": done / seconds, "cache_hit_rate": stats["cache_hit_rate"],
                     "host_hit_tokens": stats["cache_hit_host_tokens"],
                     "host_load_ms": 1000 * stats.get("hicache_host_load_seconds", 0.0),
                     "host_write_ms": 1000 * stats.get("hicache_host_write_seconds", 0.0)}
        print(f"multiturn {name}: {seconds:.1f} s, hit rate {stats['cache_hit_rate']:.1%}", flush=True)
    out["speedup"] = out["on"]["tokens_per_s"] / out["off"]["tokens_per_s"]
    out["hit_rate_gap_points"] = 100 * (out["unbounded"]["cache_hit_rate"] - out["on"]["cache_hit_rate"])
    return out


# ---- agent sessions ----

def agent(threads: int, quick: bool) -> dict:
    sessions, history, others, other_len = (8, 400, 24, 400) if quick else (16, 400, 48, 400)
    out = {"sessions": sessions, "history_tokens": history, "other_requests": others}
    for mode in ("off", "on"):
        rng = random.Random(2)
        eng = engine(threads, max_total_tokens=4096, enable_hierarchical_cache=True, hicache_ratio=2.0)
        try:
            warm(eng)
            ids = [f"agent-{i}" for i in range(sessions)] if mode == "on" else [None] * sessions
            prompts = [tokens(rng, history) for _ in range(sessions)]
            histories = []
            for prompt, sid in zip(prompts, ids):  # first turn: the agent's history, then a tool call
                r = eng.generate(input_ids=prompt, sampling_params={"max_new_tokens": 8, **GREEDY}, session_id=sid)
                histories.append(prompt + r["output_ids"])
            # Tool pauses: other traffic fills the device pool and the host pool several times over.
            eng.generate(input_ids=[tokens(rng, other_len) for _ in range(others)],
                         sampling_params={"max_new_tokens": 8, **GREEDY})
            latencies = []
            for h, sid in zip(histories, ids):  # the tool results come back: each agent's next turn
                start = time.perf_counter()
                eng.generate(input_ids=h + tokens(rng, 30), sampling_params={"max_new_tokens": 1, **GREEDY},
                             session_id=sid)
                latencies.append(time.perf_counter() - start)
            stats = eng.stats()
            eng.check_integrity()
        finally:
            eng.shutdown()
        out[mode] = {"ttft_p50_ms": 1000 * statistics.median(latencies), "ttft_ms": [1000 * x for x in latencies],
                     "host_hit_tokens": stats["cache_hit_host_tokens"]}
        print(f"agent sessions {mode}: TTFT p50 {out[mode]['ttft_p50_ms']:.0f} ms", flush=True)
    out["ttft_ratio"] = out["off"]["ttft_p50_ms"] / out["on"]["ttft_p50_ms"]
    return out


# ---- storage: restart and a shared store ----

def storage_options(backend: str, config: dict) -> dict:
    return dict(max_total_tokens=8192, enable_hierarchical_cache=True, hicache_storage_backend=backend,
                hicache_storage_backend_extra_config=json.dumps(config))


def median_ttft(eng: Engine, prompt: list[int], reps: int) -> float:
    """Median TTFT of `prompt` over `reps` runs, emptying the device and host tiers before each (storage stays)."""
    times = []
    for _ in range(reps):
        eng.flush_cache()
        times.append(ttft(eng, prompt))
    return statistics.median(times)


def cold_ttft(threads: int, prompt: list[int], reps: int) -> float:
    """The baseline: the prompt computed from scratch, on an engine without the hierarchical cache."""
    eng = engine(threads, max_total_tokens=8192)
    try:
        warm(eng)
        return median_ttft(eng, prompt, reps)
    finally:
        eng.shutdown()


def restart(threads: int, quick: bool) -> dict:
    reps = 1 if quick else 3
    prompt = tokens(random.Random(3), 2000)
    cold = cold_ttft(threads, prompt, reps)
    with tempfile.TemporaryDirectory() as directory:
        first = engine(threads, **storage_options("file", {"dir": directory}))
        try:
            warm(first)
            ttft(first, prompt)
        finally:
            first.shutdown()  # waits for the page writes
        # A restarted server finds its pages on disk, not being written back: the kernel's writeback of 100 MB of
        # fresh pages would otherwise run during the measurement (it doubled TTFT in some runs here).
        os.sync()
        pages = len(list(Path(directory).rglob("*.kv")))
        second = engine(threads, **storage_options("file", {"dir": directory}))
        try:
            warm(second)
            from_disk = median_ttft(second, prompt, reps)
            stats = second.stats()
        finally:
            second.shutdown()
    print(f"restart: cold {cold * 1000:.0f} ms, from disk {from_disk * 1000:.0f} ms", flush=True)
    return {"prompt_tokens": 2000, "pages": pages, "reps": reps, "cold_ttft_ms": 1000 * cold,
            "disk_ttft_ms": 1000 * from_disk, "storage_hit_tokens": stats["cache_hit_storage_tokens"],
            "load_ms": 1000 * stats["hicache_storage_load_seconds"], "ratio": cold / from_disk}


def shared(threads: int, quick: bool) -> dict:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("shared: redis-server is not installed (scripts/setup.sh installs it)")
    reps = 1 if quick else 3
    prompt = tokens(random.Random(4), 2000)
    cold = cold_ttft(threads, prompt, reps)
    port = free_port()
    workdir = tempfile.mkdtemp()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", workdir], stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        options = storage_options("redis", {"url": f"redis://127.0.0.1:{port}/0"})
        first, second = engine(threads, **options), engine(threads, **options)
        try:
            warm(first)
            warm(second)
            ttft(first, prompt)
            first.core.cache.prefix_cache.storage.flush()  # its pages are in Redis
            hit = median_ttft(second, prompt, reps)
            stats = second.stats()
        finally:
            first.shutdown()
            second.shutdown()
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"shared: cold {cold * 1000:.0f} ms, second server {hit * 1000:.0f} ms", flush=True)
    return {"prompt_tokens": 2000, "reps": reps, "cold_ttft_ms": 1000 * cold, "second_server_ttft_ms": 1000 * hit,
            "storage_hit_tokens": stats["cache_hit_storage_tokens"],
            "load_ms": 1000 * stats["hicache_storage_load_seconds"], "ratio": cold / hit}


# ---- overhead without reuse ----

def overhead(threads: int, quick: bool) -> dict:
    n, length, output, reps = (16, 300, 32, 2) if quick else (64, 300, 32, 3)
    engines = {"off": engine(threads, max_total_tokens=32768),
               "on": engine(threads, max_total_tokens=32768, enable_hierarchical_cache=True)}
    best = {name: float("inf") for name in engines}
    try:
        for eng in engines.values():
            warm(eng)
        for rep in range(reps):
            for name, eng in engines.items():
                prompts = [tokens(random.Random(100 * rep + i), length) for i in range(n)]  # unique every time
                start = time.perf_counter()
                eng.generate(input_ids=prompts, sampling_params={"max_new_tokens": output, **GREEDY})
                best[name] = min(best[name], time.perf_counter() - start)
                eng.flush_cache()
        write_ms = 1000 * engines["on"].stats()["hicache_host_write_seconds"] / reps
    finally:
        for eng in engines.values():
            eng.shutdown()
    print(f"overhead: off {best['off']:.2f} s, on {best['on']:.2f} s", flush=True)
    return {"requests": n, "seconds_off": best["off"], "seconds_on": best["on"],
            "overhead": best["on"] / best["off"] - 1, "host_write_ms_per_rep": write_ms}


FIGURES = {"multiturn": multiturn, "agent": agent, "restart": restart, "shared": shared, "overhead": overhead}


def report(results: dict) -> list[str]:
    lines = ["| figure | baseline | hierarchical cache | ratio | target |", "|---|---:|---:|---:|---|"]
    if "multiturn" in results:
        m = results["multiturn"]
        lines.append(f"| multi-turn {m['conversations']} x {m['turns']}, device pool {m['device_pool_tokens']} of "
                     f"{m['working_set_tokens']} tokens: tokens/s | {m['off']['tokens_per_s']:.0f} (off) | "
                     f"{m['on']['tokens_per_s']:.0f} | {m['speedup']:.2f}x | >= 2x |")
        lines.append(f"| its cache hit rate (unbounded device pool: {m['unbounded']['cache_hit_rate']:.1%}) | "
                     f"{m['off']['cache_hit_rate']:.1%} (off) | {m['on']['cache_hit_rate']:.1%} | "
                     f"{m['hit_rate_gap_points']:.1f} points below unbounded | within 5 points |")
    if "agent" in results:
        a = results["agent"]
        lines.append(f"| agent loop, {a['sessions']} sessions: next-turn TTFT p50 (ms) | "
                     f"{a['off']['ttft_p50_ms']:.0f} (no session_id) | {a['on']['ttft_p50_ms']:.0f} | "
                     f"{a['ttft_ratio']:.1f}x lower | >= 3x lower |")
    if "restart" in results:
        r = results["restart"]
        lines.append(f"| restart: TTFT of a known 2,000-token prefix (ms) | {r['cold_ttft_ms']:.0f} (cold) | "
                     f"{r['disk_ttft_ms']:.0f} (disk L3) | {r['ratio']:.1f}x lower | >= 5x lower |")
    if "shared" in results:
        s = results["shared"]
        lines.append(f"| second server on one Redis: TTFT of the first's 2,000-token prefix (ms) | "
                     f"{s['cold_ttft_ms']:.0f} (cold) | {s['second_server_ttft_ms']:.0f} | {s['ratio']:.1f}x lower | "
                     f">= 3x lower |")
    if "overhead" in results:
        o = results["overhead"]
        lines.append(f"| no reuse, {o['requests']} prompts at once (s) | {o['seconds_off']:.2f} (off) | "
                     f"{o['seconds_on']:.2f} | {100 * o['overhead']:+.1f}% | <= 3% |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(FIGURES))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    results = {"environment": environment(), "command": "python -m bench.bench_hicache " + " ".join(
        a for a in ("--quick" if args.quick else "", f"--only {args.only}") if a)}
    for name in args.only.split(","):
        results[name] = FIGURES[name](args.threads, args.quick)
    print("\n".join(report(results)))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
