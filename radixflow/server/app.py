"""The HTTP server: the FastAPI app (native routes, OpenAI routes, one error mapping) and `serve`, which starts
the scheduler process and then the app on uvicorn (`radixflow serve`)."""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from radixflow.errors import InvalidRequestError
from radixflow.runtime.config import EngineConfig, ServerConfig
from radixflow.server.anthropic_api import add_anthropic_routes
from radixflow.server.chat_tools import check_parsers
from radixflow.server.common import ServerState
from radixflow.server.errors import QueueFullError, SchedulerDiedError, error_response
from radixflow.server.guard import Guard
from radixflow.server.native_api import add_native_routes, add_operations_routes
from radixflow.server.openai_api import add_openai_routes
from radixflow.server.tokenizer_manager import TokenizerManager

logger = logging.getLogger(__name__)

VERSION = "0.1.0"

# How long an idle keep-alive connection stays open. Longer than HTTP clients keep idle pooled connections (httpx,
# the router's client included: 5 s): at uvicorn's default, also 5 s, the server could close a connection just as a
# client reused it, and that request failed with a ReadError (1 in 1,000 in the soak).
KEEP_ALIVE_S = 75


def create_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await state.manager.start()
        yield
        await state.manager.close()

    # Every body is JSON whatever its Content-Type says (the Guard sees to it). The body limit is the Guard's, not
    # FastAPI's `max_body_size`: that one answers a declared length over the limit in plain text.
    app = FastAPI(title="radixflow", version=VERSION, lifespan=lifespan, strict_content_type=False)
    app.state.server = state
    # Starlette's HTTPException covers routing errors, FastAPI's body errors and APIError; anything else unexpected
    # is the Guard's.
    for exc_type in (HTTPException, RequestValidationError, InvalidRequestError, SchedulerDiedError, QueueFullError):
        app.add_exception_handler(exc_type, _handle)
    app.add_middleware(Guard, api_key=state.config.api_key, is_draining=lambda: state.draining_since is not None)
    add_operations_routes(app, state)
    add_native_routes(app, state)
    add_openai_routes(app, state)
    add_anthropic_routes(app, state)
    return app


async def _handle(request: Request, exc: Exception):
    return error_response(exc, request.url.path)


def serve(engine_config: EngineConfig, server_config: ServerConfig) -> None:
    check_parsers(server_config.tool_call_parser, server_config.reasoning_parser)  # before loading the model
    manager = TokenizerManager(engine_config, server_config.log_level,
                               max_restarts=server_config.max_scheduler_restarts)
    name = server_config.served_model_name or (
        manager.source.path.stem if manager.source.kind == "gguf" else manager.source.path.name)
    state = ServerState(manager, name, server_config)
    print(f"[radixflow] serving {name!r} on http://{server_config.host}:{server_config.port} "
          f"(context {manager.limits.max_context}, KV pool {manager.limits.pool_size} tokens)", flush=True)
    config = uvicorn.Config(create_app(state), host=server_config.host, port=server_config.port,
                            log_level=server_config.log_level.lower(), timeout_graceful_shutdown=5,
                            timeout_keep_alive=KEEP_ALIVE_S)
    DrainingServer(config, state).run()


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain on SIGTERM (or SIGINT): new requests get 503 at once (the Guard), running
    requests go on until they end or `--graceful-shutdown-timeout` passes, then the rest are aborted with a reason
    and the server stops as uvicorn does. A second signal stops it at once."""

    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.state = state
        self._signal: int | None = None

    def handle_exit(self, sig: int, frame) -> None:
        if self._signal is None:
            self._signal = sig
            self.state.draining_since = time.monotonic()
            self.state.manager.stopping = True  # a scheduler that dies now stays down
            logger.info("draining: %d requests in flight", self.state.manager.in_flight)
        else:
            super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        since = self.state.draining_since
        if since is not None and not self.should_exit:
            in_flight = self.state.manager.in_flight
            if in_flight and time.monotonic() - since > self.state.config.graceful_shutdown_timeout:
                self.state.manager.abort_all(f"the server shut down: the request did not finish within the "
                                             f"{self.state.config.graceful_shutdown_timeout:g} s grace period")
                in_flight = 0
            if not in_flight:
                super().handle_exit(self._signal, None)
        return await super().on_tick(counter)
