"""Compiled grammars for one tokenizer: compile off the scheduler thread, cache by spec, one matcher per request.

The scheduler calls `submit(constraint)` when a request arrives and polls the future: the request waits in the
queue (in its own state) until its grammar is ready while every other request keeps running. A compiled matcher
is kept as a template per spec (LRU); each request gets a cheap `deep_copy` of it.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import llguidance
import llguidance.hf

from radixflow.runtime.constrained.spec import Constraint

COMPILE_WORKERS = 4


class GrammarError(ValueError):
    """A grammar llguidance refused when compiling it against the tokenizer."""


@dataclass
class GrammarStats:
    compiled: int = 0
    cache_hits: int = 0
    compile_seconds: float = 0.0
    tokenizer_seconds: float = 0.0  # building llguidance's view of the vocabulary, once per engine
    jump_forward_tokens: int = 0   # tokens appended by jump-forward instead of being decoded
    jump_forward_steps: int = 0


class GrammarCompiler:
    """A pool of compile threads and an LRU cache of compiled matchers, for one tokenizer."""

    def __init__(self, hf_tokenizer, vocab_size: int, eos_id: int | None, cache_size: int = 256):
        self.hf_tokenizer = hf_tokenizer
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.cache_size = cache_size
        self.stats = GrammarStats()
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()
        self._templates: OrderedDict[Constraint, llguidance.LLMatcher] = OrderedDict()
        # Several workers: a grammar that compiles slowly (and then times out; a thread cannot be killed) must
        # not hold up the grammars of other requests. llguidance releases the GIL while it compiles.
        self._pool = ThreadPoolExecutor(COMPILE_WORKERS, thread_name_prefix="grammar-compile")

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        """Built on first use (about half a second for a 49k vocabulary), on the compile thread."""
        with self._lock:
            if self._tokenizer is None:
                start = time.perf_counter()
                # JSON slices: faster masks than the general ones on this vocabulary, for schemas and regexes
                # alike (bench/bench_constrained.py --only mask).
                self._tokenizer = llguidance.hf.from_tokenizer(self.hf_tokenizer, n_vocab=self.vocab_size,
                                                               eos_token=self.eos_id,
                                                               slices=llguidance.LLTokenizer.json_slices())
                self.stats.tokenizer_seconds = time.perf_counter() - start
            return self._tokenizer

    def submit(self, constraint: Constraint) -> Future:
        return self._pool.submit(self.matcher, constraint)

    def matcher(self, constraint: Constraint) -> llguidance.LLMatcher:
        """A fresh matcher for one request (compiles, or copies the cached template)."""
        with self._lock:
            template = self._templates.get(constraint)
            if template is not None:
                self._templates.move_to_end(constraint)
                self.stats.cache_hits += 1
                return template.deep_copy()
        tokenizer = self.tokenizer
        start = time.perf_counter()
        template = llguidance.LLMatcher(tokenizer, constraint.grammar(), log_level=0)
        if template.is_error():
            raise GrammarError(f"{constraint.kind}: {template.get_error()}")
        with self._lock:
            self.stats.compiled += 1
            self.stats.compile_seconds += time.perf_counter() - start
            self._templates[constraint] = template
            while len(self._templates) > self.cache_size:
                self._templates.popitem(last=False)
        return template.deep_copy()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class RequestGrammar:
    """One request's matcher plus the jump-forward step (the paper's compressed FSM)."""

    def __init__(self, matcher: llguidance.LLMatcher, compiler: GrammarCompiler):
        self.matcher = matcher
        self.compiler = compiler

    @property
    def finished(self) -> bool:
        return self.matcher.is_stopped()

    def advance(self, token: int, jump_forward: bool) -> tuple[list[int], str | None]:
        """Consume the sampled `token`; return the tokens to append (the token itself, or it re-tokenized
        together with the text the grammar forces next) and an error message if the grammar refused it."""
        m = self.matcher
        if not m.consume_token(token):
            return [], m.get_error() or f"token {token} violates the constraint"
        if not jump_forward or m.is_stopped():
            return [token], None
        forced = m.compute_ff_bytes()
        if not forced:
            return [token], None
        tokens = self._retokenize(token, forced)
        # The re-tokenized bytes are the same text, so the grammar accepts them; check before committing anyway
        # (a tokenizer that normalises text could change the bytes), and keep the plain step if not.
        if tokens is None or not m.rollback(1):
            return [token], None
        if m.validate_tokens(tokens) != len(tokens) or not m.consume_tokens(tokens):
            m.consume_token(token)
            return [token], None
        self.compiler.stats.jump_forward_steps += 1
        self.compiler.stats.jump_forward_tokens += len(tokens) - 1
        return tokens, None

    def _retokenize(self, token: int, forced: bytes) -> list[int] | None:
        """Tokens for (the sampled token's text + the forced text), as the tokenizer would split them: the model
        then sees e.g. `",` as the one token it would have produced, not `"` followed by `,`."""
        ll = self.compiler.tokenizer
        text_bytes = ll.decode_bytes([token]) + forced
        try:
            text = text_bytes.decode("utf-8")
        except UnicodeDecodeError:  # the sampled token ends inside a multi-byte character: no safe split
            return None
        tokens = self.compiler.hf_tokenizer.encode(text, add_special_tokens=False)
        if not tokens or ll.decode_bytes(tokens) != text_bytes:
            return None
        return tokens
