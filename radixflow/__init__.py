"""radixflow: structured LLM programs (an SGLang-compatible frontend) on a RadixAttention runtime."""

from radixflow.engine import Engine
from radixflow.runtime.sampling_params import InvalidRequestError, SamplingParams

__all__ = ["Engine", "InvalidRequestError", "SamplingParams"]
__version__ = "0.1.0"
