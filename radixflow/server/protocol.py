"""Request bodies of the native endpoints (SGLang's field names), as pydantic models: FastAPI validates them and
`/openapi.json` documents them. Imports nothing of radixflow's."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # as SGLang's server: fields it does not know are ignored


class DisaggregationFields(BaseModel):
    """Prefill/decode disaggregation (SGLang's fields): `radixflow router --pd-disaggregation` sets them on the
    request it sends to both servers of a pair. Any API's body takes them."""

    bootstrap_host: str | None = Field(default=None, description="the prefill server's host")
    bootstrap_port: int | None = Field(default=None, description="the prefill server's bootstrap port")
    bootstrap_room: int | None = Field(default=None, description="the transfer's id, the same on both servers")

    def bootstrap(self) -> dict[str, Any]:
        return {"bootstrap_host": self.bootstrap_host, "bootstrap_port": self.bootstrap_port,
                "bootstrap_room": self.bootstrap_room}


SESSION_ID_HELP = ("the cache retains this request's KV for the session until POST /close_session or its TTL; an "
                   "id that is not open opens it")


class GenerateRequest(_Body, DisaggregationFields):
    """`POST /generate`. One prompt or a batch; the shapes are SGLang's (docs/api.md)."""

    text: str | list[str] | None = Field(default=None, description="a prompt, or a list of prompts (a batch)")
    input_ids: list[int] | list[list[int]] | None = Field(
        default=None, description="token ids instead of text: one list, or a list of lists")
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = Field(
        default=None, description="one object for every prompt, or one per prompt (max_new_tokens, temperature, "
                                  "top_p, top_k, min_p, penalties, stop, stop_token_ids, ignore_eos, seed, n, "
                                  "regex / json_schema / ebnf, ...)")
    rid: str | list[str] | None = Field(
        default=None, description="request id, or one per prompt; a batch or n > 1 samples get `{rid}_{k}`")
    return_logprob: bool = False
    logprob_start_len: int = Field(default=-1, description="-1: no prompt logprobs; k >= 0: from position k")
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False
    stream: bool = Field(default=False, description="SSE with the text so far in each event (single prompt, n=1)")
    timeout: float | None = Field(default=None, gt=0, description="seconds: not finished by then, the request ends "
                                                                  "(finish_reason abort, 'timeout: ...')")
    priority: int | None = Field(default=None, ge=-(2**31 - 1), le=2**31 - 1,
                                 description="with priority scheduling, lower values are served first")
    session_id: str | None = Field(default=None, min_length=1, max_length=256, description=SESSION_ID_HELP)


class OpenSessionBody(_Body):
    """`POST /open_session`: open a session (or set an open one's TTL); without an id, a new one is made."""

    session_id: str | None = Field(default=None, min_length=1, max_length=256)
    ttl_s: float | None = Field(default=None, gt=0, le=7 * 24 * 3600,
                                description="seconds of idleness after which the session closes")


class CloseSessionBody(_Body):
    """`POST /close_session`: release the session's retained prefix (it stays cached as any other entry)."""

    session_id: str = Field(min_length=1, max_length=256)


class AbortRequestBody(_Body):
    """`POST /abort_request`: aborts `rid` and the requests made from it (`{rid}_{k}`)."""

    rid: str


class FlushCacheRequest(_Body):
    """`POST /flush_cache` takes no fields; the body may be omitted."""
