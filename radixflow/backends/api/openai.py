"""`sgl.OpenAI`: OpenAI's API, or any OpenAI-compatible endpoint (radixflow's own server, SGLang, vLLM, ...), through
the official `openai` SDK, in chat or completion mode."""

from __future__ import annotations

import warnings

import openai

from radixflow.backends.api.base import APIBackend, APIBackendError, Reply, Request, sdk_error
from radixflow.lang.chat_template import get_chat_template
from radixflow.lang.choices import token_length_normalized

INSTRUCT_MODEL_NAMES = ("gpt-3.5-turbo-instruct", "davinci-002", "babbage-002")  # completion-only (SGLang's list+)


class OpenAI(APIBackend):
    """SGLang's `OpenAI(model_name, is_chat_model=None, chat_template=None, is_azure=False, *args, **kwargs)`: the
    remaining arguments go to `openai.OpenAI` (`base_url`, `api_key`, `timeout`, `max_retries`, ...).

    A chat model (the default, except the instruct models) is asked with the conversation; a completion model with
    the program's text, and `select` then scores each choice by its token logprobs (`echo`, as radixflow's and
    SGLang's servers give them). `sglang_extensions=True` is for servers that take SGLang's extra fields
    (radixflow, SGLang): `regex` / `ebnf` constraints (and `dtype=`), `top_k` / `min_p`, and continuing a partial
    assistant message (`continue_final_message`).
    """

    def __init__(self, model_name: str, is_chat_model: bool | None = None, chat_template=None,
                 is_azure: bool = False, *args, sglang_extensions: bool = False, **kwargs):
        chat = model_name not in INSTRUCT_MODEL_NAMES if is_chat_model is None else is_chat_model
        super().__init__(model_name, chat_template or get_chat_template("chatgpt" if chat else "default"))
        self.client = (openai.AzureOpenAI if is_azure else openai.OpenAI)(*args, **kwargs)
        self.is_chat_model = chat
        self.sglang_extensions = sglang_extensions
        if sglang_extensions:
            self.constraints = ("json_schema", "regex", "ebnf")

    # -- calls ---------------------------------------------------------------------------------------------------
    def _call(self, prompt, request: Request) -> Reply:
        kwargs = self._kwargs(prompt, request)
        if self.is_chat_model:
            response = self._guarded(self.client.chat.completions.create, **kwargs)
            texts = [c.message.content or "" for c in response.choices]
            tokens = ([[(t.logprob, t.token) for t in (c.logprobs.content or [])] for c in response.choices]
                      if request.logprobs else None)
        else:
            response = self._guarded(self.client.completions.create, **kwargs)
            texts = [c.text for c in response.choices]
            tokens = ([list(zip(c.logprobs.token_logprobs, c.logprobs.tokens)) if c.logprobs else [] for c in
                       response.choices] if request.logprobs else None)
        return Reply(texts, [finish_of(c.finish_reason) for c in response.choices], *usage_of(response.usage), tokens)

    def _stream(self, prompt, request: Request):
        kwargs = {**self._kwargs(prompt, request), "stream": True, "stream_options": {"include_usage": True}}
        create = self.client.chat.completions.create if self.is_chat_model else self.client.completions.create
        text, finish, usage = "", None, (0, 0, 0)
        try:
            for chunk in create(**kwargs):
                if chunk.usage is not None:
                    usage = usage_of(chunk.usage)
                for choice in chunk.choices:
                    piece = (choice.delta.content if self.is_chat_model else choice.text) or ""
                    text += piece
                    finish = choice.finish_reason or finish
                    if piece:
                        yield piece
        except openai.APIError as exc:
            raise sdk_error(str(self), exc) from exc
        yield Reply([text], [finish_of(finish)], *usage)

    def _kwargs(self, prompt, request: Request) -> dict:
        kwargs = {"model": self.model_name, **sampling_kwargs(request)}
        extra = {}
        if self.sglang_extensions:
            extra = {k: v for k, v in (("regex", request.regex), ("ebnf", request.ebnf)) if v is not None}
            extra |= {k: v for k, v in (("top_k", request.top_k), ("min_p", request.min_p)) if v not in (-1, 0.0)}
        if self.is_chat_model:
            messages = list(prompt)
            if messages and messages[-1]["role"] == "assistant":  # a partial assistant turn (the interpreter's)
                if self.sglang_extensions:
                    extra["continue_final_message"] = True
                else:
                    warnings.warn(f"{self}: a chat API cannot continue a partial assistant message; it is left out "
                                  "(as SGLang does). Put gen right after sgl.assistant(, use "
                                  "@function(num_api_spec_tokens=...), or sglang_extensions=True on a server that "
                                  "continues messages", RuntimeWarning, stacklevel=2)
                    messages.pop()
            kwargs |= {"messages": messages, "max_completion_tokens": request.max_tokens}
            if request.logprobs:
                kwargs["logprobs"] = True
        else:
            kwargs |= {"prompt": prompt, "max_tokens": request.max_tokens}
            if request.logprobs:
                kwargs["logprobs"] = 0
        if extra:
            kwargs["extra_body"] = extra
        return kwargs

    def _guarded(self, create, **kwargs):
        try:
            return create(**kwargs)
        except openai.APIError as exc:  # refusals, and failures after the SDK's retries
            raise sdk_error(str(self), exc) from exc

    # -- select on a completion model ----------------------------------------------------------------------------
    def select(self, prompt, choices, temperature, method=None):
        if self.is_chat_model:
            return super().select(prompt, choices, temperature, method)
        method = method or token_length_normalized
        inputs = [[e for e in _tail(entries, len(prompt)) if e[0] is not None]
                  for entries in self._echo([prompt + c for c in choices])]
        normalized = [sum(lp for lp, *_ in e) / len(e) if e else 0.0 for e in inputs]
        unconditional = None
        if method.requires_unconditional_logprobs:
            # The same token texts scored with no context (a first token has none: its logprob is None).
            present = ["".join(text for *_, text in entries) for entries in inputs if entries]
            scored = iter(self._echo(present) if present else ())
            unconditional = [next(scored) if entries else [] for entries in inputs]
        return method(choices=list(choices), normalized_prompt_logprobs=normalized, input_token_logprobs=inputs,
                      output_token_logprobs=[[] for _ in choices], unconditional_token_logprobs=unconditional)

    def _echo(self, prompts: list[str]) -> list[list[tuple]]:
        """Each prompt's token logprobs, (logprob, None, token text), by an echo call that generates nothing."""
        response = self._guarded(self.client.completions.create, model=self.model_name, prompt=prompts,
                                 max_tokens=0, echo=True, logprobs=0, temperature=0)
        self._count(Reply([c.text for c in response.choices], [], *usage_of(response.usage)))
        ordered = sorted(response.choices, key=lambda c: c.index)
        if any(c.logprobs is None or not c.logprobs.token_logprobs for c in ordered):
            raise APIBackendError(str(self), "select on a completion model needs the prompt's token logprobs "
                                  "(echo=True, logprobs=0), and this endpoint returned none")
        return [[(lp, None, t) for lp, t in zip(c.logprobs.token_logprobs, c.logprobs.tokens)] for c in ordered]


def _tail(entries: list[tuple], prefix_chars: int) -> list[tuple]:
    """The entries of the tokens that end after the prefix: the choice's own, and a token that merges the end of
    the prefix with the start of the choice (the paper's token boundary, healed by scoring it with the choice)."""
    out, end = [], 0
    for entry in entries:
        end += len(entry[2])
        if end > prefix_chars:
            out.append(entry)
    return out


def sampling_kwargs(request: Request) -> dict:
    """A request's sampling fields in OpenAI's names (OpenAI's API and LiteLLM's)."""
    kwargs = {"temperature": request.temperature, "top_p": request.top_p, "n": request.n}
    if request.stop:
        kwargs["stop"] = request.stop
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(request, name):
            kwargs[name] = getattr(request, name)
    if request.json_schema is not None:
        kwargs["response_format"] = {"type": "json_schema",
                                     "json_schema": {"name": "output", "schema": request.json_schema}}
    return kwargs


def finish_of(reason: str | None) -> dict:
    """An OpenAI-shaped finish reason as the runtime's (OpenAI's API and LiteLLM's)."""
    return {"type": "length" if reason == "length" else "stop", "matched": None}


def usage_of(usage) -> tuple[int, int, int]:
    """(prompt, completion, cached) tokens of an OpenAI-shaped usage object."""
    if usage is None:
        return 0, 0, 0
    details = getattr(usage, "prompt_tokens_details", None)
    return usage.prompt_tokens, usage.completion_tokens, (getattr(details, "cached_tokens", 0) or 0)

