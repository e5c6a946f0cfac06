"""Prefill/decode disaggregation against colocated serving (issue: PD disaggregation).

    python -m bench.bench_disagg [--rates 0.1,0.2,0.3,0.4] [--requests 32] [--long-fraction 0.25]
        [--png bench/figures/disagg_goodput.png] [--json out.json]

Two deployments of the embedded SmolLM2 on this machine, each 2 servers with one torch thread apiece:
  colocated      two `radixflow serve` workers behind `radixflow router` (cache_aware, its default)
  disaggregated  one `--disaggregation-mode prefill` and one `--disaggregation-mode decode` server behind
                 `radixflow router --pd-disaggregation`
Both keep every other setting at its default (chunked prefill with a 512-token step budget).

The workload: Poisson arrivals mixing long prompts (2,000-4,000 random tokens, 32 output tokens; --long-fraction of
the requests) with short chat turns (64-192 tokens, 64 output tokens), every prompt unique, greedy with ignore_eos,
streamed from /generate. The same requests at every rate; at each rate both deployments run them (alternating which
goes first), with every server's cache flushed before each run.

Per run: TTFT, TPOT ((e2e - TTFT) / (tokens - 1), per request) and ITL percentiles; SLO attainment with DistServe's
metric at the issue's targets (TTFT <= 4 s and TPOT <= 150 ms), overall and per class; goodput (requests within
both SLOs per second of the run). For the disaggregated deployment, the KV transfer cost from the decode server's
own counters: bytes and milliseconds per transferred prompt token, and the transfer's share of TTFT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.bench_serving import INF, REPO, environment, percentiles, run_at_rate
from bench.serving_data import LOWEST_ID, BenchRequest
from radixflow.server.launch import ServerProcess, free_port

TTFT_SLO_S = 4.0
TPOT_SLO_S = 0.150
LONG = (2000, 4000, 32)  # prompt length range, output tokens
SHORT = (64, 192, 64)
WARMUP = BenchRequest(list(range(LOWEST_ID, LOWEST_ID + 600)), 8)  # runs a 512-token chunk and a decode


def workload(n: int, long_fraction: float, vocab: int, seed: int = 0) -> list[BenchRequest]:
    rng = random.Random(seed)
    requests = []
    for _ in range(n):
        low, high, out = LONG if rng.random() < long_fraction else SHORT
        requests.append(BenchRequest([rng.randrange(LOWEST_ID, vocab) for _ in range(rng.randint(low, high))], out))
    return requests


class Fleet:
    """Two servers and a router in front, each its own process, started here and stopped by `stop`."""

    def __init__(self, name: str, logs: Path, server_args: list[list[str]], router_args):
        self.name = name
        common = ["--num-threads", "1", "--log-level", "warning"]
        self.servers = [ServerProcess([*common, *args], log=logs / f"{name}-server{i}.log").start()
                        for i, args in enumerate(server_args)]
        for s in self.servers:
            s.wait_ready()
        self.router = ServerProcess([*router_args(self.servers), "--log-level", "warning"], command="router",
                                    log=logs / f"{name}-router.log").start().wait_ready(60)
        self.url = self.router.url

    def flush(self) -> None:
        for s in self.servers:
            for _ in range(40):  # refused while a request is still leaving
                if httpx.post(f"{s.url}/flush_cache", json={}, timeout=30).status_code == 200:
                    break
                time.sleep(0.5)
            else:
                raise RuntimeError(f"{self.name}: {s.url} kept refusing /flush_cache")

    def stats(self) -> list[dict]:
        return [httpx.get(f"{s.url}/get_server_info", timeout=30).json()["stats"] for s in self.servers]

    def errors(self) -> str:
        logs = [p.log_tail() for p in (*self.servers, self.router)]
        return "\n".join(t for t in logs if "Traceback" in t or "ERROR" in t)

    def stop(self) -> None:
        self.router.stop()
        for s in self.servers:
            s.stop()


def colocated(logs: Path) -> Fleet:
    return Fleet("colocated", logs, [[], []], lambda s: ["--worker-urls", s[0].url, s[1].url])


def disaggregated(logs: Path) -> Fleet:
    port = free_port()
    return Fleet("disaggregated", logs,
                 [["--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port", str(port)],
                  ["--disaggregation-mode", "decode"]],
                 lambda s: ["--pd-disaggregation", "--prefill", s[0].url, str(port), "--decode", s[1].url])


def attained(rec) -> bool:
    return rec.error is None and rec.ttft <= TTFT_SLO_S and (rec.tpot is None or rec.tpot <= TPOT_SLO_S)


def summarize(records, duration: float, long_min: int) -> dict:
    ok = [r for r in records if r.error is None]
    classes = {"long": [r for r in records if r.prompt_len >= long_min],
               "short": [r for r in records if r.prompt_len < long_min]}
    met = [r for r in records if attained(r)]
    return {
        "completed": len(ok), "failed": len(records) - len(ok), "errors": [r.error for r in records if r.error][:3],
        "duration_s": duration, "throughput_rps": len(ok) / duration,
        "goodput_rps": len(met) / duration, "attainment": len(met) / len(records),
        "attainment_by_class": {k: (sum(map(attained, v)) / len(v) if v else None) for k, v in classes.items()},
        "ttft_ok": sum(r.error is None and r.ttft <= TTFT_SLO_S for r in records) / len(records),
        "tpot_ok": sum(r.error is None and (r.tpot is None or r.tpot <= TPOT_SLO_S) for r in records) / len(records),
        "ttft_s": percentiles([r.ttft for r in ok]),
        "ttft_s_by_class": {k: percentiles([r.ttft for r in v if r.error is None]) for k, v in classes.items()},
        "tpot_ms": percentiles([r.tpot for r in ok if r.tpot is not None], 1e3),
        "itl_ms": percentiles([x for r in ok for x in r.itls], 1e3),
    }


def transfer_cost(before: list[dict], after: list[dict], prompt_tokens: int, ttfts: list[float]) -> dict:
    """From the decode server's counters (the second server): what moving the prompts' KV cost."""
    d = {k: after[1][k] - before[1][k] for k in ("kv_transfers", "kv_transfer_bytes", "kv_transfer_seconds",
                                                 "kv_transfer_failures")}
    return {**d, "bytes_per_token": d["kv_transfer_bytes"] / prompt_tokens,
            "ms_per_1k_tokens": 1e6 * d["kv_transfer_seconds"] / prompt_tokens,
            "share_of_ttft": d["kv_transfer_seconds"] / sum(ttfts)}


def run(fleet: Fleet, requests: list[BenchRequest], rate: float) -> dict:
    fleet.flush()
    before = fleet.stats()
    records, duration = asyncio.run(run_at_rate(fleet.url, requests, rate))
    out = summarize(records, duration, LONG[0])
    if fleet.name == "disaggregated":
        out["transfer"] = transfer_cost(before, fleet.stats(), sum(r.prompt_len for r in records if r.error is None),
                                        [r.ttft for r in records if r.error is None])
    return out


def plot(results: dict, rates: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, style in (("colocated", "o-"), ("disaggregated", "s-")):
        runs = [results[name][f"{r:g}"] for r in rates]
        ax1.plot(rates, [x["goodput_rps"] for x in runs], style, label=name)
        ax2.plot(rates, [x["tpot_ms"]["p99"] for x in runs], style, label=name)
    ax1.set(xlabel="request rate (req/s)", ylabel="goodput (req/s within SLO)",
            title=f"Goodput, TTFT <= {TTFT_SLO_S:g} s and TPOT <= {TPOT_SLO_S * 1e3:g} ms")
    ax1.set_ylim(bottom=0)
    ax2.set(xlabel="request rate (req/s)", ylabel="p99 TPOT (ms)", yscale="log", title="p99 time per output token")
    ax2.axhline(TPOT_SLO_S * 1e3, color="grey", linestyle=":", label="TPOT SLO")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("SmolLM2-135M, 2 servers x 1 thread each, 2,000-4,000-token prompts mixed with chat turns")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def report(results: dict, rates: list[float]) -> None:
    print("\n| rate | deployment | goodput | attainment (short / long) | TTFT p50 / p99 s | TPOT p50 / p99 ms |"
          " ITL p99 ms | failed |")
    print("|---|---|---|---|---|---|---|---|")
    for rate in rates:
        for name in ("colocated", "disaggregated"):
            x = results[name][f"{rate:g}"]
            by = x["attainment_by_class"]
            cls = " / ".join("-" if by[k] is None else f"{by[k]:.0%}" for k in ("short", "long"))
            print(f"| {rate:g} | {name} | {x['goodput_rps']:.3f} | {x['attainment']:.0%} ({cls}) | "
                  f"{x['ttft_s']['p50']:.2f} / {x['ttft_s']['p99']:.2f} | {x['tpot_ms']['p50']:.0f} / "
                  f"{x['tpot_ms']['p99']:.0f} | {x['itl_ms']['p99']:.0f} | {x['failed']} |")
    print()
    for rate in rates:
        c, d = results["colocated"][f"{rate:g}"], results["disaggregated"][f"{rate:g}"]
        t = d["transfer"]
        good = d["goodput_rps"] / c["goodput_rps"] if c["goodput_rps"] else float("inf")
        print(f"rate {rate:g}: p99 TPOT colocated/disaggregated {c['tpot_ms']['p99'] / d['tpot_ms']['p99']:.1f}x, "
              f"goodput disaggregated/colocated {good:.2f}x; KV transfer {t['bytes_per_token'] / 1024:.1f} KiB and "
              f"{t['ms_per_1k_tokens']:.1f} ms per 1k prompt tokens ({t['share_of_ttft']:.1%} of TTFT)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="0.1,0.2,0.3,0.4", help="request rates (req/s), comma-separated")
    parser.add_argument("--requests", type=int, default=32, help="requests per run")
    parser.add_argument("--long-fraction", type=float, default=0.25)
    parser.add_argument("--png", type=Path, default=REPO / "bench" / "figures" / "disagg_goodput.png")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--replot", type=Path, metavar="JSON", help="report and draw a saved --json; run nothing")
    args = parser.parse_args()
    if args.replot:
        saved = json.loads(args.replot.read_text())
        print(saved["env"])
        report(saved["results"], saved["rates"])
        plot(saved["results"], saved["rates"], args.png)
        print(f"\nfigure: {args.png}")
        return
    rates = [float(r) for r in args.rates.split(",")]
    from radixflow.runtime.model_source import resolve_model
    from radixflow.runtime.tokenizer import load_tokenizer

    requests = workload(args.requests, args.long_fraction, len(load_tokenizer(resolve_model(None))))
    env = {**environment(), "threads": "1 per server"}  # the commit the servers start from
    logs = Path(tempfile.mkdtemp(prefix="bench-disagg-"))
    fleets = []
    try:
        fleets = [colocated(logs), disaggregated(logs)]
        for fleet in fleets:  # the first SmolLM2 forward of a process packs weights: not part of any figure
            asyncio.run(run_at_rate(fleet.url, [WARMUP], INF))
        results = {f.name: {} for f in fleets}
        for i, rate in enumerate(rates):
            for fleet in fleets if i % 2 == 0 else fleets[::-1]:
                print(f"{fleet.name}: {len(requests)} requests at {rate:g} req/s ...", file=sys.stderr, flush=True)
                results[fleet.name][f"{rate:g}"] = out = run(fleet, requests, rate)
                print(f"  goodput {out['goodput_rps']:.3f} req/s, attainment {out['attainment']:.0%}, TTFT p50 "
                      f"{out['ttft_s']['p50']:.2f} s, TPOT p99 {out['tpot_ms']['p99']:.0f} ms", file=sys.stderr)
                if out["failed"]:
                    print(f"  {out['failed']} failed, e.g. {out['errors'][0]}", file=sys.stderr)
        for fleet in fleets:
            if fleet.errors():
                print(f"{fleet.name} logs ({logs}) report errors:\n{fleet.errors()}", file=sys.stderr)
    finally:
        for fleet in fleets:
            fleet.stop()
    n_long = sum(len(r.prompt_ids) >= LONG[0] for r in requests)
    print(f"{len(requests)} requests ({n_long} long), SLO TTFT <= {TTFT_SLO_S:g} s, TPOT <= {TPOT_SLO_S * 1e3:g} ms; "
          f"{env}")
    report(results, rates)
    plot(results, rates, args.png)
    print(f"\nfigure: {args.png}")
    if args.json:
        args.json.write_text(json.dumps({"env": env, "rates": rates, "results": results}, indent=1))


if __name__ == "__main__":
    main()
