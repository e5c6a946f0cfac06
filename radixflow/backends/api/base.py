"""What the API-model backends share (OpenAI, Anthropic, VertexAI, LiteLLM): token and call counts, errors that carry
the provider's message, the provider-neutral reply and sampling fields, and `select` on a chat model.

A provider backend implements `_call(prompt, request) -> Reply` and `_stream(prompt, request)` (text pieces, then
the Reply). The prompt is the program's text for a completion model, or for a chat model the conversation in
OpenAI's message format (the interpreter's `_chat_prompt`), which each provider converts to its own. Retries with
backoff on 429 / 5xx and timeouts are the official SDKs' own (`max_retries=`, `timeout=` go to the client).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from radixflow.backends.base import BaseBackend
from radixflow.lang.choices import ChoicesDecision, ChoicesSamplingMethod

# Sampling fields that change what may be generated; a provider without them must refuse, not ignore them.
_CONSTRAINTS = ("regex", "ebnf", "stop_regex", "stop_token_ids")


@dataclass
class TokenUsage:
    """What a backend has spent: SGLang's `backend.token_usage` (prompt and completion tokens), plus the calls made
    and the prompt tokens the provider served from its cache."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0
    cached_tokens: int = 0

    def reset(self) -> None:
        self.prompt_tokens = self.completion_tokens = self.calls = self.cached_tokens = 0


class APIBackendError(RuntimeError):
    """A provider failed a call (after the SDK's retries) or refused it; the message is the provider's."""

    def __init__(self, backend: str, message: str, status: int | None = None):
        super().__init__(f"{backend}: {f'HTTP {status}: ' if status else ''}{message}")
        self.status = status


def sdk_error(backend: str, exc: Exception) -> APIBackendError:
    """An SDK's exception (openai's and anthropic's, and LiteLLM's, which are openai's) as an APIBackendError: the
    HTTP status where there was one, the provider's own message from the error body where it sent one."""
    body = getattr(exc, "body", None)
    error = body.get("error", body) if isinstance(body, dict) else None
    message = (error.get("message") if isinstance(error, dict) else None) or getattr(exc, "message", None)
    return APIBackendError(backend, message or str(exc), getattr(exc, "status_code", None))


class UnsupportedFeatureError(NotImplementedError):
    """A program asked a backend for something its provider cannot do (a regex on Anthropic, ...)."""


@dataclass
class Request:
    """A gen's sampling fields, provider-neutral: each backend maps them to its API's names."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    stop: list[str] = field(default_factory=list)
    n: int = 1
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    json_schema: dict | None = None
    regex: str | None = None
    ebnf: str | None = None
    logprobs: bool = False  # the output's token texts (and logprobs) are wanted: speculation counts tokens with them

    @classmethod
    def from_params(cls, params: dict, logprob: dict, backend: str, supported: tuple[str, ...] = ()) -> Request:
        """From the runtime's sampling params; a constraint not in `supported` is refused, naming it."""
        for name in _CONSTRAINTS:
            if params.get(name) and name not in supported:
                raise UnsupportedFeatureError(f"gen({name}=...): {backend} cannot constrain generation that way"
                                              + (" (dtype= is a regex)" if name == "regex" else ""))
        schema = params.get("json_schema")
        if schema is not None and "json_schema" not in supported:
            raise UnsupportedFeatureError(f"gen(json_schema=...): {backend} has no structured output")
        stop = params.get("stop") or []
        return cls(max_tokens=params.get("max_new_tokens", 128), temperature=params.get("temperature", 1.0),
                   top_p=params.get("top_p", 1.0), top_k=params.get("top_k", -1), min_p=params.get("min_p", 0.0),
                   stop=[stop] if isinstance(stop, str) else list(stop), n=params.get("n", 1),
                   frequency_penalty=params.get("frequency_penalty", 0.0),
                   presence_penalty=params.get("presence_penalty", 0.0),
                   json_schema=json.loads(schema) if isinstance(schema, str) else schema,
                   regex=params.get("regex"), ebnf=params.get("ebnf"), logprobs=bool(logprob.get("return_logprob")))


@dataclass
class Reply:
    """One call's answer: a text per sample, why each ended ({"type": "stop" | "length", "matched"}), usage, and
    per sample the output's (logprob or None, token text) pairs where the provider gives them."""

    texts: list[str]
    finish_reasons: list[dict]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    tokens: list[list[tuple[float | None, str]]] | None = None
    calls: int = 1  # API calls it took (a provider without `n` makes one per sample)

    def meta(self, i: int) -> dict:
        """SGLang-style meta info of sample `i`."""
        meta = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "cached_tokens": self.cached_tokens, "finish_reason": self.finish_reasons[i]}
        if self.tokens is not None:
            meta["output_token_logprobs"] = [(lp, None, text) for lp, text in self.tokens[i]]
        return meta


class APIBackend(BaseBackend):
    is_chat_model = True
    api_speculative_execution = True
    # Structured output the provider has: "json_schema" and, on servers with SGLang's extensions, "regex" / "ebnf".
    constraints: tuple[str, ...] = ("json_schema",)

    def __init__(self, model_name: str, chat_template):
        self.model_name = model_name
        self.chat_template = chat_template
        self.token_usage = TokenUsage()
        self._usage_lock = threading.Lock()  # run_batch's programs share the backend

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.model_name!r})"

    def get_model_name(self) -> str:
        return self.model_name

    def supports_images(self) -> bool:
        return self.is_chat_model

    # -- provider hooks ----------------------------------------------------------------------------------------
    def _call(self, prompt: str | list[dict], request: Request) -> Reply:
        raise NotImplementedError

    def _stream(self, prompt: str | list[dict], request: Request) -> Iterator[str | Reply]:
        """Text pieces as they arrive, then the Reply (whole text and usage). Default: one piece."""
        reply = self._call(prompt, request)
        yield reply.texts[0]
        yield reply

    # -- the backend interface ---------------------------------------------------------------------------------
    def generate(self, prompt, params, logprob):
        reply = self._call(prompt, self._request(params, logprob))
        self._count(reply)
        if params.get("n", 1) > 1:
            return reply.texts, [reply.meta(i) for i in range(len(reply.texts))]
        return reply.texts[0], reply.meta(0)

    def generate_stream(self, prompt, params, logprob):
        request = self._request(params, logprob)
        for item in self._stream(prompt, request):
            if isinstance(item, Reply):
                self._count(item)
                yield "", item.meta(0)
            elif item:
                yield item, None

    def select(self, prompt, choices: list[str], temperature: float,
               method: ChoicesSamplingMethod | None = None) -> ChoicesDecision:
        """On a chat model: one call whose answer is constrained (structured output) to name one of the choices.
        Chat APIs give no logprobs of given text, so the choice methods cannot score the choices; SGLang refuses
        `select` on chat models instead."""
        schema = {"type": "object", "properties": {"choice": {"type": "string", "enum": list(choices)}},
                  "required": ["choice"], "additionalProperties": False}
        longest = max(len(c) for c in choices)
        answer, meta = self.generate(prompt, {"json_schema": schema, "temperature": temperature,
                                              "max_new_tokens": 16 + longest}, {})
        return ChoicesDecision(_chosen(answer, choices, str(self)), {**meta, "answer": answer,
                                                                     "method": "structured_output"})

    def _request(self, params: dict, logprob: dict) -> Request:
        return Request.from_params(params, logprob, str(self), self.constraints)

    def _count(self, reply: Reply) -> None:
        with self._usage_lock:
            usage = self.token_usage
            usage.calls += reply.calls
            usage.prompt_tokens += reply.prompt_tokens
            usage.completion_tokens += reply.completion_tokens
            usage.cached_tokens += reply.cached_tokens


def _chosen(answer: str, choices: list[str], backend: str) -> str:
    """The choice a structured answer names; a provider that ignored the schema may still have named one."""
    try:
        value = json.loads(answer).get("choice")
    except (json.JSONDecodeError, AttributeError):
        value = None
    if value in choices:
        return value
    named = [c for c in choices if c in answer]
    if named:
        return min(named, key=answer.index)
    raise APIBackendError(backend, f"select: the answer {answer!r} names none of the choices {choices}")


def split_system(messages: list[dict]) -> tuple[str | None, list[dict]]:
    """A leading system message apart from the rest (Anthropic and Gemini take it as a separate field)."""
    if messages and messages[0]["role"] == "system":
        return text_of(messages[0]["content"]), messages[1:]
    return None, messages


def text_of(content: str | list[dict]) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


def parse_data_url(url: str) -> tuple[str, str] | None:
    """(media type, base64 data) of a data: URL; None for another URL."""
    if not url.startswith("data:") or ";base64," not in url:
        return None
    head, data = url[len("data:"):].split(";base64,", 1)
    return head or "application/octet-stream", data
