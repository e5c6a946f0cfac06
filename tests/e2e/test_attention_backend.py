"""`--attention-backend`: auto runs attention on the paged kernels (where this CPU runs them: decode, and prefill /
extend), which read K/V in place from the pool; torch_native gathers them for torch's SDPA. The two give the same
greedy tokens and logprobs to float rounding: one request and padded batches, contexts that span several of the
kernels' chunks and blocks, extends after a cached prefix, and requests sharing a cached prefix (their prefix
attention stays on SDPA). test_compiled_decode compares the compiled step, on the kernel, with eager SDPA."""

from __future__ import annotations

import pytest

from radixflow import Engine
from radixflow.runtime.model import blockq
from tests.e2e.test_int4 import GREEDY_64, PROMPTS

pytestmark = pytest.mark.skipif(blockq.cpu_isa() is None, reason="the paged kernels need an x86 CPU with AVX2")

LOGPROB = {"return_logprob": True, "top_logprobs_num": 5}
LONG = " ".join(f"Line {i}: the value of item {i} is {i * 13 % 97}." for i in range(60))  # several chunks of 128


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    made = {backend: Engine(model_path=str(tiny_model_dir), max_total_tokens=8192, attention_backend=backend)
            for backend in ("auto", "torch_native")}
    yield made
    for engine in made.values():
        engine.shutdown()


def _agree(a: dict, b: dict) -> None:
    assert a["output_ids"] == b["output_ids"]
    assert [lp for lp, _, _ in a["meta_info"]["output_token_logprobs"]] == pytest.approx(
        [lp for lp, _, _ in b["meta_info"]["output_token_logprobs"]], abs=1e-4)


def test_auto_uses_the_kernel_and_torch_native_does_not(engines):
    assert engines["auto"].core.runner.model.paged_kernels
    assert not engines["torch_native"].core.runner.model.paged_kernels


def test_same_tokens_alone_in_padded_batches_and_behind_a_shared_prefix(engines):
    prompts = [PROMPTS[0], LONG, LONG[:700] + " Which item is largest?", PROMPTS[1] * 5, LONG + " Again:"]
    params = [{**GREEDY_64, "max_new_tokens": 30 + 5 * i} for i in range(len(prompts))]
    for prompt in prompts[:2]:  # one at a time
        _agree(engines["auto"].generate(prompt, GREEDY_64, **LOGPROB),
               engines["torch_native"].generate(prompt, GREEDY_64, **LOGPROB))
    together = [engine.generate(prompts, params, **LOGPROB) for engine in engines.values()]  # LONG is cached now
    for a, b in zip(*together):
        _agree(a, b)
    for engine in engines.values():
        engine.check_integrity()


def test_an_unknown_backend_is_refused_by_name(tiny_model_dir):
    with pytest.raises(ValueError, match="attention_backend: 'flashinfer' is not one of auto, torch_native"):
        Engine(model_path=str(tiny_model_dir), attention_backend="flashinfer")
