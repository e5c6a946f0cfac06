"""`sgl.LiteLLM`: any provider LiteLLM routes to (an optional extra: `pip install 'radixflow[litellm]'`)."""

from __future__ import annotations

import os

import openai

from radixflow.backends.api.base import APIBackend, Reply, Request, sdk_error
from radixflow.backends.api.openai import finish_of, sampling_kwargs, usage_of
from radixflow.lang.chat_template import get_chat_template

# LiteLLM fetches its model price map from GitHub at import unless told to use the copy it ships; offline, that
# costs seconds of retries.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
try:
    import litellm
except ImportError as exc:  # an optional extra: say how to get it where the backend is asked for
    raise ImportError("sgl.LiteLLM needs the litellm package: pip install 'radixflow[litellm]'") from exc


class LiteLLM(APIBackend):
    """SGLang's `LiteLLM(model_name, chat_template=None, api_key=None, organization=None, base_url=None,
    timeout=600, max_retries=..., default_headers=None)`: `model_name` in LiteLLM's `provider/model` form; calls go
    through `litellm.completion`, which retries 429 / 5xx and timeouts up to `max_retries` times. Chat models only."""

    def __init__(self, model_name: str, chat_template=None, api_key: str | None = None,
                 organization: str | None = None, base_url: str | None = None, timeout: float | None = 600,
                 max_retries: int = 2, default_headers: dict | None = None):
        super().__init__(model_name, chat_template or get_chat_template("chatgpt"))
        # Retried: rate limits, timeouts, 5xx; not requests the provider refused (LiteLLM's own default retries
        # every error, a 400 included).
        retries = litellm.RetryPolicy(TimeoutErrorRetries=max_retries, RateLimitErrorRetries=max_retries,
                                      InternalServerErrorRetries=max_retries,
                                      ServiceUnavailableErrorRetries=max_retries, BadRequestErrorRetries=0,
                                      AuthenticationErrorRetries=0, ContentPolicyViolationErrorRetries=0,
                                      NotFoundErrorRetries=0, DefaultRetries=0)
        self.client_params = {k: v for k, v in (("api_key", api_key), ("organization", organization),
                                                ("base_url", base_url), ("timeout", timeout),
                                                ("retry_policy", retries), ("extra_headers", default_headers))
                              if v is not None}

    def _call(self, prompt, request: Request) -> Reply:
        response = self._guarded(**self._kwargs(prompt, request))
        texts = [c.message.content or "" for c in response.choices]
        return Reply(texts, [finish_of(c.finish_reason) for c in response.choices], *usage_of(response.usage))

    def _stream(self, prompt, request: Request):
        text, finish, usage = "", None, (0, 0, 0)
        try:
            for chunk in litellm.completion(**self._kwargs(prompt, request), stream=True,
                                            stream_options={"include_usage": True}):
                if getattr(chunk, "usage", None) is not None:
                    usage = usage_of(chunk.usage)
                for choice in chunk.choices:
                    piece = choice.delta.content or ""
                    finish = choice.finish_reason or finish
                    text += piece
                    if piece:
                        yield piece
        except openai.APIError as exc:  # LiteLLM's exceptions are the openai SDK's
            raise sdk_error(str(self), exc) from exc
        yield Reply([text], [finish_of(finish)], *usage)

    def _kwargs(self, prompt, request: Request) -> dict:
        return {"model": self.model_name, "messages": list(prompt), "max_tokens": request.max_tokens,
                **sampling_kwargs(request), **self.client_params}

    def _guarded(self, **kwargs):
        try:
            return litellm.completion(**kwargs)
        except openai.APIError as exc:  # LiteLLM's exceptions are the openai SDK's
            raise sdk_error(str(self), exc) from exc

