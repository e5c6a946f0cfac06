"""A request inside the runtime: status, token counters, and what it has produced.

Two counters drive everything (as in vLLM v1): `num_tokens` (prompt + generated) and `num_computed` (tokens
whose KV sits in the pool). A step computes `all_ids[num_computed : num_computed + n]`; when that reaches
`num_tokens` the model samples the next token. Prefill, chunked prefill, decode (n == 1), prefix-cache hits
(num_computed starts at the hit length) and resumption after preemption are all this arithmetic.
"""

from __future__ import annotations

import enum
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from radixflow.runtime.sampling_params import SamplingParams

if TYPE_CHECKING:  # type-only: both modules import this one
    from radixflow.runtime.cache.radix_cache import TreeNode
    from radixflow.runtime.constrained.grammar import RequestGrammar


class ReqStatus(enum.Enum):
    WAITING = "waiting"      # in the queue, holds no KV of its own
    RUNNING = "running"      # holds a request slot and KV; prefilling or decoding
    RECEIVING = "receiving"  # disaggregated decode: holds a slot and KV for the prompt, which a prefill server sends
    FINISHED = "finished"


@dataclass(frozen=True)
class FinishReason:
    """`type` is "stop" (EOS, stop token or stop string), "length" or "abort"; `matched` says what stopped it."""

    type: Literal["stop", "length", "abort"]
    matched: int | str | None = None
    message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type, "matched": self.matched}
        if self.message:
            out["message"] = self.message
        return out


@dataclass(frozen=True)
class TokenLogprobs:
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), best first; empty unless top_logprobs_num > 0


@dataclass(frozen=True)
class Bootstrap:
    """Prefill/decode disaggregation: where the request's prefill server listens for its decode server
    (`bootstrap_host`, `bootstrap_port`) and the transfer's id (`bootstrap_room`), as SGLang names them. The router
    sends the same three to both servers."""

    host: str
    port: int
    room: int


@dataclass
class LogprobOptions:
    return_logprob: bool = False
    logprob_start_len: int = -1  # SGLang's convention: -1 = no prompt logprobs; k >= 0 = from prompt position k
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False  # the API's results carry each token's text (the runtime ignores it)

    @property
    def prompt_start(self) -> int | None:
        return self.logprob_start_len if self.return_logprob and self.logprob_start_len >= 0 else None


@dataclass(eq=False)  # identity, not field equality: two requests with equal fields are still two requests
class Req:
    rid: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    logprob_options: LogprobOptions = field(default_factory=LogprobOptions)
    stop_ids: frozenset[int] = frozenset()  # EOS ids (unless ignore_eos) plus stop_token_ids
    arrival: float = field(default_factory=time.monotonic)
    deadline: float | None = None  # wall-clock time (time.time(): both processes share the clock) to end it by
    priority: int = 0  # with priority scheduling, lower values go first (vLLM's convention)
    session_id: str | None = None  # the cache retains this request's KV for its session (cache/manager.py)
    length_score: float = 0.0  # ltr: the ranker's score of the prompt (higher: a longer answer expected)
    bootstrap: Bootstrap | None = None  # disaggregated serving: the KV transfer (None once the KV has arrived)

    status: ReqStatus = ReqStatus.WAITING
    num_computed: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache at first admission (reported)
    num_retractions: int = 0
    finish_reason: FinishReason | None = None

    # Owned by the cache manager while RUNNING: the request-to-token slot, positions with a KV index (computed or
    # being computed this step), how many of those the prefix cache owns, and the locked cache node.
    slot: int | None = None
    num_allocated: int = 0
    num_in_tree: int = 0
    tree_node: TreeNode | None = None

    # Logprobs accumulate here: one entry per output token, and per prompt position from
    # max(logprob_options.prompt_start, 1) (position 0 has no context to score it).
    output_logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs_emitted: int = 0  # how many of them went out in a RequestOutput

    def unsent_prompt_logprobs(self) -> list[TokenLogprobs]:
        """Prompt logprobs not yet emitted (a chunked prefill scores its prompt over several steps, and only the
        last chunk, which samples, produces an output), marked as emitted."""
        out = self.prompt_logprobs[self.prompt_logprobs_emitted:]
        self.prompt_logprobs_emitted = len(self.prompt_logprobs)
        return out

    # Constrained decoding, owned by the scheduler process: the grammar's compile future while the request waits
    # for it, then the request's matcher (a `RequestGrammar`).
    grammar_future: Future | None = None
    # Hierarchical cache with storage: the prompt's pages being read from storage while the request waits
    # (`PrefixCache.prefetch`); the request is admitted once it is done, or past `prefetch_deadline`.
    storage_prefetch: Future | None = None
    prefetch_deadline: float = 0.0
    grammar_deadline: float = 0.0
    grammar: RequestGrammar | None = None

    _output_ids: list[int] = field(default_factory=list)

    @property
    def output_ids(self) -> tuple[int, ...]:
        return tuple(self._output_ids)

    @property
    def num_output(self) -> int:
        return len(self._output_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self._output_ids)

    @property
    def num_pending(self) -> int:
        """Tokens whose KV is not computed yet (1 for a request that is decoding)."""
        return self.num_tokens - self.num_computed

    def all_ids(self, start: int = 0, end: int | None = None) -> list[int]:
        prompt_len = len(self.prompt_ids)
        end = self.num_tokens if end is None else end
        head = list(self.prompt_ids[start:min(end, prompt_len)]) if start < prompt_len else []
        tail = self._output_ids[max(start - prompt_len, 0):max(end - prompt_len, 0)]
        return head + tail

    def append_output(self, token_id: int) -> None:
        self._output_ids.append(token_id)

    @property
    def remaining_new_tokens(self) -> int:
        return max(self.params.max_new_tokens - self.num_output, 0)

    @property
    def finished(self) -> bool:
        return self.status is ReqStatus.FINISHED
