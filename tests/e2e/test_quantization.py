"""Linear-layer back ends: opt-in int8 (the model still answers like itself; bad settings refused clearly) and the
default oneDNN prepacked fp32 path (same results as torch's matmul)."""

from __future__ import annotations

import pytest

from radixflow import Engine
from radixflow.runtime.model.llama import Linear


def test_int8_linear_tracks_fp32():
    import torch

    torch.manual_seed(0)
    layer = Linear(64, 96, bias=True)
    with torch.no_grad():
        layer.weight_t.normal_()
        layer.bias.normal_()
    x = torch.randn(5, 64)
    with torch.no_grad():
        reference = layer(x)
    layer.quantize_int8()
    assert layer.weight_t is None and layer.packed is not None
    out = layer(x)
    assert out.shape == reference.shape
    assert float((out - reference).abs().max() / reference.abs().max()) < 0.05


def test_int8_linear_does_not_saturate_at_full_scale():
    """The largest activations times the largest weights: without VNNI, fbgemm's 16-bit pair sums clip 8-bit times
    8-bit products (this input gave 32.4 for 63), so the weights keep 7 bits there (llama._WEIGHT_MAX)."""
    import torch

    layer = Linear(64, 8)
    with torch.no_grad():
        layer.weight_t.fill_(1.0)
    x = torch.ones(3, 64)
    x[:, 0] = 0  # quantized to 0 and 255
    layer.quantize_int8()
    assert torch.allclose(layer(x), torch.full((3, 8), 63.0), rtol=1e-3)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"quantization": "int4"}, "not supported"),
    ({"quantization": "int8", "dtype": "bfloat16"}, "float32"),
])
def test_bad_quantization_settings_are_refused(tiny_model_dir, kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        Engine(model_path=str(tiny_model_dir), max_total_tokens=1024, **kwargs)


@pytest.mark.slow
def test_smollm2_int8_stays_close_to_fp32(smol_engine):
    prompt = "The capital of France is Paris. The capital of Germany is"
    with Engine(max_total_tokens=4096, quantization="int8") as int8:
        ref = smol_engine.generate(prompt, {"max_new_tokens": 4, "temperature": 0}, return_logprob=True,
                                   logprob_start_len=0)
        out = int8.generate(prompt, {"max_new_tokens": 4, "temperature": 0}, return_logprob=True,
                            logprob_start_len=0)
        assert out["text"].split()[0] == ref["text"].split()[0] == "Berlin."
        diffs = [abs(a[0] - b[0]) for a, b in zip(ref["meta_info"]["input_token_logprobs"][1:],
                                                   out["meta_info"]["input_token_logprobs"][1:])]
        assert max(diffs) < 1.0  # measured 0.4 on a longer prompt; fp32 matches transformers within 2e-2
        int8.check_integrity()


def test_onednn_prepacked_linear_matches_matmul():
    import torch

    from radixflow.runtime.model.llama import _onednn_linear_works

    assert _onednn_linear_works()  # this machine's torch has it; the fast path must not silently switch off
    torch.manual_seed(1)
    layer = Linear(64, 96, bias=True)
    with torch.no_grad():
        layer.weight_t.normal_()
        layer.bias.normal_()
        layer.prepack_onednn()
        for rows in (1, 5, 300):
            x = torch.randn(rows, 64)
            torch.testing.assert_close(layer(x), torch.addmm(layer.bias, x, layer.weight_t), rtol=1e-5, atol=1e-4)


def test_engine_packs_its_linears_unless_told_not_to(tiny_model_dir):
    with Engine(model_path=str(tiny_model_dir), max_total_tokens=1024) as fast, \
            Engine(model_path=str(tiny_model_dir), max_total_tokens=1024, onednn_linear=False) as plain:
        layers = [m for m in fast.core.loaded.model.modules() if isinstance(m, Linear)]
        assert layers and all(m.onednn is not None for m in layers)
        assert all(m.onednn is None for m in plain.core.loaded.model.modules() if isinstance(m, Linear))
        params = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
        prompts = ["The quick brown fox", "Hello there, how are"]
        assert [o["output_ids"] for o in fast.generate(prompts, params)] == [
            o["output_ids"] for o in plain.generate(prompts, params)]
