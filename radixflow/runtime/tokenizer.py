"""Tokenizer, chat template and incremental detokenization.

The tokenizer and the chat template come from the same source as the weights: tokenizer.json /
tokenizer_config.json of a model directory, or the GGUF metadata (converted by transformers' GGUF support).
That conversion takes seconds, so its result is cached on disk, keyed by the GGUF file's path, size and mtime.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from radixflow.runtime.model_source import ModelSource, cache_dir, publish_cache_dir

logger = logging.getLogger(__name__)


def load_tokenizer(source: ModelSource, chat_template: str | None = None):
    """A transformers fast tokenizer with `chat_template` set (the model's own unless overridden)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # there is no model hub to reach; never try
    # Imported here, after the line above (the hub client reads it at import), and only by what loads a tokenizer.
    from transformers import AutoTokenizer

    if source.kind == "hf":
        tokenizer = AutoTokenizer.from_pretrained(str(source.path), **_bare_config(source.path))
    else:
        tokenizer = _gguf_tokenizer(source)
    if chat_template:
        path = Path(chat_template)
        tokenizer.chat_template = path.read_text() if path.is_file() else chat_template
    return tokenizer


def _bare_config(path: Path) -> dict:
    """`config=` for AutoTokenizer on a model directory whose tokenizer_config.json names its class (and no remote
    code): a bare PretrainedConfig with the model type. AutoTokenizer then picks the class it would pick from the full
    config (it reads the model type, a declared tokenizer class and the path from it), without importing the model's
    configuration module: about 2 s of imports, paid by each of a server's two processes. Otherwise {} (the full
    config)."""
    from transformers import PretrainedConfig

    try:
        declared = json.loads((path / "tokenizer_config.json").read_text())
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    if not declared.get("tokenizer_class") or "auto_map" in declared or "auto_map" in config \
            or not isinstance(config.get("model_type"), str):
        return {}
    return {"config": PretrainedConfig(model_type=config["model_type"], name_or_path=str(path),
                                       tokenizer_class=config.get("tokenizer_class"))}


def _gguf_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    path = source.path
    cached = cache_dir(source, "tokenizers")
    if (cached / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(str(cached))
    logger.info("converting the GGUF tokenizer (once; cached in %s)", cached)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    publish_cache_dir(cached, lambda tmp: tokenizer.save_pretrained(str(tmp)))
    return tokenizer


def eos_token_ids(tokenizer, source: ModelSource) -> frozenset[int]:
    """EOS ids: the tokenizer's, plus generation_config.json's (Llama 3 lists several)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen_config = source.directory / "generation_config.json"
    if source.kind == "hf" and gen_config.exists():
        eos = json.loads(gen_config.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return frozenset(ids)


class IncrementalDetokenizer:
    """Turns a growing list of output ids into text deltas, never emitting half a UTF-8 character.

    Decoding starts a few prompt tokens back so tokenizers that drop a leading space (SentencePiece) get the
    spacing right, and only the text past `read_offset` is new.
    """

    CONTEXT = 5

    def __init__(self, tokenizer, prompt_ids, skip_special_tokens: bool = True):
        self._decode = tokenizer.backend_tokenizer.decode
        self._skip = skip_special_tokens
        self._ids = list(prompt_ids[-self.CONTEXT:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self.text = ""

    def append(self, token_id: int) -> str:
        """Add one token; returns the text it completes (may be empty while a character is incomplete)."""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset], skip_special_tokens=self._skip)
        full = self._decode(self._ids[self._prefix_offset:], skip_special_tokens=self._skip)
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""
        delta = full[len(prefix):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self.text += delta
        return delta
