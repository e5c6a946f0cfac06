"""Errors as HTTP responses: in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, and on the
Anthropic-compatible routes (`/v1/messages...`) in Anthropic's, {"type": "error", "error": {"type", "message"}}.

`error_response` is the one mapping from an exception to a response; the app's exception handlers and its
catch-all middleware both use it.
"""

from __future__ import annotations

from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from radixflow.errors import InvalidRequestError

MAX_BODY_BYTES = 8 * 2**20  # the largest request body the server reads (413 beyond)
ANTHROPIC_ROUTES = "/v1/messages"  # paths under it answer errors in Anthropic's shape

# Anthropic's error types by HTTP status (its API reference, "Errors").
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                    503: "overloaded_error", 529: "overloaded_error"}


class SchedulerDiedError(RuntimeError):
    """The scheduler process is gone: requests end with 503 until it is back."""


class KVTransferFailedError(SchedulerDiedError):
    """Disaggregated decode: the request's KV never came from its prefill server; 503, so the router retries."""


class QueueFullError(RuntimeError):
    """The server has as much queued work as it is configured to take: 503 with Retry-After."""


RETRY_AFTER_S = 1  # what a refused client is told to wait: the queue moves at every engine step


class APIError(HTTPException):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(status_code=status, detail=message, headers=headers)
        self.message, self.param, self.type, self.code = message, param, type_, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status_code, headers=self.headers)

    def anthropic_body(self) -> dict:
        kind = _ANTHROPIC_TYPES.get(self.status_code, "invalid_request_error" if self.status_code < 500
                                    else "api_error")
        return {"type": "error", "error": {"type": kind, "message": self.message}}

    def anthropic_response(self) -> JSONResponse:
        return JSONResponse(self.anthropic_body(), status_code=self.status_code, headers=self.headers)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


def unavailable(message: str) -> APIError:
    """503 with Retry-After: the server cannot take the request now (queue full, shutting down)."""
    return APIError(503, message, type_="server_error", code="unavailable",
                    headers={"Retry-After": str(RETRY_AFTER_S)})


def error_response(exc: Exception, path: str = "") -> JSONResponse:
    """The API's answer to `exc` on `path` (in Anthropic's shape under ANTHROPIC_ROUTES); anything unexpected is a
    500 that names the exception."""
    error = as_api_error(exc)
    return error.anthropic_response() if path.startswith(ANTHROPIC_ROUTES) else error.response()


def as_api_error(exc: Exception) -> APIError:
    match exc:
        case APIError():
            return exc
        case InvalidRequestError():
            return bad_request(str(exc), exc.field)
        case SchedulerDiedError():
            return APIError(503, str(exc), type_="server_error")
        case QueueFullError():
            return unavailable(str(exc))
        case RequestValidationError():
            return _validation_error(exc)
        case StarletteHTTPException(status_code=400):  # FastAPI could not read the body (e.g. not UTF-8)
            return bad_request(f"malformed JSON body: {exc.detail}")
        case StarletteHTTPException():  # routing: 404 unknown path, 405 wrong method
            return APIError(exc.status_code, str(exc.detail))
    return APIError(500, f"internal server error: {type(exc).__name__}: {exc}", type_="server_error")


def _validation_error(exc: RequestValidationError) -> APIError:
    """pydantic's first complaint, with `param` set to the field as the client spelled it."""
    first = exc.errors()[0]
    if first["type"] == "json_invalid":
        return bad_request(f"malformed JSON body: {first.get('ctx', {}).get('error', first['msg'])}")
    parts = [str(p) for p in first["loc"][1:] if not _is_union_member(p)]  # loc starts with "body"
    param = ".".join(parts) or None
    return bad_request(f"{param or 'body'}: {first['msg']}", param)


def _is_union_member(part) -> bool:
    # pydantic names the union member it tried in the location (`stop.list[str].0`); clients know only fields.
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part)
