"""What a process pays to load a model, which every server start pays twice (HTTP and scheduler processes): the
tokenizer of a model directory without the model's full config (tokenizer._bare_config: the same class and token ids
as transformers' AutoTokenizer), and a model built without importing torch._dynamo (seconds each)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from radixflow.runtime.model_source import resolve_model
from radixflow.runtime.tokenizer import load_tokenizer

TEXT = "Hello world, how are you? <|im_end|> 12345"


@pytest.mark.parametrize("declared", ["TokenizersBackend", "LlamaTokenizerFast", "PreTrainedTokenizerFast", None])
def test_the_same_tokenizer_as_autotokenizer_picks(tiny_model_dir, tmp_path, declared):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config_path = model / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("tokenizer_class", None)
    if declared:
        config["tokenizer_class"] = declared
    config_path.write_text(json.dumps(config))
    ours, reference = load_tokenizer(resolve_model(str(model))), AutoTokenizer.from_pretrained(str(model))
    assert type(ours) is type(reference)
    assert ours(TEXT).input_ids == reference(TEXT).input_ids
    assert (ours.bos_token, ours.eos_token, ours.chat_template) == \
        (reference.bos_token, reference.eos_token, reference.chat_template)


HEAVY = ("transformers.models.llama.configuration_llama", "torch._dynamo")


def test_loading_a_model_imports_neither_its_config_module_nor_dynamo(tiny_model_dir):
    code = ("import sys; from radixflow.runtime.config import EngineConfig; "
            "from radixflow.runtime.engine_core import EngineCore; "
            f"EngineCore(EngineConfig.from_kwargs(model_path={str(tiny_model_dir)!r}, max_total_tokens=256)); "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=180)
    assert out.stdout.strip().splitlines()[-1] == "[]"
