"""Where the 4-bit kernel beats the fp32 weight: SmolLM2's linear layers (all but the LM head) at several row counts,
the block-quant kernel against the dequantized fp32 weight (oneDNN), and whole decode steps with the kernel's row
limit at its value against a lower one.

    python -m bench.bench_linears [--rows 1,4,8,16,24] [--steps 20,24] [--below 16] [--reps 15]

Each pair of sides takes turns rep by rep in one process (medians), so the ratio holds on a noisy machine. `--rows`:
every linear layer called in model order on that many random rows (each weight from memory, as in a step).
`--steps`: eager decode steps at those batch sizes (bench_step's timing) with `Linear`s' `max_rows` at the kernel's
limit, then at `--below` (the fp32 weight takes the calls above it): the figure behind `blockq.MAX_ROWS`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bench.bench_step import decode_step_seconds
from radixflow.runtime.config import EngineConfig
from radixflow.runtime.engine_core import EngineCore
from radixflow.runtime.model import llama


def linears_ms(layers: list[llama.Linear], rows: int, reps: int) -> tuple[float, float]:
    """Median ms of all `layers` at `rows` rows: (4-bit kernel, fp32 weight)."""
    inputs = [torch.randn(rows, m.in_features) for m in layers]
    kernels = [m.int4 for m in layers]
    times = {"int4": [], "fp32": []}
    for rep in range(reps):
        for side in ("int4", "fp32") if rep % 2 else ("fp32", "int4"):
            for m, kernel in zip(layers, kernels):
                m.int4 = kernel if side == "int4" else None
            start = time.perf_counter()
            for m, x in zip(layers, inputs):
                m(x)
            times[side].append(time.perf_counter() - start)
    for m, kernel in zip(layers, kernels):
        m.int4 = kernel
    return 1e3 * statistics.median(times["int4"]), 1e3 * statistics.median(times["fp32"])


def steps_ms(core: EngineCore, layers: list[llama.Linear], batch: int, below: int, reps: int) -> tuple[float, float]:
    """Median ms of an eager decode step at `batch`: (max_rows at the kernel's limit, at `below`)."""
    limit = layers[0].int4.max_rows
    times = {limit: [], below: []}
    for rep in range(reps):
        for rows in (limit, below) if rep % 2 else (below, limit):
            for m in layers:
                m.int4.max_rows = rows
            times[rows] += decode_step_seconds(core, batch, 1)
    for m in layers:
        m.int4.max_rows = limit
    return 1e3 * statistics.median(times[limit]), 1e3 * statistics.median(times[below])


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,4,8,16,24")
    parser.add_argument("--steps", default="")
    parser.add_argument("--below", type=int, default=16)
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(2)
    core = EngineCore(EngineConfig.from_kwargs(max_total_tokens=16384))
    model = core.runner.model
    layers = [m for name, m in model.named_modules() if isinstance(m, llama.Linear) and name != "lm_head"]
    if any(m.int4 is None for m in layers):
        raise SystemExit("the linear layers hold no 4-bit weights here (weight format, or no kernel for this CPU)")
    kernel = type(layers[0].int4).__name__
    result = {"kernel": kernel, "max_rows": layers[0].int4.max_rows}
    for rows in (int(r) for r in args.rows.split(",") if r):
        if rows > result["max_rows"]:
            parser.error(f"--rows: at most the kernel's max_rows ({result['max_rows']}), got {rows}")
        int4, fp32 = linears_ms(layers, rows, args.reps)
        result[f"linears_rows_{rows}"] = {"int4_ms": round(int4, 2), "fp32_ms": round(fp32, 2),
                                          "fp32_over_int4": round(fp32 / int4, 2)}
        print(f"linears, {rows} rows: {kernel} {int4:.2f} ms, fp32 {fp32:.2f} ms ({fp32 / int4:.2f}x)", flush=True)
    for batch in (int(b) for b in args.steps.split(",") if b):
        at_limit, below = steps_ms(core, layers, batch, args.below, max(2, args.reps // 4))
        result[f"step_batch_{batch}"] = {"limit_ms": round(at_limit, 2), f"below_{args.below}_ms": round(below, 2),
                                         "ratio": round(below / at_limit, 2)}
        print(f"decode step, batch {batch}: max_rows {result['max_rows']} {at_limit:.1f} ms, {args.below} "
              f"{below:.1f} ms ({below / at_limit:.2f}x)", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
