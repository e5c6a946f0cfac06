"""One system's part of the suite, run in a child process of its own (`bench/suite/__main__.py` says why): load
it, run each workload on it, append the rows. Apart from `__main__` so that a spawned child can import it."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.suite.systems import System, make_system
from bench.suite.workloads import BY_NAME, Workload

LATENCY_PROGRAMS = (4, 1)  # programs timed one at a time on systems that batch: full, quick


def run_workload(workload: Workload, system: System, quick: bool, seed: int = 0) -> dict:
    n = workload.sizes[1 if quick else 0]
    items = workload.make(n, seed)
    batch = [args for args, _ in items]
    out = {"workload": workload.name, "system": system.name, "programs": n, "prefix_heavy": workload.prefix_heavy}
    try:
        workload.program.run(**batch[0], backend=system.backend)  # warm-up: first-call costs are not the figure
        system.flush()
        latencies = []
        # One call at a time anyway: the throughput run's programs are each alone, so it gives the latency too.
        for args in batch[:LATENCY_PROGRAMS[1 if quick else 0]] if system.parallel > 1 else []:
            start = time.perf_counter()
            state = workload.program.run(**args, backend=system.backend)
            latencies.append(time.perf_counter() - start)
            if state.error() is not None:
                raise state.error()
        system.flush()
        before = system.counters()
        start = time.perf_counter()
        states = workload.program.run_batch(batch, backend=system.backend, num_threads=system.parallel,
                                            temperature=0.0)
        seconds = time.perf_counter() - start
        after = system.counters()
    except Exception as exc:  # noqa: BLE001 - a system that cannot run a workload is a result, not a crash
        return {**out, "error": f"{type(exc).__name__}: {exc}"[:300]}
    errors = [s.error() for s in states if s.error() is not None]
    if errors:
        out["failed"], out["error"] = len(errors), f"{type(errors[0]).__name__}: {errors[0]}"[:300]
    out.update(seconds=seconds, throughput=n / seconds, latency_s=statistics.mean(latencies or [seconds / n]))
    if workload.correct is not None:
        out["accuracy"] = sum(s.error() is None and _correct(workload, s, exp)
                              for s, (_, exp) in zip(states, items, strict=True)) / n
    if before is not None:
        hits, prompts = after[0] - before[0], after[1] - before[1]
        out["cache_hit_rate"] = hits / prompts if prompts else 0.0
    return out


def _correct(workload: Workload, state, expected) -> bool:
    try:
        return bool(workload.correct(state, expected))
    except (KeyError, TypeError, AttributeError):
        return False


def run_system(name: str, args: argparse.Namespace, workload_names: list[str], env: dict, results: Path) -> None:
    """In a child process: load system `name`, run the workloads on it and append a row per workload to `results`
    as each finishes (the systems run one at a time, so one writer)."""
    torch.set_num_threads(args.threads)
    print(f"loading {name} ...", file=sys.stderr, flush=True)
    system = make_system(name, args.model, args.threads, args.parallel, args.llama_server_slots,
                         args.enable_torch_compile)
    try:
        for workload in map(BY_NAME.get, workload_names):
            row = {**env, **run_workload(workload, system, args.quick), "notes": system.notes}
            with results.open("a") as out:
                out.write(json.dumps(row) + "\n")
            shown = (f"{row['throughput']:.3f} programs/s, latency {row['latency_s']:.2f} s"
                     if "throughput" in row else f"failed: {row['error']}")
            print(f"{workload.name} on {name}: {shown}", file=sys.stderr, flush=True)
    finally:
        system.close()
