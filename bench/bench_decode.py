"""Decode speed on SmolLM2 (the shipped Q4_1 GGUF), 2 threads: radixflow's default (the file's 4-bit blocks kept, on
its VNNI kernel where the CPU has one, else torch's int4 kernel), its dequantized fp32 path, speculative decoding,
and llama.cpp on the same file when llama-cpp-python is installed (an optional benchmark extra: `pip install
llama-cpp-python`, built from source).

    python -m bench.bench_decode [--reps 3] [--json out.json] [--enable-torch-compile] [--skip-speculative]
                                 [--only few-shot,chats] [--compare-attention]
    python -m bench.bench_decode --isolated decode,few-shot,chats [--enable-torch-compile] [--reps 3]

Figures (each side measured in the same run, the sides interleaved rep by rep, best rep kept):
- decode tok/s at batch 1 (one request at a time, greedy, 128 tokens after a 32-token prompt; the prefill's time is
  taken out by also timing a 1-token generation), and aggregate at batch 8 and 32 (concurrent requests);
- prefill tok/s of a 512-token prompt;
- a 1,000-token few-shot prefix with 32 questions sent one at a time, and 8 chats x 4 turns sent one request at a
  time in round-robin order (the users of a server take turns): wall time, radixflow against llama.cpp, whose
  `Llama` object reuses the KV of the longest prefix it shares with the previous prompt;
- with `--enable-torch-compile`, a third radixflow side whose decode steps run the compiled graph (its startup
  compiles them: a few minutes the first time on 2 cores);
- with `--compare-attention`, one more radixflow side (compiled, with `--enable-torch-compile`) whose decode
  attention gathers K/V for torch's SDPA (`--attention-backend torch_native`): the baseline of the paged decode
  kernel, in the same run; `--only` keeps the figures whose label contains one of its comma-separated words;
- with `--isolated`, only the figures it names (batch-1 decode, the few-shot questions, the chats), each side alone
  in a fresh process, the sides taking turns rep by rep: the fair comparison, since sides in one process slow each
  other (see `isolated`);
- speculative decoding at batch 1 (`--speculative-algorithm ngram`) on copy-heavy prompts (quoting, extraction,
  code edits) and on plain chat prompts: tok/s against the same engine without it, and whether the greedy texts
  are identical.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import subprocess
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from radixflow import Engine
from radixflow.runtime.model_source import resolve_model
from radixflow.runtime.tokenizer import load_tokenizer

THREADS = 2
GREEDY = {"temperature": 0.0}
FEW_SHOT = "few-shot: 1,000-token prefix, 32 questions one at a time (s)"
CHATS = "8 chats x 4 turns, one request at a time (s)"

PARAGRAPH = ("The committee met on Tuesday to review the budget for the coming year. After a long discussion, the "
             "members agreed to increase funding for the public library, to repair the roads in the northern "
             "district, and to hire two new teachers for the primary school. The decision will be announced on "
             "Friday, and the new budget will take effect on the first of March.")
CODE = '''def compute_statistics(values):
    total = 0
    count = 0
    for value in values:
        total += value
        count += 1
    mean = total / count
    return mean, count
'''
COPY_HEAVY = [
    "Repeat the following paragraph exactly, word for word.\n\n" + PARAGRAPH,
    "Copy this text exactly:\n\n" + PARAGRAPH,
    "Here is a Python function:\n\n" + CODE + "\nRewrite the whole function, renaming `total` to `running_sum`.",
    "Extract the sentence about the library from this text and quote it exactly.\n\n" + PARAGRAPH,
]
PLAIN_CHAT = [
    "Write a short story about a dragon who learns to bake bread.",
    "What are three good habits for staying healthy? Explain each one.",
    "Describe your ideal weekend in a few sentences.",
    "Why is the sky blue? Explain it simply.",
]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# -- sides ---------------------------------------------------------------------------------------------------------
class Radixflow:
    def __init__(self, name: str, **options):
        self.name = name
        self.engine = Engine(max_total_tokens=32768, num_threads=THREADS, **options)
        self.tokenizer = self.engine.tokenizer

    def chat_prompt(self, text: str) -> str:
        return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                  add_generation_prompt=True)

    def generate_ids(self, prompts: list[list[int]], new_tokens: int, ignore_eos: bool = True) -> list[list[int]]:
        params = {"max_new_tokens": new_tokens, "ignore_eos": ignore_eos, **GREEDY}
        outs = self.engine.generate(input_ids=prompts, sampling_params=params)
        return [o["output_ids"] for o in outs]

    def complete(self, prompt: str, new_tokens: int) -> str:
        return self.engine.generate(prompt, {"max_new_tokens": new_tokens, **GREEDY})["text"]

    def reset(self) -> None:
        self.engine.flush_cache()

    def close(self) -> None:
        self.engine.shutdown()


class LlamaCpp:
    """llama.cpp through llama-cpp-python: the same GGUF file and thread count, greedy, its own generation loop."""

    name = "llama.cpp"

    def __init__(self):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(resolve_model(None).path), n_threads=THREADS, n_threads_batch=THREADS,
                         n_ctx=8192, n_batch=512, verbose=False)

    def generate_ids(self, prompts: list[list[int]], new_tokens: int, ignore_eos: bool = True) -> list[int]:
        """Generated token counts (the benchmark times the calls; llama.cpp's ids are not compared)."""
        bias = {self.llm.token_eos(): -100.0} if ignore_eos else None
        out = []
        for prompt in prompts:  # one sequence at a time: this API serves one
            self.llm.reset()
            result = self.llm.create_completion(prompt, max_tokens=new_tokens, temperature=0.0, logit_bias=bias)
            out.append(result["usage"]["completion_tokens"])
        return out

    def complete(self, prompt: str, new_tokens: int) -> str:
        # create_completion reuses the KV of the prefix this prompt shares with the previous one.
        return self.llm.create_completion(prompt, max_tokens=new_tokens, temperature=0.0)["choices"][0]["text"]

    def reset(self) -> None:
        self.llm.reset()

    def close(self) -> None:
        self.llm.close()


class LlamaCppProcess:
    """The llama.cpp side run in a fresh child process per measurement. In one process with radixflow, llama.cpp's
    worker threads keep spinning after a call and took half the CPU from the next side measured (radixflow's
    compiled decode: 90 tok/s alone, about 50 after a llama.cpp call, bench/RESULTS.md); a child that exits leaves
    nothing running."""

    name = "llama.cpp"

    def __init__(self):
        import llama_cpp  # noqa: F401 - fail here, as the in-process side does, when it is not installed

    def measure(self, fn, *args):
        return measure_alone(self.name, {}, fn, *args)

    def close(self) -> None:
        pass


def measure_alone(name: str, options: dict, fn, *args):
    """`fn(side, *args)` for a side built in a fresh child process (llama.cpp, or radixflow with `options`)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_measure_in_child, (name, options, fn.__name__, args))


def _measure_in_child(name: str, options: dict, fn_name: str, args: tuple):
    torch.set_num_threads(THREADS)
    side = LlamaCpp() if name == "llama.cpp" else Radixflow(name, **options)
    try:
        return globals()[fn_name](side, *args)
    finally:
        side.close()


def best_batch1_tps(side) -> float:
    """Batch-1 decode tok/s: best of 3 after a warm-up run."""
    prompt = torch.randint(100, 49000, (1, 32), generator=torch.Generator().manual_seed(0)).tolist()
    decode_tps(side, prompt, 16)
    return max(decode_tps(side, prompt, 128) for _ in range(3))


def _second_pass(fn, side) -> float:
    """`fn(side, tokenizer)` in a fresh process, timed on its second pass: the first warms the side up (oneDNN's
    kernel generation, the file in the page cache)."""
    tokenizer = load_tokenizer(resolve_model(None))
    fn(side, tokenizer)
    return fn(side, tokenizer)


# Module-level functions: measure_alone hands a measurement to its child process by name.
def few_shot_alone(side) -> float:
    return _second_pass(few_shot_seconds, side)


def chats_alone(side) -> float:
    return _second_pass(multi_turn_seconds, side)


# --isolated's figures: (label, measurement of one side)
ISOLATED = {"decode": ("decode tok/s, batch 1", best_batch1_tps),
            "few-shot": (FEW_SHOT, few_shot_alone),
            "chats": (CHATS, chats_alone)}


def isolated(figures: list[str], reps: int, compiled: bool) -> dict[str, dict[str, float]]:
    """Figures with every side alone in its own process, the sides taking turns rep by rep (best rep kept). In one
    process the sides slow each other down: llama.cpp's ggml loads torch's GNU OpenMP runtime (the same
    libgomp.so.1), and with two threads owning OpenMP teams there are more OpenMP threads than cores, so libgomp
    stops spinning between parallel regions; radixflow's compiled decode measured 90 tok/s alone but about 50 after
    a llama.cpp call (2026-12-06). Several radixflow engines in one process (each on its own thread) do the same to
    each other."""
    # (name, engine options, the figures it takes part in: None = all)
    sides: list[tuple[str, dict, set[str] | None]] = [("radixflow", {}, None)]
    if compiled:  # the default kernels, and torch's int4 kernel as the decode baseline for radixflow's own
        sides += [("radixflow compiled", {"enable_torch_compile": True}, None),
                  ("radixflow int4 compiled", {"enable_torch_compile": True, "weight_format": "int4"}, {"decode"})]
    try:
        LlamaCppProcess()
        sides.append(("llama.cpp", {}, None))
    except ImportError:
        print("llama-cpp-python is not installed: no llama.cpp side")
    sides = [side for side in sides if side[2] is None or side[2] & set(figures)]
    results: dict[str, dict[str, float]] = {name: {} for name, _, _ in sides}
    for figure in figures:
        label, fn = ISOLATED[figure]
        keep = min if label.endswith("(s)") else max
        for _ in range(reps):
            for name, options, takes in sides:
                if takes is not None and figure not in takes:
                    continue
                value = measure_alone(name, options, fn)
                old = results[name].get(label)
                results[name][label] = value if old is None else keep(old, value)
                print(name, label, round(results[name][label], 2), flush=True)
    return results


def run_side(side, fn, *args):
    return side.measure(fn, *args) if isinstance(side, LlamaCppProcess) else fn(side, *args)


# -- measurements --------------------------------------------------------------------------------------------------
def decode_tps(side, prompts: list[list[int]], new_tokens: int) -> float:
    """Aggregate decode tokens/s: generating new_tokens minus generating 1 (prefill + first token), per token."""
    side.reset()
    one = timed(lambda: side.generate_ids(prompts, 1))
    side.reset()
    full = timed(lambda: side.generate_ids(prompts, new_tokens))
    return len(prompts) * (new_tokens - 1) / max(full - one, 1e-9)


def prefill_tps(side, prompt: list[int]) -> float:
    side.reset()
    return len(prompt) / timed(lambda: side.generate_ids([prompt], 1))


def few_shot_seconds(side, tokenizer) -> float:
    shots = "".join(f"Question: What is {i} plus {i + 7}?\nAnswer: {2 * i + 7}.\n\n" for i in range(48))
    prefix = "Answer each question with a number.\n\n" + shots
    assert 900 <= len(tokenizer.encode(prefix)) <= 1300
    side.reset()
    return timed(lambda: [side.complete(prefix + f"Question: What is {q} plus {q + 3}?\nAnswer:", 8)
                          for q in range(100, 132)])


def multi_turn_seconds(side, tokenizer) -> float:
    def run():
        chats = [[{"role": "system", "content": f"You are assistant number {c}. Keep answers short."}]
                 for c in range(8)]
        for turn in range(4):
            for c, chat in enumerate(chats):
                chat.append({"role": "user", "content": f"Tell me fact number {turn + 1} about the number {c}."})
                prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
                chat.append({"role": "assistant", "content": side.complete(prompt, 32)})
    side.reset()
    return timed(run)


def speculative(plain: Radixflow, spec: Radixflow, prompts: list[str], new_tokens: int, reps: int) -> dict:
    """tok/s of each prompt alone (batch 1) with and without speculation, and whether the texts are identical."""
    texts = [plain.chat_prompt(p) for p in prompts]
    before = spec.engine.stats()
    best = {plain.name: [0.0] * len(texts), spec.name: [0.0] * len(texts)}
    outputs = {}
    for _ in range(reps):
        for side in (plain, spec):
            for i, text in enumerate(texts):
                side.reset()  # the radix tree would otherwise draft the previous rep's output
                start = time.perf_counter()
                out = side.engine.generate(text, {"max_new_tokens": new_tokens, **GREEDY})
                tps = len(out["output_ids"]) / (time.perf_counter() - start)
                best[side.name][i] = max(best[side.name][i], tps)
                outputs[side.name, i] = out["output_ids"]
    stats = spec.engine.stats()
    steps = stats["spec_verify_steps"] - before["spec_verify_steps"]
    accepted = stats["spec_accepted_tokens"] - before["spec_accepted_tokens"]
    return {"plain_tps": sum(best[plain.name]) / len(texts), "spec_tps": sum(best[spec.name]) / len(texts),
            "ratio": sum(best[spec.name]) / sum(best[plain.name]),
            "identical": sum(outputs[plain.name, i] == outputs[spec.name, i] for i in range(len(texts))),
            "prompts": len(texts), "accept_length": 1 + accepted / steps if steps else 0.0}


def environment() -> dict:
    repo = Path(__file__).resolve().parents[1]
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"commit": git.stdout.strip(), "cpu": cpu, "nproc": os.cpu_count(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--enable-torch-compile", action="store_true")
    parser.add_argument("--skip-speculative", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated words: keep the figures whose label has one")
    parser.add_argument("--compare-attention", action="store_true",
                        help="add a side with --attention-backend torch_native (compiled with --enable-torch-compile)")
    parser.add_argument("--isolated", default="",
                        help=f"comma-separated figures of {', '.join(ISOLATED)}: only these, each side alone in a "
                             "fresh process (see `isolated`)")
    parser.add_argument("--isolated-batch1", action="store_true", help="the same as --isolated decode")
    args = parser.parse_args()
    figures = ["decode"] if args.isolated_batch1 else [f.strip() for f in args.isolated.split(",") if f.strip()]
    if figures:
        unknown = set(figures) - set(ISOLATED)
        if unknown:
            parser.error(f"--isolated: unknown figure(s) {', '.join(sorted(unknown))}; "
                         f"choose from {', '.join(ISOLATED)}")
        results = isolated(figures, args.reps, args.enable_torch_compile)
        report = {"environment": environment(), "results": results, "speculative": {}}
        print(markdown(report))
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))
        return
    torch.set_num_threads(THREADS)
    auto, fp32 = Radixflow("radixflow"), Radixflow("radixflow fp32", weight_format="fp32")
    sides = [auto, fp32]
    if args.enable_torch_compile:
        sides.append(Radixflow("radixflow compiled", enable_torch_compile=True))
    if args.compare_attention:
        sides.append(Radixflow("radixflow sdpa" + (" compiled" if args.enable_torch_compile else ""),
                               enable_torch_compile=args.enable_torch_compile, attention_backend="torch_native"))
    try:
        sides.append(LlamaCppProcess())
    except ImportError:
        print("llama-cpp-python is not installed: llama.cpp's columns stay empty")
    tok = auto.tokenizer
    gen = torch.Generator().manual_seed(0)

    def prompts(batch: int, length: int) -> list[list[int]]:
        return torch.randint(100, 49000, (batch, length), generator=gen).tolist()

    results: dict[str, dict] = {s.name: {} for s in sides}
    figures = [("decode tok/s, batch 1", lambda s: run_side(s, decode_tps, prompts(1, 32), 128)),
               ("prefill tok/s (512 tokens)", lambda s: run_side(s, prefill_tps, prompts(1, 512)[0]))]
    for batch in (8, 32):  # llama-cpp-python decodes one sequence at a time
        figures.append((f"decode tok/s, batch {batch}", lambda s, b=batch: None if isinstance(s, LlamaCppProcess)
                        else decode_tps(s, prompts(b, 32), 64)))
    figures += [(FEW_SHOT, lambda s: run_side(s, few_shot_seconds, tok)),
                (CHATS, lambda s: run_side(s, multi_turn_seconds, tok))]
    if args.only:
        figures = [(label, m) for label, m in figures if any(w.strip() in label for w in args.only.split(","))]
    for label, measure in figures:
        for _ in range(args.reps):
            for side in sides:
                value = measure(side)
                if value is None:
                    continue
                old = results[side.name].get(label)
                keep = min if label.endswith("(s)") else max
                results[side.name][label] = value if old is None else keep(old, value)
        print(label, {name: round(r[label], 2) for name, r in results.items() if label in r}, flush=True)
    for side in sides[2:]:
        side.close()
    spec_rows = {}
    if not args.skip_speculative:
        spec = Radixflow("radixflow + ngram", speculative_algorithm="ngram")
        spec_rows = {"copy-heavy": speculative(auto, spec, COPY_HEAVY, 160, args.reps),
                     "plain chat": speculative(auto, spec, PLAIN_CHAT, 160, args.reps)}
        print(json.dumps(spec_rows, indent=1))
        spec.close()
    report = {"environment": environment(), "results": results, "speculative": spec_rows}
    print(markdown(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    for side in (auto, fp32):
        side.close()


def _speedup(ours: float | None, theirs: float | None, seconds: bool) -> str:
    """How many times faster ours is: a rate ratio, or the inverse ratio of times."""
    if ours is None or theirs is None:
        return ""
    return f"{(theirs / ours if seconds else ours / theirs):.2f}x"


def markdown(report: dict) -> str:
    env, results = report["environment"], report["results"]
    names = list(results)
    labels = list(results[names[0]])
    # Ratio columns: the default against the fp32 path, and each radixflow side against llama.cpp where measured.
    pairs = [("radixflow", "radixflow fp32")] + [(n, "llama.cpp") for n in names
                                                  if n.startswith("radixflow") and n != "radixflow fp32"]
    # --compare-attention: the paged decode kernel against SDPA, compiled or not as both sides are.
    pairs += [(n.replace("sdpa", "").replace("  ", " ").strip(), n) for n in names if n.startswith("radixflow sdpa")]
    pairs = [(a, b) for a, b in pairs if a in results and b in results]
    lines = [f"commit {env['commit']}, {env['cpu']}, {env['nproc']} cores, torch {env['torch']}, {env['date']}", "",
             "| figure | " + " | ".join(names) + " | " + " | ".join(f"{a} / {b}" for a, b in pairs) + " |",
             "|---|" + "---|" * (len(names) + len(pairs))]
    for label in labels:
        cells = ["" if results[n].get(label) is None else f"{results[n][label]:,.1f}" for n in names]
        seconds = label.endswith("(s)")
        ratios = [_speedup(results[a].get(label), results[b].get(label), seconds) for a, b in pairs]
        lines.append(f"| {label} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    if not report["speculative"]:
        return "\n".join(lines)
    lines += ["", "| speculative decoding, batch 1 | without | with | ratio | identical greedy text | tokens / step |",
              "|---|---|---|---|---|---|"]
    for name, row in report["speculative"].items():
        lines.append(f"| {name} | {row['plain_tps']:.1f} tok/s | {row['spec_tps']:.1f} tok/s | {row['ratio']:.2f}x | "
                     f"{row['identical']} of {row['prompts']} | {row['accept_length']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
