"""Continuous batching must not change results: a request's greedy output is the same alone, inside a batch of
16 prompts of mixed lengths, and when it joins a batch that is already decoding."""

from __future__ import annotations

import threading
import time

import pytest

from tests.helpers.models import GREEDY

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


def mixed_prompts(n: int) -> list[str]:
    return [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(3 + (i * 37) % 90)) for i in range(n)]


def run_alone(engine, prompts, params):
    return [engine.generate(p, params)["output_ids"] for p in prompts]


def check_batching(engine, max_new_tokens: int):
    params = {"max_new_tokens": max_new_tokens, "ignore_eos": True, **GREEDY}
    prompts = mixed_prompts(16)
    engine.flush_cache()
    alone = run_alone(engine, prompts[:4], params)
    engine.flush_cache()
    batched = [r["output_ids"] for r in engine.generate(prompts, params)]
    assert batched[:4] == alone

    # Join mid-way: start a long-running batch, then submit a request while it decodes.
    engine.flush_cache()
    background = threading.Thread(
        target=engine.generate, args=(prompts[4:], {"max_new_tokens": 3 * max_new_tokens, "ignore_eos": True, **GREEDY})
    )
    background.start()
    deadline = time.monotonic() + 60
    while engine.stats()["generated_tokens"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    joined = engine.generate(prompts[0], params)["output_ids"]
    background.join()
    assert joined == alone[0]
    engine.check_integrity()


def test_batching_invariance_tiny(tiny_engine):
    check_batching(tiny_engine, 24)


@pytest.mark.slow
def test_batching_invariance_smollm2(smol_engine):
    check_batching(smol_engine, 16)
