from radixflow.backends.base import BaseBackend
from radixflow.backends.engine_backend import EngineBackend
from radixflow.backends.runtime_endpoint import RuntimeEndpoint

__all__ = ["BaseBackend", "EngineBackend", "RuntimeEndpoint"]
