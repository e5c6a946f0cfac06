"""`sgl.VertexAI`: Gemini models, on Vertex AI or the Gemini Developer API, through Google's `google-genai` SDK."""

from __future__ import annotations

import base64
import os

from google import genai
from google.genai import errors, types

from radixflow.backends.api.base import APIBackend, APIBackendError, Reply, Request, parse_data_url, split_system
from radixflow.lang.chat_template import get_chat_template

RETRIED_STATUSES = (408, 429, 500, 502, 503, 504)


class VertexAI(APIBackend):
    """SGLang's `VertexAI(model_name, safety_settings=None)`. As in SGLang, Vertex AI's project and location come from
    `GCP_PROJECT_ID` / `GCP_LOCATION`; with `api_key=` (or `GOOGLE_API_KEY` / `GEMINI_API_KEY` set, and no
    `GCP_PROJECT_ID`) it uses the Gemini Developer API instead. `max_retries` (with exponential backoff on 408 / 429
    / 5xx), `timeout` (seconds) and `http_options` (e.g. a `base_url`) configure the client; `client_kwargs` go to
    `genai.Client`. A system message becomes the system instruction, `assistant` the `model` role, `json_schema` a
    JSON response schema; image parts go inline (data: URLs) or by URI."""

    def __init__(self, model_name: str, safety_settings=None, *, api_key: str | None = None,
                 max_retries: int = 2, timeout: float | None = None, http_options: dict | None = None,
                 **client_kwargs):
        super().__init__(model_name, get_chat_template("chatgpt"))
        self.safety_settings = safety_settings
        project = os.environ.get("GCP_PROJECT_ID")
        if api_key is None and project and "vertexai" not in client_kwargs:
            client_kwargs |= {"vertexai": True, "project": project, "location": os.environ.get("GCP_LOCATION")}
        retry = types.HttpRetryOptions(attempts=max_retries + 1, http_status_codes=list(RETRIED_STATUSES))
        options = {"retry_options": retry, **({"timeout": int(timeout * 1000)} if timeout else {}),
                   **(http_options or {})}
        self.client = genai.Client(api_key=api_key, http_options=types.HttpOptions(**options), **client_kwargs)

    def _call(self, prompt, request: Request) -> Reply:
        try:
            response = self.client.models.generate_content(**self._kwargs(prompt, request))
        except errors.APIError as exc:
            raise APIBackendError(str(self), exc.message or str(exc), exc.code) from exc
        candidates = response.candidates or []
        if not candidates:  # a blocked prompt has no candidates, only feedback saying why
            raise APIBackendError(str(self), f"no answer: {response.prompt_feedback}")
        texts = [_text(c) for c in candidates]
        return Reply(texts, [_finish(c.finish_reason) for c in candidates], *_usage(response.usage_metadata))

    def _stream(self, prompt, request: Request):
        text, finish, usage = "", None, (0, 0, 0)
        try:
            for chunk in self.client.models.generate_content_stream(**self._kwargs(prompt, request)):
                if chunk.usage_metadata is not None:
                    usage = _usage(chunk.usage_metadata)
                for candidate in chunk.candidates or []:
                    piece = _text(candidate)
                    finish = candidate.finish_reason or finish
                    text += piece
                    if piece:
                        yield piece
        except errors.APIError as exc:
            raise APIBackendError(str(self), exc.message or str(exc), exc.code) from exc
        yield Reply([text], [_finish(finish)], *usage)

    def _kwargs(self, prompt, request: Request) -> dict:
        system, messages = split_system(list(prompt))
        contents = [types.Content(role="model" if m["role"] == "assistant" else "user", parts=_parts(m["content"]))
                    for m in messages]
        config = {"max_output_tokens": request.max_tokens, "temperature": request.temperature,
                  "top_p": request.top_p, "candidate_count": request.n}
        if request.top_k > 0:
            config["top_k"] = request.top_k
        if request.stop:
            config["stop_sequences"] = request.stop
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(request, name):
                config[name] = getattr(request, name)
        if system:
            config["system_instruction"] = system
        if request.json_schema is not None:
            config |= {"response_mime_type": "application/json", "response_json_schema": request.json_schema}
        if self.safety_settings is not None:
            config["safety_settings"] = self.safety_settings
        return {"model": self.model_name, "contents": contents, "config": types.GenerateContentConfig(**config)}


def _parts(content: str | list[dict]) -> list[types.Part]:
    if isinstance(content, str):
        return [types.Part(text=content)]
    parts = []
    for part in content:
        if part.get("type") == "image_url":
            url = part["image_url"]["url"]
            data = parse_data_url(url)
            parts.append(types.Part(inline_data=types.Blob(mime_type=data[0], data=base64.b64decode(data[1]))) if data
                         else types.Part(file_data=types.FileData(file_uri=url, mime_type="image/*")))
        else:
            parts.append(types.Part(text=part.get("text", "")))
    return parts


def _text(candidate) -> str:
    content = candidate.content
    return "".join(p.text or "" for p in (content.parts or []) if not p.thought) if content else ""


def _finish(reason) -> dict:
    return {"type": "length" if reason == types.FinishReason.MAX_TOKENS else "stop", "matched": None}


def _usage(usage) -> tuple[int, int, int]:
    if usage is None:
        return 0, 0, 0
    return usage.prompt_token_count or 0, usage.candidates_token_count or 0, usage.cached_content_token_count or 0
