"""Step overhead: the median wall time of one `EngineCore.step()` decoding SmolLM2 (no HTTP, no engine thread).

    python -m bench.bench_step [--batches 1,16] [--reps 3] [--weight-format auto|fp32] [--split]

Each repetition admits `batch` requests with 32-token prompts (distinct, so nothing is cached) and 48 greedy output
tokens, and steps until they finish; only steps in which every running request decodes are timed. Run it on two
commits back to back to see whether a change costs per-step time (the figure is absolute: compare it only with a
run on the same machine at about the same time).

`--split` also times the linear layers (every `Linear.forward`, the weights' share of a step) and reports the rest
of the step (attention, norms, RoPE, sampling, scheduling) as the difference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from radixflow.runtime.config import EngineConfig
from radixflow.runtime.engine_core import EngineCore
from radixflow.runtime.model import llama
from radixflow.runtime.request import Req
from radixflow.runtime.sampling_params import SamplingParams


def decode_steps(core: EngineCore, batch: int, reps: int, tag: str,
                 counter=lambda: 0.0) -> list[tuple[float, float]]:
    """(wall seconds, growth of `counter()`) of every step in which every running request decodes."""
    steps = []
    for rep in range(reps):
        for i in range(batch):
            prompt = tuple(range(100 + 40 * i, 132 + 40 * i))
            core.scheduler.add_request(Req(rid=f"{tag}{batch}-{rep}-{i}", prompt_ids=prompt, params=SamplingParams(
                max_new_tokens=48, ignore_eos=True, temperature=0.0)))
        while not core.scheduler.idle:
            decoding = not core.scheduler.waiting and all(r.num_pending == 1 for r in core.scheduler.running)
            before, start = counter(), time.perf_counter()
            core.step()
            if decoding and core.scheduler.running:
                steps.append((time.perf_counter() - start, counter() - before))
        core.scheduler.flush_cache()
    return steps


def median_decode_step_ms(core: EngineCore, batch: int, reps: int) -> float:
    return 1e3 * statistics.median(wall for wall, _ in decode_steps(core, batch, reps, "b"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--weight-format", default="auto")
    parser.add_argument("--split", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    core = EngineCore(EngineConfig.from_kwargs(max_total_tokens=16384, weight_format=args.weight_format))
    result = {}
    for b in map(int, args.batches.split(",")):
        result[f"batch_{b}_ms"] = round(median_decode_step_ms(core, b, args.reps), 2)
        if args.split:
            linear_ms, step_ms = linear_share_ms(core, b, args.reps)
            result[f"batch_{b}_linear_ms"] = round(linear_ms, 2)
            result[f"batch_{b}_rest_ms"] = round(step_ms - linear_ms, 2)
    print(json.dumps(result))


def linear_share_ms(core: EngineCore, batch: int, reps: int) -> tuple[float, float]:
    """Mean time per decode step inside linear layers, and the mean step time, measured together."""
    spent = [0.0]
    forward = llama.Linear.forward

    def timed(self, x):
        start = time.perf_counter()
        out = forward(self, x)
        spent[0] += time.perf_counter() - start
        return out

    llama.Linear.forward = timed
    try:
        steps = decode_steps(core, batch, reps, "s", counter=lambda: spent[0])
    finally:
        llama.Linear.forward = forward
    return 1e3 * sum(lin for _, lin in steps) / len(steps), 1e3 * sum(wall for wall, _ in steps) / len(steps)

if __name__ == "__main__":
    main()
