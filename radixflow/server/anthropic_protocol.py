"""Request bodies of the Anthropic-compatible endpoints (`/v1/messages`, `/v1/messages/count_tokens`), as pydantic
models in the Messages API's field names. Unknown fields are ignored (as Anthropic's SDK may send newer ones).
Imports nothing of radixflow's."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from radixflow.server.protocol import DisaggregationFields


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class AnthropicMessage(_Body):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]] = Field(
        description="text, or a list of content blocks (`text`; `image` blocks are refused by a text-only model)")


class AnthropicTool(_Body):
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    input_schema: dict[str, Any]


class CountTokensBody(_Body):
    """`POST /v1/messages/count_tokens`."""

    model: str
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[AnthropicTool] | None = None


class MessagesBody(CountTokensBody, DisaggregationFields):
    """`POST /v1/messages`. A final `assistant` message is a prefill: the answer continues it."""

    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    # Sampling fields of the Messages API (newer SDKs send them through `extra_body`).
    temperature: float = Field(default=1.0, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=1)
    output_config: dict[str, Any] | None = Field(
        default=None, description='`{"format": {"type": "json_schema", "schema": {...}}}`: the answer is JSON valid '
                                  "under the schema, by construction (structured outputs)")
    stream: bool = False
    metadata: dict[str, Any] | None = None
    timeout: float | None = Field(default=None, gt=0, description="seconds: not finished by then, the request ends")
    tool_choice: dict[str, Any] | None = Field(
        default=None, description='`{"type": "tool", "name": ...}` (or `{"type": "any"}` with one tool): the answer '
                                  "is a call of that tool whose input is valid by construction; `none` ignores "
                                  "the tools")
