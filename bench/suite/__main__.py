"""The SGLang paper's workload suite, radixflow side by side with what its users would run instead.

    python -m bench.suite [--quick] [--only mmlu,react,...]
                          [--baselines transformers,llama.cpp,llama-server,radixflow-no-radix,openai:URL]
                          [--llama-server-slots 8] [--enable-torch-compile] [--model PATH] [--out DIR]

Each system runs alone in a child process of its own (loaded once, every workload in turn, then closed), the
systems one after another. In one process they slow each other down: torch and llama-cpp-python share one GNU
OpenMP runtime, and once two threads own OpenMP teams (two engines, or an engine and llama.cpp) there are more
OpenMP threads than cores, so the runtime stops spinning between parallel regions and every small op pays a wake-up.
A radixflow decode measured 60-70% slower with a second, idle engine loaded in the process (2026-12-06). Per
workload and system:
- latency: the first few programs run one at a time on a flushed cache, mean seconds per program (the paper's
  latency: one program alone; on a system that runs one at a time anyway, the throughput run's mean);
- throughput: all its programs, the cache flushed first, `run_batch` with as many in flight as the system takes
  (radixflow: `--parallel`; transformers and llama-cpp-python: one at a time, as their users call them;
  llama-server and an OpenAI-compatible server: `--parallel`), programs per second;
- accuracy where the workload has answers, and the radix cache hit rate where the system reports one.

Writes DIR/results.jsonl (one line per workload and system, with the command, commit, machine and versions),
DIR/throughput.png (throughput normalised to the best system per workload, as the paper's Figure 5) and
DIR/latency.png, and prints the table. A baseline that is not installed is skipped with a line saying so.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from bench.suite.runs import run_system
from bench.suite.systems import BASELINES, available
from bench.suite.workloads import BY_NAME, WORKLOADS

REPO = Path(__file__).resolve().parents[2]


def environment(argv: list[str]) -> dict:
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for module in ("transformers", "llama_cpp"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            pass
    return {"command": " ".join(["python -m bench.suite", *argv]), "commit": git.stdout.strip() or "unknown",
            "machine": {"cpu": cpu, "nproc": len(os.sched_getaffinity(0))}, "versions": versions,
            "date": time.strftime("%Y-%m-%d")}


def table(rows: list[dict], systems: list[str]) -> str:
    lines = ["| workload | system | programs/s | vs best | latency s | accuracy | cache hit rate | note |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for name in dict.fromkeys(r["workload"] for r in rows):
        group = [r for r in rows if r["workload"] == name]
        best = max((r.get("throughput", 0.0) for r in group), default=0.0)
        for system in systems:
            r = next((r for r in group if r["system"] == system), None)
            if r is None:
                continue
            if "throughput" not in r:
                lines.append(f"| {name} | {system} | | | | | | failed: {r['error']} |")
                continue
            acc = f"{r['accuracy']:.0%}" if "accuracy" in r else ""
            hit = f"{r['cache_hit_rate']:.2f}" if "cache_hit_rate" in r else ""
            note = f"{r['failed']} failed: {r['error']}" if r.get("failed") else ""
            lines.append(f"| {name} | {system} | {r['throughput']:.3f} | {r['throughput'] / best:.2f} | "
                         f"{r['latency_s']:.2f} | {acc} | {hit} | {note} |")
    return "\n".join(lines)


def verdicts(rows: list[dict]) -> list[str]:
    """radixflow against the best baseline per workload, and the issue's targets."""
    out = []
    for name in dict.fromkeys(r["workload"] for r in rows):
        group = {r["system"]: r for r in rows if r["workload"] == name and "throughput" in r}
        ours = group.get("radixflow")
        others = [r for s, r in group.items() if s != "radixflow"]
        if ours is None or not others:
            continue
        best = max(others, key=lambda r: r["throughput"])
        ratio = ours["throughput"] / best["throughput"]
        target = 3.0 if ours["prefix_heavy"] else 1.0
        verdict = "met" if ratio >= target else "MISSED"
        out.append(f"{name}: radixflow {ratio:.2f}x the best baseline ({best['system']}); target >= {target:g}x: "
                   f"{verdict}")
    return out


def plot(rows: list[dict], systems: list[str], out_dir: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["workload"] for r in rows))
    width = 0.8 / len(systems)
    for metric, ylabel, fname, normalise in (("throughput", "throughput (normalised to the best)", "throughput.png",
                                               True),
                                              ("latency_s", "latency of one program (s)", "latency.png", False)):
        fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(names)), 4.2))
        for k, system in enumerate(systems):
            values = []
            for name in names:
                group = [r for r in rows if r["workload"] == name and metric in r]
                r = next((r for r in group if r["system"] == system), None)
                best = max((g[metric] for g in group), default=0.0)
                values.append(0.0 if r is None else r[metric] / best if normalise else r[metric])
            ax.bar([i + (k - (len(systems) - 1) / 2) * width for i in range(len(names))], values, width,
                   label=system)
        ax.set_xticks(range(len(names)), names, rotation=25, ha="right")
        ax.set(ylabel=ylabel, title=title)
        if not normalise:
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, not over them
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=110)
        plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few programs per workload (minutes, not an hour)")
    parser.add_argument("--only", help=f"workloads, comma-separated, from: {', '.join(BY_NAME)}")
    parser.add_argument("--baselines", default=",".join(BASELINES),
                        help="comma-separated: transformers, llama.cpp, llama-server ($LLAMA_SERVER or on PATH), "
                             "radixflow-no-radix, openai:URL")
    parser.add_argument("--llama-server-slots", type=int, default=8, help="llama-server's parallel slots (-np)")
    parser.add_argument("--enable-torch-compile", action="store_true",
                        help="radixflow (and its ablation) compile their decode steps (startup takes minutes)")
    parser.add_argument("--model", help="a GGUF file or HF directory (default: the embedded SmolLM2)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for every system")
    parser.add_argument("--parallel", type=int, default=32, help="programs in flight on systems that batch")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "figures" / "suite")
    parser.add_argument("--replot", type=Path, nargs="+", metavar="JSONL",
                        help="print the table and draw the charts of saved results.jsonl files (the later file's "
                             "rows replace the earlier's for the same workload and system) into --out; run nothing")
    args = parser.parse_args(argv)
    if args.replot:
        merged = {}
        for path in args.replot:
            for line in path.read_text().splitlines():
                row = json.loads(line)
                merged[row["workload"], row["system"]] = row
        rows = sorted(merged.values(), key=lambda r: [w.name for w in WORKLOADS].index(r["workload"]))
        size = "quick" if "--quick" in rows[0]["command"] else "full"
        report(rows, list(dict.fromkeys(r["system"] for r in rows)), args.out,
               f"{size} suite, {rows[0]['commit']} (saved results), {rows[0]['machine']['cpu']}")
        return
    workloads = WORKLOADS
    if args.only:
        unknown = [w for w in args.only.split(",") if w not in BY_NAME]
        if unknown:
            parser.error(f"--only: unknown workloads {unknown}; choose from {', '.join(BY_NAME)}")
        workloads = [BY_NAME[w] for w in args.only.split(",")]
    torch.set_num_threads(args.threads)
    env = environment(argv)
    names = ["radixflow"]
    for name in [b for b in args.baselines.split(",") if b]:
        why = available(name)
        if why:
            print(f"skipping {name}: {why}", file=sys.stderr)
        else:
            names.append(name)
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    results.write_text("")
    spawn = multiprocessing.get_context("spawn")
    for name in names:
        child = spawn.Process(target=run_system, args=(name, args, [w.name for w in workloads], env, results))
        child.start()
        child.join()
        if child.exitcode != 0:  # the other systems still run; the table shows what this one finished
            print(f"{name}: its process exited with code {child.exitcode} (its error is above)", file=sys.stderr)
    order = [w.name for w in workloads]
    rows = sorted((json.loads(line) for line in results.read_text().splitlines()),
                  key=lambda r: (order.index(r["workload"]), names.index(r["system"])))
    results.write_text("".join(json.dumps(row) + "\n" for row in rows))  # workload by workload, as the table
    print(f"{env['command']} at {env['commit']}, {env['machine']}, {env['versions']}\n")
    report(rows, names, args.out, f"{'quick' if args.quick else 'full'} suite, {env['commit']}, {args.threads} threads")
    print(f"results: {args.out / 'results.jsonl'}")


def report(rows: list[dict], systems: list[str], out_dir: Path, title: str) -> None:
    print(table(rows, systems))
    print()
    print("\n".join(verdicts(rows)))
    out_dir.mkdir(parents=True, exist_ok=True)
    plot(rows, systems, out_dir, title)
    print(f"\ncharts: {out_dir / 'throughput.png'}, {out_dir / 'latency.png'}")


if __name__ == "__main__":
    main()
