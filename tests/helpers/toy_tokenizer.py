"""A toy byte-level tokenizer: every byte is a token, plus a few merges (`",`, `{"`, `yes`, ` "`), enough to see
token-boundary effects. Any text is representable, so grammars can be checked on it without a model."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

MERGES = [('"', ","), ("{", '"'), ("y", "e"), ("ye", "s"), ("Ġ", '"')]


def build_toy_tokenizer() -> PreTrainedTokenizerFast:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"</s>": 0}
    for symbol in alphabet + ["".join(m) for m in MERGES]:
        vocab.setdefault(symbol, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")
