"""Runtime benchmark: radixflow against Hugging Face transformers on SmolLM2-135M, fp32, 2 CPU threads.

Measures prefill tokens/s for a 512-token prompt and aggregate decode tokens/s at batch 1, 8 and 32. Both engines
run in the same process on identical random prompts, next to a roofline built from this machine's matmul GFLOP/s
and memory bandwidth, measured in the same run.

    python -m bench.bench_runtime [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are local; never wait on the network
os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF loader draws a progress bar of its own

import torch

THREADS = 2
SEED = 0
LOWEST_ID = 100  # SmolLM2's special tokens sit below this; random prompts stay clear of them
CHECK_TOKENS = 16
FP32_BYTES = 4


@dataclass(frozen=True)
class Settings:
    reps: int
    prefill_len: int = 512
    decode_prompt_len: int = 64
    decode_new: int = 64
    batches: tuple[int, ...] = (1, 8, 32)


FULL = Settings(reps=4)
QUICK = replace(FULL, reps=1, decode_new=32)


# -- timing ------------------------------------------------------------------------------------------------------
def elapsed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def best_time(fn, reps: int) -> float:
    fn()  # warm-up: first calls pay for allocation and thread start-up
    return min(elapsed(fn) for _ in range(reps))


# -- the machine -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Machine:
    matmul_gflops: float
    memory_gbps: float


def measure_machine(n: int = 2048, megabytes: int = 512, reps: int = 5) -> Machine:
    """fp32 matmul peak: the better of torch's default matmul (MKL) and oneDNN with a prepacked weight (what
    radixflow's linear layers use; MKL does not use AVX-512 on AMD CPUs, so the two differ by 2x+ there)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    x = torch.ones(megabytes * 2**20 // FP32_BYTES)
    best = best_time(lambda: a @ b, reps)
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(b.t().contiguous(), n)
        best = min(best, best_time(lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], ""), reps))
    except (RuntimeError, AttributeError):
        pass
    return Machine(matmul_gflops=2 * n**3 / best / 1e9,
                   memory_gbps=x.numel() * FP32_BYTES / best_time(x.sum, reps) / 1e9)


@dataclass(frozen=True)
class CpuClock:
    """Wall time, CPU time busy machine-wide (Linux /proc/stat) and CPU time of this process, at one moment."""
    wall: float
    busy: float
    ours: float

    @classmethod
    def now(cls) -> "CpuClock":
        user, nice, system, _idle, _iowait, irq, softirq = map(int, Path("/proc/stat").read_text().split()[1:8])
        busy = (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")
        return cls(time.perf_counter(), busy, time.process_time())

    def others_share_since(self, start: "CpuClock") -> float:
        """Share of the machine's CPUs that other processes used in between: the noise in every figure."""
        others = (self.busy - start.busy) - (self.ours - start.ours)
        return max(others, 0.0) / ((self.wall - start.wall) * len(os.sched_getaffinity(0)))


def best_machine(first: Machine, second: Machine) -> Machine:
    """The roofline is what the machine can do, so other load during one of the two measurements is dropped."""
    return Machine(max(first.matmul_gflops, second.matmul_gflops), max(first.memory_gbps, second.memory_gbps))


# -- the model's arithmetic --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    body_params: int  # weight matrices inside the decoder layers
    head_params: int  # the LM head
    weight_bytes: int  # what one decode step reads: everything but the embedding table (a gather of B rows)

    @classmethod
    def of(cls, model) -> "ModelShape":
        cfg = model.config
        total = sum(p.numel() for p in model.parameters())  # a tied head is one shared parameter, counted once
        embed = model.get_input_embeddings().weight.numel()
        head = model.get_output_embeddings().weight.numel()
        return cls(layers=cfg.num_hidden_layers, heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
                   head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
                   body_params=sum(p.numel() for p in model.model.layers.parameters() if p.dim() == 2),
                   head_params=head, weight_bytes=(total - embed + head) * FP32_BYTES)

    def _attention_flops(self, query_context_pairs: int) -> int:
        return 4 * self.layers * self.heads * self.head_dim * query_context_pairs  # QK^T and PV

    def prefill_flops(self, tokens: int) -> int:
        causal_pairs = tokens * (tokens + 1) // 2
        # Logits for the last position only: that is all a prefill needs to sample.
        return 2 * self.body_params * tokens + 2 * self.head_params + self._attention_flops(causal_pairs)

    def decode_step_flops(self, batch: int, context: int) -> int:
        return batch * (2 * (self.body_params + self.head_params) + self._attention_flops(context))

    def decode_step_bytes(self, batch: int, context: int) -> int:
        kv_per_token = 2 * self.layers * self.kv_heads * self.head_dim * FP32_BYTES
        return self.weight_bytes + batch * context * kv_per_token


def prefill_roofline(shape: ModelShape, machine: Machine, tokens: int) -> float:
    return tokens * machine.matmul_gflops * 1e9 / shape.prefill_flops(tokens)


def decode_roofline(shape: ModelShape, machine: Machine, batch: int, context: int) -> float:
    """Aggregate tok/s if a step were bound only by reading its bytes or by its matmul FLOPs, whichever is slower."""
    step_s = max(shape.decode_step_bytes(batch, context) / (machine.memory_gbps * 1e9),
                 shape.decode_step_flops(batch, context) / (machine.matmul_gflops * 1e9))
    return batch / step_s


# -- the two sides -----------------------------------------------------------------------------------------------
class Radixflow:
    name = "radixflow"

    def __init__(self, quantization: str | None = None):
        from radixflow import Engine

        self.engine = Engine(num_threads=THREADS, quantization=quantization)
        if quantization:
            self.name = f"radixflow ({quantization})"

    def prefill(self, prompt: list[int]) -> None:
        self.generate([prompt], 1)

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        params = {"max_new_tokens": new_tokens, "temperature": 0, "ignore_eos": True}
        outs = self.engine.generate(input_ids=prompts, sampling_params=params)
        cached = sum(o["meta_info"]["cached_tokens"] for o in outs)
        if cached:  # every prompt is fresh, so a hit means the figures include reused KV
            print(f"WARNING: radix cache served {cached} prompt tokens; timings are optimistic", file=sys.stderr)
        return [o["output_ids"] for o in outs]

    def close(self) -> None:
        self.engine.shutdown()


class Transformers:
    name = "transformers"

    def __init__(self, model):
        self.model = model

    def prefill(self, prompt: list[int]) -> None:
        with torch.inference_mode():
            # logits_to_keep=1 is what generate() itself passes in its prefill.
            self.model(torch.tensor([prompt]), logits_to_keep=1)

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        ids = torch.tensor(prompts)
        # The prompts of a batch have equal length, so left padding is a no-op and the mask is all ones.
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False,
                                      pad_token_id=self.model.generation_config.eos_token_id)
        return out[:, ids.shape[1]:].tolist()


def load_transformers_model():
    import transformers

    from radixflow.runtime.model_source import resolve_model

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    path = resolve_model(None).path
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32)
    return model.eval()


# -- measurement -------------------------------------------------------------------------------------------------
class PromptStream:
    """Fresh random prompts, each given to every side: identical inputs, and no prefix is ever reused."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.generator = torch.Generator().manual_seed(SEED)
        self.issued = 0

    def take(self, batch: int, length: int) -> list[list[int]]:
        ids = torch.randint(LOWEST_ID, self.vocab_size, (batch, length), generator=self.generator)
        # A distinct first token per prompt: random ones would now and then share it and hit the radix cache.
        ids[:, 0] = LOWEST_ID + self.issued + torch.arange(batch)
        self.issued += batch
        return ids.tolist()


@dataclass(frozen=True)
class SideResult:
    prefill_tps: float
    decode_tps: dict[int, float]
    greedy_ids: list[int]


def timings(sides: list, call, make_input, reps: int) -> list[list[float]]:
    """Per side, the seconds of `call(side, x)` over `reps` fresh inputs. The sides take turns on each input, so
    load from anything else on a shared machine hits them alike."""
    times: list[list[float]] = [[] for _ in sides]
    for _ in range(reps):
        x = make_input()
        for side, side_times in zip(sides, times):
            side_times.append(elapsed(call, side, x))
    return times


def prefill_tps(sides: list, prompts: PromptStream, s: Settings) -> list[float]:
    def make():
        return prompts.take(1, s.prefill_len)[0]

    def call(side, prompt):
        side.prefill(prompt)

    timings(sides, call, make, 1)  # warm-up: first calls pay for allocations
    return [s.prefill_len / statistics.median(t) for t in timings(sides, call, make, s.reps)]


def decode_tps(sides: list, prompts: PromptStream, batch: int, s: Settings) -> list[float]:
    """B*(N-1) / (t(N) - t(1)): the prefill and first token cancel out, leaving N-1 decode steps."""
    def make():
        return prompts.take(batch, s.decode_prompt_len)

    def generating(new_tokens: int):
        return lambda side, batch_prompts: side.generate(batch_prompts, new_tokens)

    timings(sides, generating(2), make, 1)  # warm-up of both prefill and decode at this batch size
    short = timings(sides, generating(1), make, s.reps)
    full = timings(sides, generating(s.decode_new), make, s.reps)
    return [batch * (s.decode_new - 1) / (statistics.median(f) - statistics.median(t)) for t, f in zip(short, full)]


def measure(sides: list, vocab_size: int, s: Settings) -> list[SideResult]:
    prompts = PromptStream(vocab_size)
    print(f"prefill, {s.prefill_len} tokens ...", file=sys.stderr)
    prefill = prefill_tps(sides, prompts, s)
    decode = {}
    for b in s.batches:
        print(f"decode, batch {b} ...", file=sys.stderr)
        decode[b] = decode_tps(sides, prompts, b, s)
    check = prompts.take(1, s.decode_prompt_len)
    return [SideResult(prefill[i], {b: decode[b][i] for b in s.batches}, side.generate(check, CHECK_TOKENS)[0])
            for i, side in enumerate(sides)]


# -- report ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    text: str
    value: float
    minimum: float

    @property
    def passed(self) -> bool:
        return self.value >= self.minimum


@dataclass(frozen=True)
class Row:
    metric: str
    ours: float
    theirs: float
    roofline: float | None = None
    target: Target | None = None


def build_rows(ours: SideResult, theirs: SideResult, shape: ModelShape, machine: Machine, s: Settings) -> list[Row]:
    prefill_ratio = ours.prefill_tps / theirs.prefill_tps
    rows = [Row(f"prefill tok/s ({s.prefill_len}-token prompt)", ours.prefill_tps, theirs.prefill_tps,
                prefill_roofline(shape, machine, s.prefill_len), Target(">= 1.2x transformers", prefill_ratio, 1.2))]
    context = s.decode_prompt_len + s.decode_new // 2  # the mean KV length over the decode steps
    for b in s.batches:
        ratio = ours.decode_tps[b] / theirs.decode_tps[b]
        target = Target(">= 1.2x transformers", ratio, 1.2) if b == 1 else None
        rows.append(Row(f"decode tok/s, batch {b} (aggregate)", ours.decode_tps[b], theirs.decode_tps[b],
                        decode_roofline(shape, machine, b, context), target))
    first, last = s.batches[0], s.batches[-1]
    scaling = ours.decode_tps[last] / ours.decode_tps[first]
    rows.append(Row(f"decode scaling, batch {last} / batch {first}", scaling,
                    theirs.decode_tps[last] / theirs.decode_tps[first],
                    target=Target(f">= 8x our batch {first}", scaling, 8.0)))
    return rows


def environment(machine: Machine, others_share: float) -> dict:
    import transformers

    repo = Path(__file__).resolve().parents[1]
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True)
    return {"commit": git.stdout.strip() if git.returncode == 0 else "unknown", "torch": torch.__version__,
            "transformers": transformers.__version__, "nproc": len(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(), **asdict(machine), "others_cpu_share": others_share}


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:,.1f}"


def markdown(env: dict, rows: list[Row], greedy_match: bool) -> str:
    lines = [f"commit {env['commit']} | torch {env['torch']} | transformers {env['transformers']} | "
             f"nproc {env['nproc']} | torch threads {env['torch_threads']} | fp32 matmul "
             f"{env['matmul_gflops']:.1f} GFLOP/s | memory read {env['memory_gbps']:.1f} GB/s | "
             f"CPU used by other processes during the run: {env['others_cpu_share']:.0%}", "",
             "| metric | radixflow | transformers | ours / HF | roofline | ours / roofline | target | result |",
             "|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        of_roof = f"{r.ours / r.roofline:.0%}" if r.roofline else ""
        result = ("PASS" if r.target.passed else "FAIL") if r.target else ""
        lines.append(f"| {r.metric} | {_fmt(r.ours)} | {_fmt(r.theirs)} | {r.ours / r.theirs:.2f}x | "
                     f"{_fmt(r.roofline)} | {of_roof} | {r.target.text if r.target else ''} | {result} |")
    lines.append("")
    lines.append(f"greedy batch-1 output, first {CHECK_TOKENS} tokens: "
                 + ("identical to transformers" if greedy_match else "WARNING: differs from transformers"))
    return "\n".join(lines)


def to_json(env: dict, s: Settings, rows: list[Row], ours: SideResult, theirs: SideResult, match: bool) -> dict:
    return {"environment": env, "settings": asdict(s), "greedy_match": match,
            "radixflow": asdict(ours), "transformers": asdict(theirs),
            "rows": [{**asdict(r), "ratio": r.ours / r.theirs, "passed": r.target.passed if r.target else None}
                     for r in rows]}


# -- main --------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repetition and 32 new tokens per decode run")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--quantization", choices=["int8"], help="run our side quantized (transformers stays fp32)")
    args = parser.parse_args(argv)
    s = QUICK if args.quick else FULL
    torch.set_num_threads(THREADS)
    start = CpuClock.now()
    machine_before = measure_machine()
    hf_model = load_transformers_model()
    shape, vocab_size = ModelShape.of(hf_model), hf_model.config.vocab_size
    # Both sides stay loaded and take turns; the idle engine thread only polls its inbox every 50 ms.
    ours_side = Radixflow(args.quantization)
    try:
        ours, theirs = measure([ours_side, Transformers(hf_model)], vocab_size, s)
    finally:
        ours_side.close()
    machine = best_machine(machine_before, measure_machine())
    env = environment(machine, CpuClock.now().others_share_since(start))
    rows = build_rows(ours, theirs, shape, machine, s)
    match = ours.greedy_ids == theirs.greedy_ids
    print(markdown(env, rows, match))
    if args.json:
        args.json.write_text(json.dumps(to_json(env, s, rows, ours, theirs, match), indent=2) + "\n")


if __name__ == "__main__":
    main()
