"""What one request may ask of this engine: its context and its KV pool bound every request."""

from __future__ import annotations

from dataclasses import dataclass

from radixflow.errors import InvalidRequestError


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
