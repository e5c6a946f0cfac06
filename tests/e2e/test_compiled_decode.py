"""`--enable-torch-compile`: pure-decode steps run a compiled graph per batch-size class (its attention on the paged
decode kernel where the CPU runs it; the eager engine here uses SDPA); its outputs are the eager
model's (fp32 weights: the same tokens, logprobs to float rounding; int4 weights: agreement up to a near-tie, as
between the int4 kernel and fp32), whatever the context length, with padded batches, and with steps that mix
prefill and decode (those run eager)."""

from __future__ import annotations

import pytest
from gguf import GGMLQuantizationType as Q

from radixflow import Engine
from radixflow.runtime.model import blockq
from tests.e2e.test_int4 import GREEDY_64, PROMPTS, check_for
from tests.helpers.models import build_tiny_gguf

LOGPROB = {"return_logprob": True, "top_logprobs_num": 5}


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    compiled = Engine(model_path=str(tiny_model_dir), max_total_tokens=8192, enable_torch_compile=True,
                      torch_compile_max_bs=4)
    # The eager side gathers K/V for torch's SDPA; the compiled one runs the paged decode kernel where this CPU has it.
    eager = Engine(model_path=str(tiny_model_dir), max_total_tokens=8192, attention_backend="torch_native")
    assert compiled.core.runner.model.paged_kernels == (blockq.cpu_isa() is not None)
    yield compiled, eager
    compiled.shutdown()
    eager.shutdown()


def _logprobs(out: dict) -> list[float]:
    return [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]]


def test_one_request_at_a_time_matches_eager(engines):
    compiled, eager = engines
    runner = compiled.core.runner
    assert sorted(runner.compiled.graphs) == [1, 2]  # batch 1, and 2 to 4 (the int4 row limit is above 4)
    before = runner.compiled.steps
    for prompt in PROMPTS[:4]:
        a = compiled.generate(prompt, GREEDY_64, **LOGPROB)
        b = eager.generate(prompt, GREEDY_64, **LOGPROB)
        assert a["output_ids"] == b["output_ids"]
        assert _logprobs(a) == pytest.approx(_logprobs(b), abs=1e-4)
    # 63 decode steps per prompt ran compiled (the first token comes from the prefill).
    assert runner.compiled.steps - before == 4 * 63
    compiled.check_integrity()


def test_padded_batches_and_mixed_steps_match_eager(engines):
    compiled, eager = engines
    # Prompts of different lengths: decode batches are padded (masked), and requests arriving at different steps
    # (the generate call admits them together, the chunked prefill spreads them) mix with running decodes.
    prompts = [p * (i + 1) for i, p in enumerate(PROMPTS[:6])]
    params = [{**GREEDY_64, "max_new_tokens": 20 + 7 * i} for i in range(6)]
    before = compiled.core.runner.compiled.steps
    a = compiled.generate(prompts, params, **LOGPROB)
    b = eager.generate(prompts, params, **LOGPROB)
    assert [o["output_ids"] for o in a] == [o["output_ids"] for o in b]
    for x, y in zip(a, b):
        assert _logprobs(x) == pytest.approx(_logprobs(y), abs=1e-4)
    assert compiled.core.runner.compiled.steps > before
    compiled.check_integrity()


def test_int4_weights_compiled_agree_with_fp32_up_to_a_near_tie(tmp_path):
    path = tmp_path / "tiny.gguf"
    build_tiny_gguf(path, Q.Q4_1, Q.Q8_0)
    with Engine(model_path=str(path), max_total_tokens=8192, enable_torch_compile=True,
                torch_compile_max_bs=1) as packed, \
            Engine(model_path=str(path), max_total_tokens=8192, weight_format="fp32") as fp32:
        check = check_for("auto")  # the default kernel's tolerances
        for prompt in PROMPTS[:4]:
            check(packed.generate(prompt, GREEDY_64, **LOGPROB), fp32.generate(prompt, GREEDY_64, **LOGPROB))
        assert packed.core.runner.compiled.steps >= 4 * 63


def test_bad_max_batch_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="torch_compile_max_bs"):
        Engine(model_path=str(tiny_model_dir), enable_torch_compile=True, torch_compile_max_bs=0)
