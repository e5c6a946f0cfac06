"""Bad input gets a clear error naming the field, and the engine keeps serving."""

from __future__ import annotations

import json

import pytest

from radixflow import Engine, InvalidRequestError
from radixflow.runtime.model_source import ModelLoadError

OK = {"max_new_tokens": 4, "temperature": 0}


def still_serves(engine):
    out = engine.generate("hello there", OK)
    assert len(out["output_ids"]) == 4 or out["meta_info"]["finish_reason"]["type"] == "stop"


def test_unknown_model_path():
    with pytest.raises(ModelLoadError, match="does not exist"):
        Engine(model_path="/nonexistent/model.gguf")


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        Engine(model_path=str(bad))


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "weights.bin"
    bad.write_bytes(b"123")
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        Engine(model_path=str(bad))


def test_unknown_architecture(tiny_model_dir, tmp_path):
    import shutil

    copy = tmp_path / "gpt2ish"
    shutil.copytree(tiny_model_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
        Engine(model_path=str(copy))


def test_unknown_engine_option():
    with pytest.raises(TypeError, match="unknown engine option"):
        Engine(max_total_tokenz=10)


@pytest.mark.parametrize("params,field", [
    ({"max_new_tokens": -1}, "max_new_tokens"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"temperature": -1}, "temperature"),
    ({"top_k": -5}, "top_k"),
    ({"stop": [""]}, "stop"),
    ({"no_such_param": 1}, "no_such_param"),
    ({"max_new_tokens": 10**9}, "max_new_tokens"),
])
def test_invalid_sampling_values(tiny_engine, params, field):
    with pytest.raises(InvalidRequestError) as err:
        tiny_engine.generate("hello", params)
    assert err.value.field == field
    still_serves(tiny_engine)


def test_prompt_longer_than_context(tiny_engine):
    too_long = list(range(100, 100 + tiny_engine.max_context + 1))
    with pytest.raises(InvalidRequestError, match="context length") as err:
        tiny_engine.generate(input_ids=too_long, sampling_params=OK)
    assert err.value.field == "prompt"
    still_serves(tiny_engine)


def test_bad_token_ids_and_empty_prompt(tiny_engine):
    with pytest.raises(InvalidRequestError) as err:
        tiny_engine.generate(input_ids=[1, 2, 10**9], sampling_params=OK)
    assert err.value.field == "input_ids"
    with pytest.raises(InvalidRequestError):
        tiny_engine.generate(input_ids=[], sampling_params=OK)
    with pytest.raises(InvalidRequestError) as err:
        tiny_engine.generate(prompt=["ok", 3], sampling_params=OK)
    assert err.value.field == "prompt"
    still_serves(tiny_engine)


def test_failed_forward_aborts_only_that_batch(tiny_engine, monkeypatch):
    runner = tiny_engine.core.runner
    original = runner.run
    calls = {"n": 0}

    def flaky(batch):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated device failure")
        return original(batch)

    monkeypatch.setattr(runner, "run", flaky)
    out = tiny_engine.generate("hello", OK)
    assert out["meta_info"]["finish_reason"]["type"] == "abort"
    assert "simulated device failure" in out["meta_info"]["finish_reason"]["message"]
    still_serves(tiny_engine)
    tiny_engine.check_integrity()
