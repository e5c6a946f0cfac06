"""Errors as HTTP responses in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

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


class SchedulerDiedError(RuntimeError):
    """The scheduler process is gone: requests end with 503 until it is back."""


class APIError(HTTPException):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(status_code=status, detail=message)
        self.message, self.param, self.type, self.code = message, param, type_, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status_code, headers=self.headers)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


def error_response(exc: Exception) -> JSONResponse:
    """The API's answer to `exc`; anything unexpected is a 500 that names the exception."""
    return as_api_error(exc).response()


def as_api_error(exc: Exception) -> APIError:
    match exc:
        case APIError():
            return exc
        case InvalidRequestError():
            return bad_request(str(exc), exc.field)
        case SchedulerDiedError():
            return APIError(503, str(exc), type_="server_error")
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
