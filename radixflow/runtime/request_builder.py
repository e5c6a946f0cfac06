"""Turn user input (text or token ids, a sampling-params dict, logprob options) into validated `Req`s.

Shared by the in-process `Engine` and the HTTP server, so both accept and refuse exactly the same requests with
the same messages. Everything here runs before a request reaches the scheduler.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from radixflow.runtime.request import LogprobOptions, Req
from radixflow.runtime.sampling_params import InvalidRequestError, SamplingParams

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class RequestLimits:
    max_context: int  # prompt + output tokens per request
    pool_size: int    # KV pool tokens: one request can never exceed it
    vocab_size: int

    def check_fits(self, prompt_len: int, max_new_tokens: int) -> None:
        if prompt_len == 0:
            raise InvalidRequestError("prompt", "is empty")
        if prompt_len + max_new_tokens > self.max_context:
            raise InvalidRequestError(
                "max_new_tokens" if prompt_len < self.max_context else "prompt",
                f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context length "
                f"({self.max_context} tokens)",
            )
        if prompt_len + max_new_tokens > self.pool_size:
            raise InvalidRequestError(
                "max_new_tokens",
                f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) exceeds the KV pool "
                f"({self.pool_size} tokens); raise --max-total-tokens or --kv-cache-gb",
            )


def logprob_options(return_logprob: bool, logprob_start_len: int, top_logprobs_num: int) -> LogprobOptions:
    if not isinstance(top_logprobs_num, int) or not 0 <= top_logprobs_num <= MAX_TOP_LOGPROBS:
        raise InvalidRequestError("top_logprobs_num", f"must be an integer in [0, {MAX_TOP_LOGPROBS}], got {top_logprobs_num!r}")
    if not isinstance(logprob_start_len, int) or logprob_start_len < -1:
        raise InvalidRequestError("logprob_start_len", f"must be an integer >= -1, got {logprob_start_len!r}")
    return LogprobOptions(bool(return_logprob), logprob_start_len, top_logprobs_num)


def build_reqs(tokenizer, eos_ids: frozenset[int], limits: RequestLimits, prompt: str | list[int],
               params: dict | SamplingParams | None, logprob: LogprobOptions, rid: str | None = None) -> list[Req]:
    """One `Req` per sample (`n` of them). Raises InvalidRequestError naming the field."""
    sp = params if isinstance(params, SamplingParams) else SamplingParams.from_dict(params)
    ids = tokenizer.encode(prompt, add_special_tokens=True) if isinstance(prompt, str) else list(prompt)
    if any(not isinstance(t, int) or isinstance(t, bool) or t < 0 or t >= limits.vocab_size for t in ids):
        raise InvalidRequestError("input_ids", f"token ids must be integers in [0, {limits.vocab_size})")
    limits.check_fits(len(ids), sp.max_new_tokens)
    if logprob.logprob_start_len >= len(ids):
        raise InvalidRequestError("logprob_start_len", f"must be < the prompt length ({len(ids)})")
    stop_ids = frozenset(sp.stop_token_ids) | (frozenset() if sp.ignore_eos else eos_ids)
    base = rid or uuid.uuid4().hex
    return [Req(rid=base if sp.n == 1 else f"{base}-{i}", prompt_ids=tuple(ids), params=sp, logprob=logprob,
                stop_ids=stop_ids) for i in range(sp.n)]


def prompt_batch(text, input_ids, text_field: str = "prompt") -> tuple[list, bool]:
    """Normalise (text | list of texts) or (ids | list of id lists) to a list; also says whether it was a batch."""
    if (text is None) == (input_ids is None):
        raise InvalidRequestError(text_field, f"give exactly one of {text_field} and input_ids")
    if text is not None:
        if isinstance(text, str):
            return [text], False
        if isinstance(text, list) and text and all(isinstance(t, str) for t in text):
            return list(text), True
        raise InvalidRequestError(text_field, "must be a string or a non-empty list of strings")
    if isinstance(input_ids, list) and input_ids and all(isinstance(x, list) for x in input_ids):
        return input_ids, True
    if isinstance(input_ids, list) and input_ids:
        return [input_ids], False
    raise InvalidRequestError("input_ids", "must be a non-empty list of token ids or a list of such lists")
