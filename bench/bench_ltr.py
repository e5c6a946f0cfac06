"""Learned shortest-job-first (issue: learning to rank), on the embedded SmolLM2 in-process.

    python -m bench.bench_ltr [--requests 64] [--max-running 8] [--repeats 2] [--starvation-timeout-s 10]
        [--json out.json]

The prompts are the ranker's held-out set (runtime/scheduler/rankers/*.heldout.json: prompts the shipped ranker
was not trained on, with the model's own greedy output lengths, capped at 128). Reported:

1. Kendall tau of the ranker's scores against the true lengths, over the whole held-out set and within each kind.
2. A burst of --requests (half open-ended ShareGPT turns, half short-answer questions, interleaved, all arriving
   at once) on an engine with --max-running slots, greedy, the lengths' cap as max_new_tokens: mean and p99
   end-to-end latency under fcfs, ltr, and an oracle SJF (the same policy scored with the true lengths), and the
   share of the oracle's gain over fcfs that ltr reaches. Each policy runs --repeats times, the order alternating
   between rounds (this machine's speed drifts by tens of percent within minutes); medians are reported.
3. The ranker's cost per request against that request's prefill (cache flushed, one token generated).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from radixflow import Engine
from radixflow.runtime.scheduler.ranker import EMBEDDED_RANKER, kendall_tau, load_ranker


def heldout() -> list[dict]:
    return json.loads(EMBEDDED_RANKER.with_suffix(".heldout.json").read_text())


def burst(policy: str, items: list[dict], max_running: int, max_new: int, starvation_s: float,
          oracle: dict | None = None) -> dict:
    engine = Engine(schedule_policy=policy, max_running_requests=max_running, starvation_timeout_s=starvation_s)
    try:
        if oracle is not None:  # SJF with the true lengths: the best any predictor could do
            engine.core.scheduler.length_scorer = lambda ids: oracle[tuple(ids)]
        texts = [engine.apply_chat_template([{"role": "user", "content": it["prompt"]}]) for it in items]
        engine.generate(texts[:2], {"max_new_tokens": 4})  # warm-up
        engine.core.scheduler.flush_cache()
        params = {"max_new_tokens": max_new, "temperature": 0}
        latencies = [0.0] * len(texts)

        def run(i: int, submitted: float) -> None:
            engine.generate(texts[i], params)
            latencies[i] = time.perf_counter() - submitted

        start = time.perf_counter()
        with ThreadPoolExecutor(len(texts)) as pool:
            for i in range(len(texts)):
                pool.submit(run, i, time.perf_counter())
                time.sleep(0.001)  # arrivals in the interleaved order
        makespan = time.perf_counter() - start
    finally:
        engine.shutdown()
    ordered = sorted(latencies)
    return {"mean_s": statistics.mean(latencies), "p50_s": statistics.median(latencies),
            "p99_s": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], "makespan_s": makespan}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-running", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--starvation-timeout-s", type=float, default=10.0, help="the engine's guard (its default)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    items = heldout()
    max_new = 128

    engine = Engine()
    try:
        embedding = engine.core.loaded.model.embed_tokens.weight.detach()
        ranker = load_ranker(EMBEDDED_RANKER, embedding)
        ids = [engine.tokenizer.encode(engine.apply_chat_template([{"role": "user", "content": it["prompt"]}]))
               for it in items]
        start = time.perf_counter()
        scores = [ranker.score(embedding, x) for x in ids]
        score_s = (time.perf_counter() - start) / len(ids)
        prefill = []
        for x in ids[:32]:
            engine.core.scheduler.flush_cache()
            t = time.perf_counter()
            engine.generate(input_ids=x, sampling_params={"max_new_tokens": 1})
            prefill.append(time.perf_counter() - t)
    finally:
        engine.shutdown()
    lengths = [it["length"] for it in items]
    taus = {"all": kendall_tau(scores, lengths)}
    for kind in ("open", "short"):
        sel = [i for i, it in enumerate(items) if it["kind"] == kind]
        taus[kind] = kendall_tau([scores[i] for i in sel], [lengths[i] for i in sel])
    cost = {"score_ms": 1000 * score_s, "prefill_ms": 1000 * statistics.mean(prefill),
            "ratio": score_s / statistics.mean(prefill)}
    print(f"Kendall tau, held-out ({len(items)}): all {taus['all']:.3f}, open-ended {taus['open']:.3f}, "
          f"short {taus['short']:.3f}", flush=True)
    print(f"ranker cost {cost['score_ms']:.3f} ms per request, prefill {cost['prefill_ms']:.1f} ms: "
          f"{100 * cost['ratio']:.2f}%", flush=True)

    opens = [it for it in items if it["kind"] == "open"][: args.requests // 2]
    shorts = [it for it in items if it["kind"] == "short"][: args.requests // 2]
    mixed = [it for pair in zip(opens, shorts) for it in pair]
    # The oracle's table: the prompt's token ids (as the engine builds them) -> its true length.
    probe = Engine(max_running_requests=1)
    try:
        oracle = {tuple(probe.tokenizer.encode(probe.apply_chat_template([{"role": "user", "content": it["prompt"]}])
                                               )): float(it["length"]) for it in mixed}
    finally:
        probe.shutdown()
    plan = [("fcfs", "fcfs", None), ("ltr", "ltr", None), ("oracle", "ltr", oracle)]
    samples: dict[str, list[dict]] = {name: [] for name, _, _ in plan}
    for repeat in range(args.repeats):  # this machine's speed drifts: alternate the order, take the median
        for name, policy, table in plan if repeat % 2 == 0 else plan[::-1]:
            samples[name].append(burst(policy, mixed, args.max_running, max_new, args.starvation_timeout_s, table))
            r = samples[name][-1]
            print(f"{name:>6}: mean {r['mean_s']:.2f} s, p50 {r['p50_s']:.2f} s, p99 {r['p99_s']:.2f} s, makespan "
                  f"{r['makespan_s']:.1f} s", flush=True)
    runs = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in samples.items()}
    fcfs, ltr, oracle_run = runs["fcfs"], runs["ltr"], runs["oracle"]
    summary = {"ltr_vs_fcfs_mean": ltr["mean_s"] / fcfs["mean_s"],
               "oracle_vs_fcfs_mean": oracle_run["mean_s"] / fcfs["mean_s"],
               "share_of_oracle_gain": (fcfs["mean_s"] - ltr["mean_s"]) / (fcfs["mean_s"] - oracle_run["mean_s"]),
               "ltr_vs_fcfs_p99": ltr["p99_s"] / fcfs["p99_s"]}
    print(f"ltr / fcfs mean latency {summary['ltr_vs_fcfs_mean']:.2f}x (oracle {summary['oracle_vs_fcfs_mean']:.2f}x),"
          f" {100 * summary['share_of_oracle_gain']:.0f}% of the oracle's gain; p99 "
          f"{summary['ltr_vs_fcfs_p99']:.2f}x", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"commit": commit, "starvation_timeout_s": args.starvation_timeout_s,
                                         "kendall_tau": taus, "cost": cost, "runs": runs,
                                         "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
