"""Why llguidance: mask time per decode step on SmolLM2's 49,152-token vocabulary, for each grammar library
that is importable, on the same JSON schema and the same valid output followed token by token.

    python -m bench.bench_grammar_libs
    # the others, side by side, without their dependency trees:
    pip install --no-deps --target /tmp/glibs xgrammar apache-tvm-ffi outlines-core
    PYTHONPATH=/tmp/glibs python -m bench.bench_grammar_libs

Each library is used the way an engine would: compile once, then per step fill a token mask for one request.
"""

from __future__ import annotations

import json
import statistics
import time

import torch

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "country": {"type": "string"}, "population": {"type": "integer"},
    "area_km2": {"type": "number"}, "is_capital": {"type": "boolean"},
    "landmarks": {"type": "array", "items": {"type": "string"}}},
    "required": ["name", "country", "population", "area_km2", "is_capital", "landmarks"],
    "additionalProperties": False}
OUTPUT = json.dumps({"name": "Paris", "country": "France", "population": 2148000, "area_km2": 105.4,
                     "is_capital": True, "landmarks": ["Eiffel Tower", "Louvre Museum", "Notre-Dame"]})


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def _summary(times: list[float]) -> dict:
    times = sorted(times)
    return {"steps": len(times), "mean_us": 1e6 * statistics.mean(times), "median_us": 1e6 * statistics.median(times),
            "p90_us": 1e6 * times[int(0.9 * len(times))], "max_us": 1e6 * times[-1]}


def bench_llguidance(tok, vocab: int, ids: list[int]) -> dict:
    import llguidance
    import llguidance.hf

    from radixflow.runtime.constrained.bitmask import fill_bitmask

    start = time.perf_counter()
    ll = llguidance.hf.from_tokenizer(tok, n_vocab=vocab, slices=llguidance.LLTokenizer.json_slices())
    setup = time.perf_counter() - start
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
    start = time.perf_counter()
    template = llguidance.LLMatcher(ll, grammar, log_level=0)
    compiled = time.perf_counter() - start
    times = []
    for _ in range(3):
        m = template.deep_copy()
        for t in ids:
            start = time.perf_counter()
            fill_bitmask([m], vocab)
            times.append(time.perf_counter() - start)
            assert m.consume_token(t), m.get_error()
    return {"version": _version("llguidance"), "tokenizer_setup_s": setup, "compile_ms": 1e3 * compiled,
            **_summary(times)}


def bench_xgrammar(tok, vocab: int, ids: list[int]) -> dict:
    import xgrammar as xgr

    start = time.perf_counter()
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab))
    setup = time.perf_counter() - start
    start = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA))
    compile_s = time.perf_counter() - start
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    times = []
    for _ in range(3):
        m = xgr.GrammarMatcher(compiled)
        for t in ids:
            start = time.perf_counter()
            m.fill_next_token_bitmask(bitmask, 0)
            times.append(time.perf_counter() - start)
            assert m.accept_token(t)
    return {"version": _version("xgrammar"), "tokenizer_setup_s": setup, "compile_ms": 1e3 * compile_s,
            **_summary(times)}


def bench_outlines_core(tok, vocab: int, ids: list[int]) -> dict:
    from outlines_core import Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    start = time.perf_counter()
    eos = tok.eos_token_id
    tokens: dict[str, list[int]] = {}
    for piece, i in tok.get_vocab().items():
        if i != eos:
            tokens.setdefault(tok.convert_tokens_to_string([piece]), []).append(i)
    vocabulary = Vocabulary(eos, tokens)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    index = Index(build_regex_from_schema(json.dumps(SCHEMA)), vocabulary)
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(3):
        state = index.get_initial_state()
        for t in ids:
            start = time.perf_counter()
            mask = torch.zeros(vocab, dtype=torch.bool)
            mask[torch.tensor(index.get_allowed_tokens(state))] = True
            times.append(time.perf_counter() - start)
            state = index.get_next_state(state, t)
    return {"version": _version("outlines_core"), "tokenizer_setup_s": setup,
            "compile_ms": 1e3 * compile_s, **_summary(times)}


def main() -> None:
    from radixflow.runtime.config import EngineConfig
    from radixflow.runtime.engine_core import load_model

    loaded = load_model(EngineConfig.from_kwargs())
    tok, vocab = loaded.tokenizer, loaded.args.vocab_size
    ids = tok.encode(OUTPUT, add_special_tokens=False)
    for name, fn in (("llguidance", bench_llguidance), ("xgrammar", bench_xgrammar),
                     ("outlines_core", bench_outlines_core)):
        try:
            result = fn(tok, vocab, ids)
        except ImportError as exc:
            result = {"skipped": f"not installed ({exc.name})"}
        print(name, json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
