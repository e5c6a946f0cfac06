"""Step overhead: the median wall time of one `EngineCore.step()` decoding SmolLM2 (no HTTP, no engine thread).

    python -m bench.bench_step [--batches 1,16] [--reps 3] [--weight-format auto|fp32] [--enable-torch-compile]
                               [--split] [--prompt-lens 32,1000] [--attention-backend auto|torch_native]

Each repetition admits `batch` requests with prompts of each of `--prompt-lens` tokens (distinct, so nothing is
cached) and 48 greedy output tokens, and steps until they finish; only steps in which every running request decodes
are timed (the first length is the headline `batch_N_ms`; the others are reported as `batch_N_prompt_L_ms`). Run it
on two commits, or two `--attention-backend`s, back to back to see whether a change costs per-step time (the figure
is absolute: compare it only with a run on the same machine at about the same time).

`--split` also times the linear layers alone: every linear layer of the model called in turn on a batch-sized
input, outside any step (the weights' share of a step: streaming them through the matmul kernels), and reports the
rest of the step (attention, norms, RoPE, sampling, scheduling, per-op overhead) as the difference. It works the
same with `--enable-torch-compile`, whose compiled step the linear layers run inside.
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


def decode_step_seconds(core: EngineCore, batch: int, reps: int, prompt_len: int = 32) -> list[float]:
    """Wall seconds of every step in which every running request decodes."""
    steps = []
    for rep in range(reps):
        for i in range(batch):
            prompt = tuple((100 + 40 * i + j) % 40000 for j in range(prompt_len))
            core.scheduler.add_request(Req(rid=f"b{batch}-{rep}-{i}", prompt_ids=prompt, params=SamplingParams(
                max_new_tokens=48, ignore_eos=True, temperature=0.0)))
        while not core.scheduler.idle:
            decoding = not core.scheduler.waiting and all(r.num_pending == 1 for r in core.scheduler.running)
            start = time.perf_counter()
            core.step()
            if decoding and core.scheduler.running:
                steps.append(time.perf_counter() - start)
        core.scheduler.flush_cache()
    return steps


def median_decode_step_ms(core: EngineCore, batch: int, reps: int, prompt_len: int = 32) -> float:
    return 1e3 * statistics.median(decode_step_seconds(core, batch, reps, prompt_len))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--weight-format", default="auto")
    parser.add_argument("--enable-torch-compile", action="store_true")
    parser.add_argument("--split", action="store_true")
    parser.add_argument("--prompt-lens", default="32")
    parser.add_argument("--attention-backend", default="auto")
    args = parser.parse_args()
    lens = [int(n) for n in args.prompt_lens.split(",")]
    torch.set_num_threads(2)
    core = EngineCore(EngineConfig.from_kwargs(
        max_total_tokens=max(16384, 2 * max(map(int, args.batches.split(","))) * (max(lens) + 64)),
        weight_format=args.weight_format, enable_torch_compile=args.enable_torch_compile,
        attention_backend=args.attention_backend))
    result = {}
    for b in map(int, args.batches.split(",")):
        for n in lens[1:]:  # longer contexts: the step alone
            result[f"batch_{b}_prompt_{n}_ms"] = round(median_decode_step_ms(core, b, args.reps, n), 2)
        result[f"batch_{b}_ms"] = round(median_decode_step_ms(core, b, args.reps, lens[0]), 2)
        if args.split:
            linear_ms = linear_layers_ms(core.runner.model, b, args.reps)
            result[f"batch_{b}_linear_ms"] = round(linear_ms, 2)
            result[f"batch_{b}_rest_ms"] = round(result[f"batch_{b}_ms"] - linear_ms, 2)
    print(json.dumps(result))


@torch.inference_mode()
def linear_layers_ms(model: torch.nn.Module, batch: int, reps: int) -> float:
    """Median time of calling every linear layer of `model` once, in model order, on `batch` random rows: each
    weight comes from memory, as in a step."""
    linears = [m for m in model.modules() if isinstance(m, llama.Linear)]
    inputs = [torch.randn(batch, m.in_features) for m in linears]
    times = []
    for _ in range(max(reps, 3) * 5):
        start = time.perf_counter()
        for m, x in zip(linears, inputs):
            m(x)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


if __name__ == "__main__":
    main()
