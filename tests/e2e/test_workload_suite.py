"""The workload suite (`python -m bench.suite`): every workload end to end on the tiny model, well-formed results,
and the transformers baseline computing the same answers as radixflow (greedy)."""

from __future__ import annotations

import json

import pytest

from bench.suite import systems, workloads
from bench.suite.__main__ import main

HEADER = ("command", "commit", "machine", "versions", "date")


def test_every_workload_runs_and_writes_results(tiny_model_dir, tmp_path, capsys):
    main(["--quick", "--model", str(tiny_model_dir), "--out", str(tmp_path), "--baselines", "radixflow-no-radix"])
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [(r["workload"], r["system"]) for r in rows] == [
        (w.name, s) for w in workloads.WORKLOADS for s in ("radixflow", "radixflow-no-radix")]
    for row in rows:
        assert all(row[k] for k in HEADER) and "--quick" in row["command"]
        assert "error" not in row, row
        n = next(w for w in workloads.WORKLOADS if w.name == row["workload"]).sizes[1]
        assert row["programs"] == n and row["seconds"] > 0 and row["latency_s"] > 0
        assert row["throughput"] == pytest.approx(n / row["seconds"])
        assert ("accuracy" in row) == (workloads.BY_NAME[row["workload"]].correct is not None)
        assert 0.0 <= row["cache_hit_rate"] <= 1.0
    by = {(r["workload"], r["system"]): r for r in rows}
    # The shared few-shot prefix is a hit with the radix cache, never without it.
    assert by["hellaswag", "radixflow"]["cache_hit_rate"] > 0.5
    assert all(r["cache_hit_rate"] == 0.0 for r in rows if r["system"] == "radixflow-no-radix")
    for chart in ("throughput.png", "latency.png"):
        assert (tmp_path / chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "| mmlu | radixflow |" in out and "mmlu: radixflow" in out  # the table and the verdicts
    main(["--replot", str(tmp_path / "results.jsonl"), "--out", str(tmp_path / "again")])
    assert table_lines(capsys.readouterr().out) == table_lines(out)  # the same table from the saved rows
    assert (tmp_path / "again" / "throughput.png").exists()


def table_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("| ")]


def _answers(workload, backend, items):
    states = workload.program.run_batch([a for a, _ in items], backend=backend, num_threads=1, temperature=0.0)
    assert all(s.error() is None for s in states)
    return states


@pytest.mark.parametrize("name, var", [("mmlu", "answer"), ("hellaswag", "ending")])
def test_transformers_baseline_answers_as_radixflow(tiny_engine, tiny_model_dir, name, var):
    """Greedy decoding and choice scoring compute the same thing in both, so the answers (and with them accuracy)
    agree: one difference allowed for a near-tie between batched and unbatched matmuls."""
    workload = workloads.BY_NAME[name]
    items = workload.make(16 if name == "mmlu" else 8, 1)
    ours = _answers(workload, tiny_engine.endpoint, items)
    theirs = _answers(workload, systems.TransformersBackend(str(tiny_model_dir)), items)
    pairs = [(a[var], b[var]) for a, b in zip(ours, theirs, strict=True)]
    same = sum(a == b for a, b in pairs)
    assert same >= len(pairs) - 1, pairs


def test_baseline_stop_strings_are_cut_as_radixflow_cuts_them(tiny_engine, tiny_model_dir):
    hf = systems.TransformersBackend(str(tiny_model_dir))
    params = {"max_new_tokens": 24, "temperature": 0.0}
    prompt = "The list:\n1."
    free, _ = hf.generate(prompt, params, {})
    assert free == tiny_engine.generate(prompt, params)["text"]  # the same greedy text
    stop = free[3:5]
    ours = tiny_engine.generate(prompt, {**params, "stop": stop})
    text, meta = hf.generate(prompt, {**params, "stop": stop}, {})
    assert text == ours["text"] == free[:free.index(stop)]
    assert meta["finish_reason"] == {"type": "stop", "matched": stop}


def test_unknown_names_are_refused_with_the_choices(tmp_path):
    with pytest.raises(SystemExit):
        main(["--only", "mmlu,nope", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="openai:URL"):
        systems.make_system("vllm", None, 2, 4)


def test_llama_server_select_grammar_admits_exactly_the_choices(tiny_model_dir):
    """The GBNF grammar the llama-server baseline sends for `select`, read by llguidance's GBNF reader (llama.cpp's
    syntax): each choice, quotes, backslashes and newlines included, is a whole sentence; nothing else is."""
    import llguidance
    import llguidance.hf
    from llguidance.gbnf_to_lark import gbnf_to_lark

    from radixflow.runtime.model_source import resolve_model
    from radixflow.runtime.tokenizer import load_tokenizer

    hf = load_tokenizer(resolve_model(str(tiny_model_dir)))
    tokenizer = llguidance.hf.from_tokenizer(hf)
    choices = [' say "yes"', "back\\slash\nand\ttab", " no"]
    grammar = llguidance.grammar_from("lark", gbnf_to_lark(systems.gbnf_choices(choices)))

    def accepts(text: str) -> bool:
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        return all(matcher.consume_token(t) for t in hf.encode(text, add_special_tokens=False)) and \
            matcher.is_accepting()

    assert all(accepts(c) for c in choices)
    assert not accepts(" say yes") and not accepts(" no more") and not accepts(" n")
