"""radixflow: structured LLM programs (an SGLang-compatible frontend) on a RadixAttention runtime.

`import radixflow as sgl` gives the SGLang frontend API (`function`, `gen`, `select`, roles, `fork`, backends).
"""

from __future__ import annotations

from radixflow.backends import BaseBackend, EngineBackend, Runtime, RuntimeEndpoint
from radixflow.engine import Engine
from radixflow.errors import InvalidRequestError
from radixflow.lang.api import (
    assistant,
    assistant_begin,
    assistant_end,
    flush_cache,
    function,
    gen,
    gen_int,
    gen_string,
    get_server_info,
    image,
    select,
    separate_reasoning,
    set_default_backend,
    system,
    system_begin,
    system_end,
    user,
    user_begin,
    user_end,
    video,
)
from radixflow.lang.choices import (
    ChoicesDecision,
    ChoicesSamplingMethod,
    greedy_token_selection,
    token_length_normalized,
    unconditional_likelihood_normalized,
)
from radixflow.lang.function import CompiledFunction, SglFunction
from radixflow.lang.global_config import global_config
from radixflow.lang.graph import TracedProgram, TracingError
from radixflow.lang.interpreter import ProgramError
from radixflow.runtime.sampling_params import SamplingParams

# The API-model backends, imported on first use (`__getattr__`): their providers' SDKs take seconds to import.
_API_BACKENDS = ("OpenAI", "Anthropic", "VertexAI", "LiteLLM")

__all__ = [
    "Engine", "InvalidRequestError", "SamplingParams", "BaseBackend", "EngineBackend", "RuntimeEndpoint", "Runtime",
    "function", "gen", "gen_int", "gen_string", "select", "image", "video", "separate_reasoning", "system", "user",
    "assistant", "system_begin", "system_end", "user_begin", "user_end", "assistant_begin", "assistant_end",
    "set_default_backend", "flush_cache", "get_server_info", "global_config", "token_length_normalized",
    "greedy_token_selection", "unconditional_likelihood_normalized", "ChoicesSamplingMethod", "ChoicesDecision",
    "TracingError", "TracedProgram", "CompiledFunction", "SglFunction", "ProgramError", *_API_BACKENDS,
]
__version__ = "0.1.0"


def __getattr__(name: str):
    match name:
        case "OpenAI":
            from radixflow.backends.api.openai import OpenAI
            return OpenAI
        case "Anthropic":
            from radixflow.backends.api.anthropic import Anthropic
            return Anthropic
        case "VertexAI":
            from radixflow.backends.api.vertexai import VertexAI
            return VertexAI
        case "LiteLLM":
            from radixflow.backends.api.litellm import LiteLLM
            return LiteLLM
    raise AttributeError(f"module 'radixflow' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API_BACKENDS])
