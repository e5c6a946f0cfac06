"""One normaliser for native generate requests, used by `Engine.generate` and `POST /generate` alike (early
SGLang's `GenerateReqInput.post_init()` is the model), so both accept, refuse and shape exactly the same requests.

Shapes, as SGLang's:
- prompts: `text` (or `input_ids`) is one prompt, or a list of them (a batch);
- `sampling_params`: one dict for every prompt, or a list with one dict per prompt;
- `rid`: a string, or a list with one string per prompt. A single request with n == 1 keeps a string rid as it
  is; otherwise a string becomes `{rid}_{k}` for the k-th request of the flattened batch, and a per-prompt rid
  becomes `{rid}_{j}` for its j-th sample when n > 1 (SGLang's `_normalize_rid`);
- results: one dict for a single prompt with n == 1, else a flat list, prompt-major (prompt 0's n samples, then
  prompt 1's, ...), as SGLang's server returns them.
Mismatched lengths are refused naming the field, never truncated.
"""

from __future__ import annotations

import dataclasses
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from radixflow.errors import InvalidRequestError
from radixflow.runtime.limits import RequestLimits
from radixflow.runtime.request import Bootstrap, LogprobOptions, Req
from radixflow.runtime.sampling_params import SamplingParams

MAX_TOP_LOGPROBS = 20


@dataclass
class PromptRequests:
    """One prompt of a normalised batch and the ids of its n samples (one `Req` each)."""

    prompt: str | list[int]
    params: SamplingParams
    rids: list[str]


@dataclass
class NormalizedInput:
    prompts: list[PromptRequests]
    logprob_options: LogprobOptions
    is_single: bool  # one prompt, one sample: the result is a dict, not a list
    stream: bool
    timeout: float | None = None  # seconds from now: past it, the engine ends the request (finish "abort")
    priority: int = 0
    bootstrap: Bootstrap | None = None  # disaggregated serving: the first request's; the k-th gets room + k
    session_id: str | None = None

    def build(self, tokenizer, eos_ids: frozenset[int], limits: RequestLimits) -> list[Req]:
        """Tokenize and check every prompt; one `Req` per sample, flat, prompt-major."""
        reqs = [req for p in self.prompts for req in _build(tokenizer, eos_ids, limits, p, self.logprob_options)]
        deadline = time.time() + self.timeout if self.timeout is not None else None
        for k, req in enumerate(reqs):
            req.deadline, req.priority, req.session_id = deadline, self.priority, self.session_id
            if self.bootstrap is not None:
                req.bootstrap = dataclasses.replace(self.bootstrap, room=(self.bootstrap.room + k) % MAX_ROOM)
        return reqs

    def shape(self, results: Sequence):
        """The flat per-request results in the caller's shape: one item, or the list."""
        return results[0] if self.is_single else list(results)


MAX_PRIORITY = 2**31 - 1
MAX_SESSION_ID = 256  # characters
MAX_ROOM = 2**63  # bootstrap_room: a non-negative 64-bit signed integer, as SGLang's router draws it


@dataclass
class GenerateInput:
    """A native generate request as the caller gave it (SGLang's field names)."""

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict | SamplingParams | list[dict | SamplingParams] | None = None
    rid: str | list[str] | None = None
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False
    stream: bool = False
    timeout: float | None = None  # seconds; the request ends with finish_reason abort ("timeout: ...") past it
    priority: int | None = None  # with priority scheduling, lower first (SGLang's and vLLM's field name)
    # Prefill/decode disaggregation (SGLang's fields; the router sets them): the prefill server's bootstrap
    # address and the transfer's id. A batch's k-th request (prompt-major, samples included) uses room + k.
    bootstrap_host: str | None = None
    bootstrap_port: int | None = None
    bootstrap_room: int | None = None
    # The cache retains this request's KV for the session until it is closed or idle past its TTL (radixflow's
    # field; an id that is not open opens it).
    session_id: str | None = None

    def normalize(self, text_field: str = "text") -> NormalizedInput:
        """Validate the shapes and the sampling parameters; raises InvalidRequestError naming the field
        (`text_field` is what the caller calls the text: `prompt` for `Engine.generate`)."""
        prompts, batched = _prompts(self.text, self.input_ids, text_field)
        params = _per_prompt_params(self.sampling_params, len(prompts))
        rids = _rids(self.rid, [p.n for p in params], batched)
        is_single = not batched and params[0].n == 1
        if self.stream and not is_single:
            raise InvalidRequestError("stream", "streaming takes a single prompt with n=1")
        logprob = logprob_options(self.return_logprob, self.logprob_start_len, self.top_logprobs_num,
                                  self.return_text_in_logprobs)
        items = [PromptRequests(p, sp, r) for p, sp, r in zip(prompts, params, rids, strict=True)]
        timeout = self.timeout
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not math.isfinite(timeout) or timeout <= 0):
            raise InvalidRequestError("timeout", f"must be a number of seconds > 0, got {timeout!r}")
        priority = 0 if self.priority is None else self.priority
        if isinstance(priority, bool) or not isinstance(priority, int) or abs(priority) > MAX_PRIORITY:
            raise InvalidRequestError("priority", f"must be an integer in [-{MAX_PRIORITY}, {MAX_PRIORITY}], got "
                                                  f"{self.priority!r}")
        return NormalizedInput(items, logprob, is_single, bool(self.stream), timeout, priority, self._bootstrap(),
                               check_session_id(self.session_id))

    def _bootstrap(self) -> Bootstrap | None:
        given = (self.bootstrap_host, self.bootstrap_port, self.bootstrap_room)
        if all(v is None for v in given):
            return None
        if not isinstance(self.bootstrap_host, str) or not self.bootstrap_host:
            raise InvalidRequestError("bootstrap_host", "a disaggregated request names its prefill server's host "
                                                        "(with bootstrap_port and bootstrap_room)")
        port = self.bootstrap_port
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise InvalidRequestError("bootstrap_port", f"must be a port number in [1, 65535], got {port!r}")
        room = self.bootstrap_room
        if isinstance(room, bool) or not isinstance(room, int) or not 0 <= room < MAX_ROOM:
            raise InvalidRequestError("bootstrap_room", f"must be an integer in [0, 2**63), got {room!r}")
        return Bootstrap(self.bootstrap_host, port, room)


def check_session_id(session_id) -> str | None:
    if session_id is not None and (not isinstance(session_id, str) or not 0 < len(session_id) <= MAX_SESSION_ID):
        raise InvalidRequestError("session_id", f"must be a non-empty string of at most {MAX_SESSION_ID} "
                                                f"characters, got {session_id!r}")
    return session_id


def logprob_options(return_logprob: bool, logprob_start_len: int, top_logprobs_num: int,
                    return_text_in_logprobs: bool = False) -> LogprobOptions:
    if not isinstance(top_logprobs_num, int) or not 0 <= top_logprobs_num <= MAX_TOP_LOGPROBS:
        raise InvalidRequestError("top_logprobs_num",
                                  f"must be an integer in [0, {MAX_TOP_LOGPROBS}], got {top_logprobs_num!r}")
    if not isinstance(logprob_start_len, int) or logprob_start_len < -1:
        raise InvalidRequestError("logprob_start_len", f"must be an integer >= -1, got {logprob_start_len!r}")
    return LogprobOptions(bool(return_logprob), logprob_start_len, top_logprobs_num, bool(return_text_in_logprobs))


def sample_rid(rid: str, k: int) -> str:
    """The id of the k-th request made from `rid` (a batch entry, or one of n samples)."""
    return f"{rid}_{k}"


def is_sample_of(candidate: str, rid: str) -> bool:
    """Whether `candidate` is one of the requests `sample_rid` made from `rid` (aborting `rid` aborts them)."""
    prefix = f"{rid}_"
    return candidate.startswith(prefix) and candidate[len(prefix):].isdigit()


def _prompts(text, input_ids, text_field: str) -> tuple[list[str | list[int]], bool]:
    """(text | list of texts) or (ids | list of id lists) as a list; also says whether it was a batch."""
    if (text is None) == (input_ids is None):
        raise InvalidRequestError(text_field, f"give exactly one of {text_field} and input_ids")
    if text is not None:
        if isinstance(text, str):
            return [text], False
        if isinstance(text, list) and text and all(isinstance(t, str) for t in text):
            return list(text), True
        raise InvalidRequestError(text_field, "must be a string or a non-empty list of strings")
    if isinstance(input_ids, list) and input_ids and all(isinstance(x, list) for x in input_ids):
        return list(input_ids), True
    if isinstance(input_ids, list) and input_ids and not any(isinstance(x, list) for x in input_ids):
        return [input_ids], False
    raise InvalidRequestError("input_ids", "must be a non-empty list of token ids or a list of such lists")


def _per_prompt_params(params, num_prompts: int) -> list[SamplingParams]:
    given = params if isinstance(params, list) else [params] * num_prompts
    if len(given) != num_prompts:
        raise InvalidRequestError("sampling_params", f"{len(given)} entries for {num_prompts} prompts; give one "
                                                     f"object, or a list with one object per prompt")
    if not all(p is None or isinstance(p, (dict, SamplingParams)) for p in given):
        raise InvalidRequestError("sampling_params", "an object, or a list with one object per prompt")
    parsed: dict[int, SamplingParams] = {}  # one dict shared by every prompt is validated once
    for p in given:
        if id(p) not in parsed:
            parsed[id(p)] = p if isinstance(p, SamplingParams) else SamplingParams.from_dict(p)
    return [parsed[id(p)] for p in given]


def _rids(rid, samples: list[int], batched: bool) -> list[list[str]]:
    """Per prompt, the ids of its samples (see the module docstring)."""
    if rid is None:
        return [[uuid.uuid4().hex for _ in range(n)] for n in samples]
    if isinstance(rid, str):
        if not batched and samples == [1]:
            return [[rid]]
        flat = iter(range(sum(samples)))
        return [[sample_rid(rid, next(flat)) for _ in range(n)] for n in samples]
    if not isinstance(rid, list) or not all(isinstance(r, str) for r in rid):
        raise InvalidRequestError("rid", "must be a string, or a list with one string per prompt")
    if len(rid) != len(samples):
        raise InvalidRequestError("rid", f"{len(rid)} ids for {len(samples)} prompts; give one per prompt")
    if len(set(rid)) != len(rid):
        raise InvalidRequestError("rid", f"ids must be unique within a request, got {rid}")
    return [[r] if n == 1 else [sample_rid(r, j) for j in range(n)] for r, n in zip(rid, samples)]


def _build(tokenizer, eos_ids: frozenset[int], limits: RequestLimits, item: PromptRequests,
           logprob: LogprobOptions) -> list[Req]:
    sp = item.params
    prompt = item.prompt
    ids = tokenizer.encode(prompt, add_special_tokens=True) if isinstance(prompt, str) else list(prompt)
    if any(not isinstance(t, int) or isinstance(t, bool) or t < 0 or t >= limits.vocab_size for t in ids):
        raise InvalidRequestError("input_ids", f"token ids must be integers in [0, {limits.vocab_size})")
    limits.check_fits(len(ids), sp.max_new_tokens)
    if logprob.logprob_start_len >= len(ids):
        raise InvalidRequestError("logprob_start_len", f"must be < the prompt length ({len(ids)})")
    stop_ids = frozenset(sp.stop_token_ids) | (frozenset() if sp.ignore_eos else eos_ids)
    return [Req(rid=rid, prompt_ids=tuple(ids), params=sp, logprob_options=logprob, stop_ids=stop_ids)
            for rid in item.rids]
