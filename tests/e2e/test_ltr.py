"""`--schedule-policy ltr` on real engines: the ranker shipped for SmolLM2 ranks prompts it was not trained on,
and a model without a ranker (or with another model's) runs fcfs with a warning instead of failing."""

from __future__ import annotations

import logging

import pytest

from radixflow import Engine
from radixflow.runtime.scheduler.ranker import EMBEDDED_RANKER, kendall_tau, load_ranker


@pytest.mark.parametrize("ranker_path", [None, str(EMBEDDED_RANKER)])
def test_without_a_ranker_for_the_model_ltr_falls_back_to_fcfs(tiny_model_dir, caplog, ranker_path):
    with caplog.at_level(logging.WARNING):
        engine = Engine(model_path=str(tiny_model_dir), schedule_policy="ltr", ltr_ranker_path=ranker_path,
                        num_threads=1, max_total_tokens=2048)
    try:
        assert engine.core.config.scheduler.schedule_policy == "fcfs"
        expected = "no ranker ships" if ranker_path is None else "trained on another model's embeddings"
        assert expected in caplog.text and "using fcfs" in caplog.text
        assert engine.generate("hello", {"max_new_tokens": 2, "ignore_eos": True})["meta_info"][
            "completion_tokens"] == 2
    finally:
        engine.shutdown()


@pytest.mark.slow
def test_the_shipped_ranker_ranks_held_out_prompts(smol_engine):
    import json

    items = json.loads(EMBEDDED_RANKER.with_suffix(".heldout.json").read_text())
    embedding = smol_engine.core.loaded.model.embed_tokens.weight.detach()
    ranker = load_ranker(EMBEDDED_RANKER, embedding)
    scores = [ranker.score(embedding, smol_engine.tokenizer.encode(
        smol_engine.apply_chat_template([{"role": "user", "content": it["prompt"]}]))) for it in items]
    tau = kendall_tau(scores, [it["length"] for it in items])
    assert len(items) >= 100 and tau > 0.4, tau  # chance is 0; the bench reports the figure (bench/RESULTS.md)


@pytest.mark.slow
def test_ltr_on_the_embedded_model_loads_its_ranker_and_scores_a_question_below_essays():
    engine = Engine(schedule_policy="ltr", max_total_tokens=8192)
    try:
        assert engine.core.config.scheduler.schedule_policy == "ltr"
        scheduler = engine.core.scheduler
        prompts = ["Write a detailed essay about the history of the Roman Empire.",
                   "Write a long story about a dragon who learns to paint.",
                   "What is 2 + 2? Answer with the number only."]
        texts = [engine.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
        scores = [scheduler.length_scorer(engine.tokenizer.encode(t)) for t in texts]
        assert scores[2] < min(scores[:2])
    finally:
        engine.shutdown()
