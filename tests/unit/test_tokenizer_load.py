"""Loading a model directory's tokenizer without the model's full config (tokenizer._bare_config): the same class
and the same token ids as transformers' AutoTokenizer, without importing the model's configuration module."""

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


def test_the_models_configuration_module_is_not_imported(tiny_model_dir):
    code = ("import sys; from radixflow.runtime.model_source import resolve_model; "
            "from radixflow.runtime.tokenizer import load_tokenizer; "
            f"load_tokenizer(resolve_model({str(tiny_model_dir)!r})); "
            "print('transformers.models.llama.configuration_llama' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "False"
