"""GGUF models with 4-bit linear weights: loaded both ways (kept in their blocks for decode, and dequantized), the
two agree at the kernel's precision; other GGUF types load as the gguf package dequantizes them.

Both kernels are held to the same rule at their own precision: identical greedy tokens up to the first near-tie of
the dequantized model's top two, and there one of the tied tokens. The default kernel on x86 CPUs with AVX2 or
AVX512-VNNI (blockq.py) rounds inputs to about 15 significant bits: logprobs within 0.05 nat, ties within 0.05 nat
(on SmolLM2, 8 prompts x 64 tokens on the VNNI build gave the dequantized model's text). torch's int4 kernel
(`weight_format="int4"`) computes in bf16, which moves logprobs by up to ~0.2 nats after a few layers (SmolLM2: up
to 0.12), hence 0.3 and 0.4 there."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from radixflow import Engine
from radixflow.runtime.model import blockq
from radixflow.runtime.model.blockq import BlockWeight
from radixflow.runtime.model.llama import Linear
from radixflow.runtime.model.quant import Int4Weight
from tests.helpers.models import build_tiny_gguf

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,",
           "The quick brown fox", "import numpy as np", "Dear Sir or Madam,", "Q: What is 2 + 2?\nA:"]
GREEDY_64 = {"max_new_tokens": 64, "temperature": 0.0, "ignore_eos": True}
# Per kernel: the largest logprob error allowed on the tokens both chose, and the near tie (nats between the
# dequantized model's best token and the packed model's choice) where they may part: about twice the largest error.
INT4_TOLERANCE = (0.3, 0.4)  # torch's bf16 kernel, measured up to 0.12 on SmolLM2
BLOCKQ_TOLERANCE = (0.05, 0.05)  # blockq, measured 0.003-0.011 on the tiny models and SmolLM2; a tiny model's 64
# tokens parted once at a tie of 0.0011 nat (AVX2 build: the same integers, float sums in another order)


def assert_agree_up_to_a_near_tie(packed: dict, fp32: dict, tolerance: tuple[float, float]) -> None:
    logprob_tolerance, near_tie = tolerance
    a, b = packed["output_ids"], fp32["output_ids"]
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
    diffs = [abs(x[0] - y[0]) for x, y in zip(packed["meta_info"]["output_token_logprobs"][:first],
                                               fp32["meta_info"]["output_token_logprobs"][:first])]
    assert max(diffs, default=0.0) < logprob_tolerance
    if first < len(a):
        top = dict((token, lp) for lp, token, _ in fp32["meta_info"]["output_top_logprobs"][first])
        assert a[first] in top and top[b[first]] - top[a[first]] < near_tie, (first, top, a[first])


def _int4_layers(engine: Engine, kind=(Int4Weight, BlockWeight)) -> int:
    model = engine.core.loaded.model
    return sum(1 for m in model.modules() if isinstance(m, Linear) and isinstance(m.int4, kind))


# auto: the block-quant kernel where the CPU has AVX2 (else torch's int4 kernel, and the int4 case's tolerance)
FORMATS = ["auto", "int4"]


def _kernel(weight_format: str) -> type:
    return BlockWeight if weight_format == "auto" and blockq.available() else Int4Weight


def check_for(weight_format: str):
    """The comparison of a packed model's output with the dequantized one's, at the tolerances of the kernel
    `weight_format` runs on here."""
    tolerance = BLOCKQ_TOLERANCE if _kernel(weight_format) is BlockWeight else INT4_TOLERANCE
    return lambda packed, fp32: assert_agree_up_to_a_near_tie(packed, fp32, tolerance)


@pytest.mark.parametrize("weight_format", FORMATS)
@pytest.mark.parametrize("linear, embed", [(Q.Q4_1, Q.Q8_0), (Q.Q4_0, Q.Q4_0), (Q.Q8_0, Q.Q8_0)])
def test_kept_4bit_decodes_as_the_dequantized_model(tmp_path, linear, embed, weight_format):
    path = tmp_path / "tiny.gguf"
    build_tiny_gguf(path, linear, embed)
    check = check_for(weight_format)
    with Engine(model_path=str(path), max_total_tokens=8192, weight_format=weight_format) as packed, \
            Engine(model_path=str(path), max_total_tokens=8192, weight_format="fp32") as fp32:
        # qkv, o, gate_up, down per layer, and the tied lm_head, all on the chosen kernel
        assert _int4_layers(packed, _kernel(weight_format)) == 2 * 4 + 1
        assert _int4_layers(fp32) == 0
        for prompt in PROMPTS:  # one at a time: batch 1 is the kernel's path
            a = packed.generate(prompt, GREEDY_64, return_logprob=True, top_logprobs_num=5)
            b = fp32.generate(prompt, GREEDY_64, return_logprob=True, top_logprobs_num=5)
            check(a, b)
        packed.check_integrity()


@pytest.mark.parametrize("kind", [Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_k_quant_files_load_as_gguf_dequantizes_them(tmp_path, kind):
    path = tmp_path / "k.gguf"
    weights = build_tiny_gguf(path, kind, Q.Q8_0, hidden=256, intermediate=512, layers=1)
    with Engine(model_path=str(path), max_total_tokens=2048) as engine:
        model = engine.core.loaded.model
        assert torch.equal(model.layers[0].mlp.down_proj.weight_t.t(), weights["blk.0.ffn_down"])
        assert torch.equal(model.layers[0].self_attn.o_proj.weight_t.t(), weights["blk.0.attn_output"])
        assert model.layers[0].mlp.down_proj.int4 is None  # no 4-bit layout for K-quants: the fp32 path
        assert model.lm_head.int4 is not None  # the Q8_0 embedding still is
        out = engine.generate("Hello", {"max_new_tokens": 8, "temperature": 0.0})
        assert len(out["output_ids"]) == 8


def test_a_file_without_4bit_layers_loads_again_from_the_cache(tmp_path, monkeypatch):
    from radixflow.runtime.model.loader import load_weights
    from radixflow.runtime.model_source import resolve_model

    monkeypatch.setenv("RADIXFLOW_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "f16.gguf"
    build_tiny_gguf(path, Q.F16)
    for _ in range(2):  # converts, then reads the cache
        checkpoint = load_weights(resolve_model(str(path)), torch.float32)
        assert checkpoint.int4 == {} and "model.layers.0.mlp.down_proj.weight" in checkpoint.weights


def test_cached_conversion_keeps_the_4bit_groups(tmp_path, monkeypatch):
    from radixflow.runtime.model.loader import load_weights
    from radixflow.runtime.model_source import resolve_model

    monkeypatch.setenv("RADIXFLOW_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    build_tiny_gguf(path, Q.Q4_1, Q.Q8_0)
    first = load_weights(resolve_model(str(path)), torch.float32)  # converts and caches
    second = load_weights(resolve_model(str(path)), torch.float32)  # from the cache
    assert first.int4.keys() == second.int4.keys() and len(first.int4) == 2 * 7 + 1
    for name, g in first.int4.items():
        h = second.int4[name]
        assert g.repeat == h.repeat and torch.equal(g.codes, h.codes) and torch.equal(g.scales, h.scales)
        assert torch.equal(g.zeros, h.zeros)


@pytest.mark.slow
@pytest.mark.parametrize("weight_format", FORMATS)
def test_smollm2_kept_4bit_decodes_as_the_dequantized_model(smol_engine, weight_format):
    check = check_for(weight_format)
    with Engine(max_total_tokens=8192, weight_format="fp32") as fp32, \
            (nullcontext(smol_engine) if weight_format == "auto" else
             Engine(max_total_tokens=8192, weight_format=weight_format)) as packed:
        assert _int4_layers(packed) == 30 * 4 + 1  # the shipped file's Q4_1 layers and its Q8_0 (tied) embedding
        # All prompts at once: eight rows per decode step, the kernel's multi-row tiles (the tiny models above
        # take batch 1), and an eighth of the steps of decoding them one at a time.
        a = packed.generate(PROMPTS, GREEDY_64, return_logprob=True, top_logprobs_num=5)
        b = fp32.generate(PROMPTS, GREEDY_64, return_logprob=True, top_logprobs_num=5)
        for x, y in zip(a, b, strict=True):
            check(x, y)


def test_weight_format_is_checked(tiny_model_dir):
    with pytest.raises(ValueError, match="weight_format"):
        Engine(model_path=str(tiny_model_dir), max_total_tokens=1024, weight_format="int3")


def test_calls_of_up_to_the_kernels_row_limit_take_the_4bit_weight(tmp_path):
    """Each kernel serves calls of up to its own `max_rows` (blockq: 24, where it beats oneDNN's fp32 GEMM on whole
    steps; torch's int4: 10) and the fp32 weight takes larger ones."""
    path = tmp_path / "tiny.gguf"
    build_tiny_gguf(path, Q.Q4_1, Q.Q8_0)
    with Engine(model_path=str(path), max_total_tokens=2048) as engine:
        linear = engine.core.loaded.model.layers[0].mlp.down_proj
        kernel = linear.int4
        assert kernel.max_rows == (blockq.MAX_ROWS if _kernel("auto") is BlockWeight else 10)
        calls = []
        linear.int4 = lambda x: calls.append(x.shape[0]) or kernel(x)
        linear.int4.max_rows = kernel.max_rows
        try:
            for rows in (1, kernel.max_rows, kernel.max_rows + 1):
                x = torch.randn(rows, linear.weight_t.shape[0])
                torch.testing.assert_close(linear(x), x @ linear.weight_t, rtol=0, atol=0.05)
        finally:
            linear.int4 = kernel
        assert calls == [1, kernel.max_rows]


def test_compiled_graphs_split_batches_at_every_kernels_row_limit():
    from types import SimpleNamespace

    from radixflow.runtime.model.compiled import CompiledDecode

    classes = lambda limits: [CompiledDecode.shape_class(SimpleNamespace(kernel_rows=limits), b)  # noqa: E731
                              for b in range(1, 20)]
    assert classes([16]) == [1] + [2] * 15 + [17] * 3
    assert classes([10, 16]) == [1] + [2] * 9 + [11] * 6 + [17] * 3
