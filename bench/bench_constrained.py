"""Constrained decoding benchmarks (issue: constrained decoding with a compressed FSM).

    python -m bench.bench_constrained [--quick] [--json out.json] [--only extraction,mask,compile]

extraction  JSON extraction on SmolLM2: 32 descriptions (16 cities, 16 characters) -> an object with typed
            fields. Two constraint variants: the whole-object JSON schema, and one regex spelling the object
            with a pattern per field. Each is run with jump-forward on and off (one engine whose switch is flipped
            between runs: two engines would mean two OpenMP thread teams, which slows both; caches flushed
            before every run), and compared with unconstrained generation of the same number of tokens
            per request. Reported: batch throughput (all requests at once; best of 3 runs per configuration,
            interleaved, as this machine's run-to-run noise is about 15%) and single-request latency.
mask        Mask cost per decode step per request, in microseconds: llguidance filling one bitmask row while
            following a valid output token by token (median / p90 / max), plus what the engine measured during
            the extraction runs (wall time per constrained request per step, by batch size, with the lazy check
            for greedy rows and with masks filled first).
compile     Grammar compile time per schema, cold and from the cache.
Ratios are measured in one run on one machine; the command line, commit and machine go with every figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time

from radixflow import Engine
from radixflow.runtime.constrained.bitmask import fill_bitmask
from radixflow.runtime.constrained.grammar import GrammarCompiler
from radixflow.runtime.constrained.spec import Constraint

CITIES = [("Paris", "France", 2_100_000, True), ("Lyon", "France", 520_000, False),
          ("Tokyo", "Japan", 14_000_000, True), ("Osaka", "Japan", 2_700_000, False),
          ("Berlin", "Germany", 3_600_000, True), ("Munich", "Germany", 1_500_000, False),
          ("Madrid", "Spain", 3_300_000, True), ("Seville", "Spain", 690_000, False),
          ("Rome", "Italy", 2_800_000, True), ("Milan", "Italy", 1_400_000, False),
          ("Ottawa", "Canada", 1_000_000, True), ("Toronto", "Canada", 2_800_000, False),
          ("Cairo", "Egypt", 10_000_000, True), ("Alexandria", "Egypt", 5_200_000, False),
          ("Lima", "Peru", 9_700_000, True), ("Cusco", "Peru", 430_000, False)]
CHARACTERS = [("Aria", 23, "archer", True), ("Borin", 140, "blacksmith", False), ("Cassia", 31, "thief", False),
              ("Dorian", 45, "wizard", True), ("Elowen", 19, "healer", True), ("Fenn", 60, "merchant", False),
              ("Garrick", 38, "knight", True), ("Hilde", 27, "sailor", False), ("Ivo", 52, "alchemist", False),
              ("Juno", 33, "ranger", True), ("Kael", 29, "bard", False), ("Lyra", 24, "paladin", True),
              ("Milo", 17, "squire", True), ("Nessa", 70, "witch", False), ("Orrin", 41, "hunter", True),
              ("Perrin", 36, "scholar", False)]

CITY_SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24}, "country": {"type": "string", "maxLength": 24},
    "population": {"type": "integer", "minimum": 0}, "is_capital": {"type": "boolean"},
    "continent": {"enum": ["Africa", "America", "Asia", "Europe", "Oceania"]}},
    "required": ["name", "country", "population", "is_capital", "continent"], "additionalProperties": False}
CHARACTER_SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0, "maximum": 999},
    "occupation": {"type": "string", "maxLength": 24}, "is_hero": {"type": "boolean"},
    "alignment": {"enum": ["good", "neutral", "evil"]}},
    "required": ["name", "age", "occupation", "is_hero", "alignment"], "additionalProperties": False}
_STR = r'"[A-Za-z ,.\-]{1,24}"'
CITY_REGEX = (r'\{"name": ' + _STR + r', "country": ' + _STR + r', "population": [0-9]{1,9}, "is_capital": '
              r'(true|false), "continent": "(Africa|America|Asia|Europe|Oceania)"\}')
CHARACTER_REGEX = (r'\{"name": ' + _STR + r', "age": [0-9]{1,3}, "occupation": ' + _STR + r', "is_hero": '
                   r'(true|false), "alignment": "(good|neutral|evil)"\}')


def workload(engine: Engine) -> list[tuple[str, dict, str]]:
    """(prompt, json schema, regex) per request."""
    def ask(text: str, kind: str) -> str:
        return engine.apply_chat_template([{"role": "user", "content": f"Extract the {kind} described below as a "
                                            f"JSON object.\n{text}"}])
    items = []
    for name, country, population, capital in CITIES:
        text = (f"{name} is a city in {country} with {population:,} inhabitants"
                f"{'; it is the capital' if capital else ''}.")
        items.append((ask(text, "city"), CITY_SCHEMA, CITY_REGEX))
    for name, age, job, hero in CHARACTERS:
        text = f"{name} is a {age}-year-old {job}{' who saves the kingdom' if hero else ' with a shady past'}."
        items.append((ask(text, "character"), CHARACTER_SCHEMA, CHARACTER_REGEX))
    return items


def run_batch(engine, prompts: list[str], params: list[dict]) -> tuple[float, list[dict]]:
    engine.flush_cache()
    start = time.perf_counter()
    outs = engine.generate(prompts, params)
    return time.perf_counter() - start, outs


def run_single(engine, prompts: list[str], params: list[dict]) -> float:
    """Mean latency of requests sent one at a time (each on a cold cache for its own prompt)."""
    engine.flush_cache()
    times = []
    for prompt, p in zip(prompts, params):
        start = time.perf_counter()
        engine.generate(prompt, p)
        times.append(time.perf_counter() - start)
    return statistics.mean(times)


class Switch:
    """Runs on one engine with jump-forward on or off (flipped on the engine thread between runs), and keeps the
    mask time the runner measured under each setting."""

    def __init__(self, engine: Engine, enabled: bool):
        self.engine, self.enabled = engine, enabled
        self.lazy = True  # greedy rows check the model's choice before filling a mask (the engine's default)
        self.label = "batch"  # what the mask time is filed under: the batch size of the runs being made
        self.mask: dict[str, list[float]] = {}  # label -> [seconds, rows]

    def generate(self, prompts, params):
        masker = self.engine.core.runner.masker

        def flip():
            self.engine.core.scheduler.output.enable_jump_forward = self.enabled
            masker.lazy = self.lazy
        self.engine._call(flip)
        seconds, rows = masker.mask_seconds, masker.mask_rows
        outs = self.engine.generate(prompts, params)
        totals = self.mask.setdefault(self.label, [0.0, 0])
        totals[0] += masker.mask_seconds - seconds
        totals[1] += masker.mask_rows - rows
        return outs

    def flush_cache(self):
        return self.engine.flush_cache()

    def mask_us_per_row(self) -> dict[str, float]:
        """Wall time the runner spent filling masks, per constrained request per step, by batch size: a batch's
        rows are filled in parallel on every core, a single request's alone."""
        return {label: 1e6 * seconds / max(rows, 1) for label, (seconds, rows) in self.mask.items()}

    def labelled(self, label: str) -> "Switch":
        self.label = label
        return self


def extraction(quick: bool) -> dict:
    engine = Engine(num_threads=2, max_total_tokens=32768)
    on, off = Switch(engine, True), Switch(engine, False)
    items = workload(engine)
    if quick:
        items = items[:4] + items[16:20]
    prompts = [p for p, _, _ in items]
    single_n = 4 if quick else 8
    single_idx = list(range(0, len(items), max(len(items) // single_n, 1)))[:single_n]
    results = {}
    for variant, key, pick in (("json_schema", "json_schema", 1), ("regex", "regex", 2)):
        params = [{key: item[pick], "max_new_tokens": 160, "temperature": 0.0} for item in items]
        for side in (on, off):  # warm up: grammars compiled and cached, torch kernels loaded
            side.labelled("warm-up").generate(prompts[:2], params[:2])
            side.labelled(f"batch of {len(items)}")
        _, outs_on = run_batch(on, prompts, params)
        _, outs_off = run_batch(off, prompts, params)
        # Unconstrained generation of the same number of tokens as the constrained output, request by request.
        free = [{"max_new_tokens": o["meta_info"]["completion_tokens"], "ignore_eos": True, "temperature": 0.0}
                for o in outs_off]
        runs = {"on": [], "off": [], "free": []}
        for _ in range(1 if quick else 3):
            runs["on"].append(run_batch(on, prompts, params)[0])
            runs["off"].append(run_batch(off, prompts, params)[0])
            runs["free"].append(run_batch(off, prompts, free)[0])
        t_on, t_off, t_free = min(runs["on"]), min(runs["off"]), min(runs["free"])
        # A smaller batch (8 requests at once, best of 3): between the single request and the full batch.
        eight = list(range(0, len(items), max(len(items) // 8, 1)))[:8]
        t8 = {side: min(run_batch(s.labelled("batch of 8"), [prompts[i] for i in eight], [p[i] for i in eight])[0]
                        for _ in range(1 if quick else 3))
              for side, s, p in (("on", on, params), ("off", off, params), ("free", off, free))}
        lat_on = run_single(on.labelled("single"), [prompts[i] for i in single_idx], [params[i] for i in single_idx])
        lat_off = run_single(off.labelled("single"), [prompts[i] for i in single_idx],
                             [params[i] for i in single_idx])
        lat_free = run_single(off, [prompts[i] for i in single_idx], [free[i] for i in single_idx])
        # Once more with every mask filled before the forward (no lazy check), for the mask-cost figures.
        for side in (on, off):
            side.lazy = False
            run_batch(side.labelled(f"batch of {len(items)}, masks first"), prompts, params)
            run_single(side.labelled("single, masks first"), [prompts[i] for i in single_idx[:4]],
                       [params[i] for i in single_idx[:4]])
            side.lazy = True
        valid_on = sum(_valid(o["text"], variant, item) for o, item in zip(outs_on, items))
        valid_off = sum(_valid(o["text"], variant, item) for o, item in zip(outs_off, items))
        same = sum(_parsed(a["text"]) == _parsed(b["text"]) for a, b in zip(outs_on, outs_off))
        tokens = sum(o["meta_info"]["completion_tokens"] for o in outs_off)
        results[variant] = {
            "requests": len(items), "output_tokens_no_jump": tokens,
            "output_tokens_jump": sum(o["meta_info"]["completion_tokens"] for o in outs_on),
            "batch_s": {"jump_forward": t_on, "no_jump_forward": t_off, "unconstrained": t_free},
            "batch_runs_s": runs,
            "batch8_s": t8, "batch8_jump_vs_no_jump": t8["off"] / t8["on"],
            "batch8_jump_vs_unconstrained": t8["free"] / t8["on"],
            "batch_req_per_s_jump_vs_no_jump": t_off / t_on,
            "batch_jump_vs_unconstrained": t_free / t_on,
            "batch_no_jump_vs_unconstrained": t_free / t_off,
            "latency_s": {"jump_forward": lat_on, "no_jump_forward": lat_off, "unconstrained": lat_free},
            "latency_jump_vs_no_jump": lat_off / lat_on,
            "valid_outputs": {"jump_forward": valid_on, "no_jump_forward": valid_off},
            "same_parsed_values_jump_vs_no_jump": same,
        }
        print(variant, json.dumps(results[variant], indent=1), flush=True)
    results["engine_mask_us_per_row"] = {"jump_forward": on.mask_us_per_row(),
                                         "no_jump_forward": off.mask_us_per_row()}
    stats = engine.stats()
    results["jump_forward_tokens"] = stats["jump_forward_tokens"]
    results["lazy_mask_refusals"] = stats["grammar_lazy_refusals"]
    engine.shutdown()
    return results


def _parsed(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _valid(text: str, variant: str, item) -> bool:
    import re

    if variant == "regex":
        return re.fullmatch(item[2], text) is not None
    value = _parsed(text)
    schema = item[1]
    return isinstance(value, dict) and set(value) == set(schema["properties"])


def mask_cost(tokenizer, vocab_size: int, eos: int) -> dict:
    """Per-step mask time while following a valid output (the engine's path: one bitmask row per request)."""
    backend = GrammarCompiler(tokenizer, vocab_size, eos)
    out = {}
    samples = {
        "city_schema": (Constraint("json_schema", json.dumps(CITY_SCHEMA)),
                        '{"name": "Paris", "country": "France", "population": 2100000, "is_capital": true, '
                        '"continent": "Europe"}'),
        "character_regex": (Constraint("regex", CHARACTER_REGEX),
                            '{"name": "Dorian", "age": 45, "occupation": "wizard", "is_hero": true, '
                            '"alignment": "good"}'),
    }
    for name, (constraint, text) in samples.items():
        times = []
        for _ in range(5):
            matcher = backend.matcher(constraint)
            for token in tokenizer.encode(text, add_special_tokens=False):
                start = time.perf_counter()
                fill_bitmask([matcher], vocab_size)
                times.append(time.perf_counter() - start)
                assert matcher.consume_token(token), matcher.get_error()
        times.sort()
        out[name] = {"steps": len(times), "mean_us": 1e6 * statistics.mean(times),
                     "median_us": 1e6 * statistics.median(times),
                     "p90_us": 1e6 * times[int(0.9 * len(times))], "max_us": 1e6 * times[-1]}
    backend.shutdown()
    return out


def compile_cost(tokenizer, vocab_size: int, eos: int) -> dict:
    backend = GrammarCompiler(tokenizer, vocab_size, eos)
    _ = backend.tokenizer  # built once per engine; not part of a grammar's compile time
    out = {"tokenizer_setup_s": backend.stats.tokenizer_seconds}
    for name, constraint in (("city_schema", Constraint("json_schema", json.dumps(CITY_SCHEMA))),
                             ("character_schema", Constraint("json_schema", json.dumps(CHARACTER_SCHEMA))),
                             ("city_regex", Constraint("regex", CITY_REGEX))):
        start = time.perf_counter()
        backend.matcher(constraint)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        backend.matcher(constraint)
        cached = time.perf_counter() - start
        out[name] = {"cold_ms": 1e3 * cold, "cached_ms": 1e3 * cached}
    backend.shutdown()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json")
    parser.add_argument("--only", default="extraction,mask,compile")
    args = parser.parse_args()
    only = set(args.only.split(","))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    report = {"commit": commit, "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
              "command": "python -m bench.bench_constrained " + " ".join(f"--{k}" for k in ("quick",) if args.quick)}
    # Extraction first: loading a model on this thread for the mask and compile figures starts a second OpenMP
    # team in the process, which slowed the engine's batch runs by up to 40% when it came first.
    if "extraction" in only:
        report["extraction"] = extraction(args.quick)
    if only & {"mask", "compile"}:
        from radixflow.runtime.config import EngineConfig
        from radixflow.runtime.engine_core import load_model

        loaded = load_model(EngineConfig.from_kwargs())
        eos = loaded.tokenizer.eos_token_id
        if "mask" in only:
            report["mask"] = mask_cost(loaded.tokenizer, loaded.args.vocab_size, eos)
            print("mask", json.dumps(report["mask"], indent=1), flush=True)
        if "compile" in only:
            report["compile"] = compile_cost(loaded.tokenizer, loaded.args.vocab_size, eos)
            print("compile", json.dumps(report["compile"], indent=1), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
