"""A toy byte-level tokenizer: every byte is a token, plus a few merges (`",`, `{"`, `yes`, ` "`), enough to see
token-boundary effects. Any text is representable, so grammars can be checked on it without a model."""

from __future__ import annotations

import llguidance
import llguidance.hf
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


class GrammarProbe:
    """Whether an llguidance grammar accepts a whole text, on the toy vocabulary."""

    def __init__(self):
        self.hf = build_toy_tokenizer()
        self.tokenizer = llguidance.hf.from_tokenizer(self.hf, n_vocab=len(self.hf), eos_token=0)

    def accepts(self, grammar: str, text: str) -> bool:
        assert llguidance.LLMatcher.validate_grammar(grammar) == "", grammar
        matcher = llguidance.LLMatcher(self.tokenizer, llguidance.LLMatcher.grammar_from_lark(grammar))
        ids = self.hf.encode(text, add_special_tokens=False)
        return matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting()
