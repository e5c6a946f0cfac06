"""Frontend backends: the interface (`base`), an in-process engine, a radixflow (or SGLang) server over HTTP, and a
server launched for the program (`Runtime`)."""

from radixflow.backends.base import BaseBackend
from radixflow.backends.engine_backend import EngineBackend
from radixflow.backends.runtime import Runtime
from radixflow.backends.runtime_endpoint import RuntimeEndpoint

__all__ = ["BaseBackend", "EngineBackend", "Runtime", "RuntimeEndpoint"]
