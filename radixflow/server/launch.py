"""Start the server: the scheduler process, then the HTTP app on uvicorn. `radixflow serve` calls `serve`."""

from __future__ import annotations

import logging

from radixflow.runtime.config import EngineConfig, ServerConfig

logger = logging.getLogger(__name__)


def serve(engine_config: EngineConfig, server_config: ServerConfig) -> None:
    import uvicorn

    from radixflow.server.http_app import ServerState, create_app
    from radixflow.server.tokenizer_manager import TokenizerManager

    manager = TokenizerManager(engine_config, server_config.log_level)
    name = server_config.served_model_name or manager.source.path.stem if manager.source.kind == "gguf" \
        else server_config.served_model_name or manager.source.path.name
    state = ServerState(manager, name, server_config.api_key)
    app = create_app(state)
    print(f"[radixflow] serving {name!r} on http://{server_config.host}:{server_config.port} "
          f"(context {manager.limits.max_context}, KV pool {manager.limits.pool_size} tokens)", flush=True)
    uvicorn.run(app, host=server_config.host, port=server_config.port, log_level=server_config.log_level.lower(),
                timeout_graceful_shutdown=5)
