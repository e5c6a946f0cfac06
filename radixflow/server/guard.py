"""`Guard`: the outermost middleware of the server and of the router (draining, API key, body limit, JSON bodies,
a 500 in the API's shape for a bug)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from radixflow.server.errors import MAX_BODY_BYTES, APIError, error_response, unavailable

logger = logging.getLogger(__name__)


class Guard:
    """Outermost checks: draining (503 for everything once SIGTERM came), the API key (every endpoint but
    /health; a bearer token or Anthropic's x-api-key), the body limit (a declared length over it is refused before
    reading; a body sent without one is counted as it is read), bodies read as JSON whatever their Content-Type
    (every endpoint takes JSON, and `curl -d` sends form-encoded), and a 500 in the API's shape for a bug (logged
    with its traceback) instead of a dropped connection."""

    def __init__(self, app: ASGIApp, api_key: str | None, is_draining: Callable[[], bool] = lambda: False):
        self.app = app
        self.api_key = api_key
        self.is_draining = is_draining

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        path = scope["path"]
        if self.is_draining():  # SIGTERM: what runs may finish; nothing new starts
            error = unavailable("the server is shutting down; send the request to another server")
            return await error_response(error, path)(scope, receive, send)
        if self.api_key and path != "/health" and not self._authorized(headers):
            error = APIError(401, "invalid or missing API key (Authorization: Bearer ..., or x-api-key: ...)",
                             type_="authentication_error")
            return await error_response(error, path)(scope, receive, send)
        if not headers.get(b"content-type", b"").lower().startswith(b"application/json"):
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != b"content-type"]
                     + [(b"content-type", b"application/json")]}
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > MAX_BODY_BYTES:
            error = APIError(413, f"request body is {int(length)} bytes; the limit is {MAX_BODY_BYTES}")
            return await error_response(error, path)(scope, receive, send)
        started = False
        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > MAX_BODY_BYTES:  # raised inside the body read: FastAPI passes an HTTPException on
                raise APIError(413, f"request body exceeds the limit of {MAX_BODY_BYTES} bytes")
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except Exception as exc:  # noqa: BLE001 - a bug answers 500 and the server keeps serving
            logger.exception("internal error on %s %s", scope.get("method"), path)
            if started:
                raise
            await error_response(exc, path)(scope, receive, send)

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        """OpenAI clients send `Authorization: Bearer KEY`; Anthropic's SDK sends `x-api-key: KEY`."""
        bearer = headers.get(b"authorization", b"").decode("latin-1")
        return bearer == f"Bearer {self.api_key}" or headers.get(b"x-api-key", b"").decode("latin-1") == self.api_key
