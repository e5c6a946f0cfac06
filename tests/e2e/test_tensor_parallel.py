"""Tensor parallelism on the CPU: two processes (one thread each) in a gloo group give the logits and outputs of
one process, with the radix cache and chunked prefill working as with one; a rank that dies ends the scheduler
(health fails) instead of hanging it."""

from __future__ import annotations

import signal
import time

import httpx
import psutil
import pytest

from radixflow import Engine
from radixflow.server.launch import ServerProcess
from tests.helpers.models import build_tiny_model
from tests.helpers.server import TINY_ARGS

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,",
           "The quick brown fox jumps over the lazy dog. " * 6]
GREEDY = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
SHARED = "A long shared instruction that several requests begin with, " * 4


def run(model_dir, tp_size: int) -> dict:
    """Prompt logprobs, greedy outputs, a cache hit and a chunked prefill, on an engine with `tp_size` ranks."""
    engine = Engine(model_path=str(model_dir), max_total_tokens=4096, tp_size=tp_size, num_threads=1,
                    chunked_prefill_size=16)
    try:
        scored = engine.generate(PROMPTS, {**GREEDY, "max_new_tokens": 1}, return_logprob=True,
                                 logprob_start_len=0, top_logprobs_num=5)
        outputs = engine.generate(PROMPTS, GREEDY)
        first = engine.generate(SHARED + "first?", GREEDY)
        second = engine.generate(SHARED + "second?", GREEDY)
        engine.check_integrity()
        return {"logprobs": [o["meta_info"]["input_token_logprobs"] for o in scored],
                "top": [o["meta_info"]["input_top_logprobs"] for o in scored],
                "texts": [o["text"] for o in outputs] + [first["text"], second["text"]],
                "cached": [first["meta_info"]["cached_tokens"], second["meta_info"]["cached_tokens"]]}
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def qwen2_odd_vocab(tmp_path_factory):
    """q/k/v biases to split, and a vocabulary two ranks cannot split evenly (the last shard is padded)."""
    return build_tiny_model(tmp_path_factory.mktemp("qwen2-odd"), "qwen2", vocab_size=49153)


@pytest.mark.parametrize("model", ["llama", "qwen2_odd_vocab"])
def test_two_ranks_compute_what_one_does(model, tiny_model_dir, request):
    model_dir = tiny_model_dir if model == "llama" else request.getfixturevalue(model)
    one, two = run(model_dir, 1), run(model_dir, 2)
    for a, b in zip(one["logprobs"], two["logprobs"]):
        assert [x[1] for x in a[1:]] == [x[1] for x in b[1:]]
        assert [x[0] for x in a[1:]] == pytest.approx([x[0] for x in b[1:]], abs=1e-4)
    for a, b in zip(one["top"], two["top"]):  # the top-5 of every position: the logits' shape, not one value
        for pa, pb in zip(a[1:], b[1:]):
            assert [t[1] for t in pa] == [t[1] for t in pb]
            assert [t[0] for t in pa] == pytest.approx([t[0] for t in pb], abs=1e-4)
    assert two["texts"] == one["texts"]
    assert two["cached"] == one["cached"] and two["cached"][1] >= len(SHARED) // 8  # the second hit the radix cache


def test_tp_size_must_divide_the_heads(tiny_model_dir):
    with pytest.raises(ValueError, match="tp_size: 3 does not divide the model's num_heads"):
        Engine(model_path=str(tiny_model_dir), tp_size=3, num_threads=1)


def test_a_dead_rank_fails_health_instead_of_hanging(tiny_model_dir, tmp_path):
    server = ServerProcess(["--model-path", str(tiny_model_dir), *TINY_ARGS, "--tp-size", "2",
                            "--max-scheduler-restarts", "0"], log=tmp_path / "tp.log")
    server.start().wait_ready(120)
    try:
        ok = httpx.post(f"{server.url}/generate", json={"text": "hello", "sampling_params": {"max_new_tokens": 4}},
                        timeout=30)
        assert ok.status_code == 200, ok.text
        family = psutil.Process(server.proc.pid).children(recursive=True)
        followers = [p for p in family if "follower_main" in " ".join(p.cmdline())]
        assert len(followers) == 1
        followers[0].send_signal(signal.SIGKILL)
        started = time.monotonic()
        failed = httpx.post(f"{server.url}/generate", json={"text": "hello again"}, timeout=60)
        assert failed.status_code == 503 and "scheduler" in failed.json()["error"]["message"], failed.text
        assert time.monotonic() - started < 30
        assert httpx.get(f"{server.url}/health").status_code == 503
    finally:
        server.stop()
    _, alive = psutil.wait_procs(family, timeout=15)
    assert not alive, alive
