"""Shared fixtures: a tiny random Llama saved as a Hugging Face directory (fast), and the embedded SmolLM2."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: there is no model hub to reach
torch.set_num_threads(2)

from tests.helpers.models import build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def tiny_engine(tiny_model_dir):
    from radixflow import Engine

    engine = Engine(model_path=str(tiny_model_dir), max_total_tokens=8192, chunked_prefill_size=64)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def smol_engine():
    from radixflow import Engine

    engine = Engine(max_total_tokens=16384)
    yield engine
    engine.shutdown()
