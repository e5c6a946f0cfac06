"""`sgl.Anthropic`: Anthropic's Messages API (or radixflow's own `/v1/messages`) through the official `anthropic`
SDK."""

from __future__ import annotations

import anthropic

from radixflow.backends.api.base import APIBackend, Reply, Request, parse_data_url, sdk_error, split_system
from radixflow.lang.chat_template import get_chat_template


class Anthropic(APIBackend):
    """SGLang's `Anthropic(model_name, *args, **kwargs)`: the remaining arguments go to `anthropic.Anthropic`
    (`api_key`, `base_url`, `timeout`, `max_retries`, ...). A partial assistant turn is sent as a prefill, which
    the model continues; `json_schema` becomes a structured-output format (`output_config.format`); sampling
    fields the SDK no longer lists (temperature, top_p, top_k) go in the request body, only when not the API's
    defaults."""

    def __init__(self, model_name: str, *args, **kwargs):
        super().__init__(model_name, get_chat_template("claude"))
        self.client = anthropic.Anthropic(*args, **kwargs)

    def _call(self, prompt, request: Request) -> Reply:
        kwargs, lost = self._kwargs(prompt, request)
        replies = [self._reply(self._guarded(self.client.messages.create, **kwargs), lost)
                   for _ in range(request.n)]  # the API has no n: one call per sample
        return Reply([r.texts[0] for r in replies], [r.finish_reasons[0] for r in replies],
                     sum(r.prompt_tokens for r in replies), sum(r.completion_tokens for r in replies),
                     sum(r.cached_tokens for r in replies), calls=len(replies))

    def _stream(self, prompt, request: Request):
        kwargs, lost = self._kwargs(prompt, request)
        first = True
        try:
            with self.client.messages.stream(**kwargs) as stream:
                for piece in stream.text_stream:
                    if first and lost and piece.startswith(lost):  # the prefill's lost whitespace, repeated
                        piece = piece[len(lost):]
                    first = False
                    if piece:
                        yield piece
                message = stream.get_final_message()
        except anthropic.APIError as exc:
            raise sdk_error(str(self), exc) from exc
        yield self._reply(message, lost)

    def _kwargs(self, prompt, request: Request) -> tuple[dict, str]:
        """The call's arguments, and the whitespace cut from the end of a prefill (Anthropic refuses a prefill
        that ends in whitespace): the answer usually starts with it, and then loses it."""
        system, messages = split_system(list(prompt))
        converted = [{"role": m["role"], "content": _content(m["content"])} for m in messages]
        lost = ""
        if converted and converted[-1]["role"] == "assistant" and isinstance(converted[-1]["content"], str):
            prefill = converted[-1]["content"]
            converted[-1]["content"], lost = prefill.rstrip(), prefill[len(prefill.rstrip()):]
        kwargs = {"model": self.model_name, "max_tokens": request.max_tokens, "messages": converted}
        if system:
            kwargs["system"] = system
        if request.stop:
            kwargs["stop_sequences"] = request.stop
        if request.json_schema is not None:
            kwargs["output_config"] = {"format": {"type": "json_schema", "schema": request.json_schema}}
        extra = {k: v for k, v, default in (("temperature", request.temperature, 1.0), ("top_p", request.top_p, 1.0),
                                             ("top_k", request.top_k, -1)) if v != default}
        if extra:
            kwargs["extra_body"] = extra
        return kwargs, lost

    def _reply(self, message, lost: str) -> Reply:
        text = "".join(block.text for block in message.content if block.type == "text")
        if lost and text.startswith(lost):
            text = text[len(lost):]
        usage = message.usage
        cached = usage.cache_read_input_tokens or 0
        prompt_tokens = usage.input_tokens + cached + (usage.cache_creation_input_tokens or 0)
        reason = message.stop_reason
        finish = {"type": "length" if reason == "max_tokens" else "stop",
                  "matched": message.stop_sequence if reason == "stop_sequence" else None}
        return Reply([text], [finish], prompt_tokens, usage.output_tokens, cached)

    def _guarded(self, create, **kwargs):
        try:
            return create(**kwargs)
        except anthropic.APIError as exc:  # refusals, and failures after the SDK's retries
            raise sdk_error(str(self), exc) from exc


def _content(content: str | list[dict]) -> str | list[dict]:
    """OpenAI-style content parts as Anthropic's blocks: text, and images as base64 or URL sources."""
    if isinstance(content, str):
        return content
    blocks = []
    for part in content:
        if part.get("type") == "image_url":
            url = part["image_url"]["url"]
            data = parse_data_url(url)
            source = ({"type": "base64", "media_type": data[0], "data": data[1]} if data
                      else {"type": "url", "url": url})
            blocks.append({"type": "image", "source": source})
        else:
            blocks.append({"type": "text", "text": part.get("text", "")})
    return blocks

