"""Request bodies of the OpenAI-compatible endpoints, as pydantic models (FastAPI validates them; `/openapi.json`
documents them). Unknown fields are ignored, as OpenAI's own server does for forward compatibility. Imports
nothing of radixflow's."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from radixflow.server.protocol import SESSION_ID_HELP, DisaggregationFields


class SamplingBody(DisaggregationFields):
    """The fields `/v1/completions` and `/v1/chat/completions` share."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    seed: int | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    # Extensions SGLang also accepts.
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    timeout: float | None = Field(default=None, gt=0, description="seconds: not finished by then, the request ends "
                                                                  "(finish_reason abort)")
    priority: int | None = Field(default=None, ge=-(2**31 - 1), le=2**31 - 1,
                                 description="with priority scheduling, lower values are served first (vLLM's field)")
    session_id: str | None = Field(default=None, min_length=1, max_length=256, description=SESSION_ID_HELP)
    # Structured output: OpenAI's response_format, plus SGLang's regex / ebnf extensions.
    response_format: dict | None = None
    regex: str | None = None
    ebnf: str | None = None


class CompletionBody(SamplingBody):
    """`POST /v1/completions`."""

    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = Field(
        default=None, description='an assistant\'s calls: [{"id", "type": "function", "function": {"name", '
                                  '"arguments": a JSON string}}]')
    tool_call_id: str | None = Field(default=None, description="a tool message: the id of the call it answers")
    name: str | None = None


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(pattern=r"^[A-Za-z0-9_\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(default=None, description="a JSON schema of type object")


class ChatTool(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"] = "function"
    function: FunctionDefinition


class ChatBody(SamplingBody):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = Field(
        default=None, description='"auto" (the default with tools), "none", "required", or {"type": "function", '
                                  '"function": {"name": ...}}; required and named calls are valid by construction')
    parallel_tool_calls: bool = True
    # SGLang's and vLLM's extension: the last (assistant) message is continued, not answered in a new turn.
    continue_final_message: bool = False
