"""API errors in OpenAI's shape, and the FastAPI handlers that render every failure that way."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    431: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class APIError(Exception):
    """A failure to report to the client as ``{"error": {...}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body OpenAI clients parse."""
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}

    def render(self) -> bytes:
        """The body as JSON bytes; ASCII-escaped, so no text can make rendering fail."""
        return json.dumps(self.body(), ensure_ascii=True).encode("ascii")

    def response(self) -> Response:
        return Response(self.render(), status_code=self.status, headers=self.headers,
                        media_type="application/json")


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's 422 becomes OpenAI's 400, naming the first offending field."""
    errors = exc.errors()
    if not errors:
        return bad_request("invalid request body")
    # A field that is a union (prompt: text, texts, ids, lists of ids) fails once per member;
    # a value error from our own validators (invalid Unicode, too many stop strings) is the
    # one that says what is wrong.
    first = next((e for e in errors if e.get("type") == "value_error"), errors[0])
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _union_tag(p)]
    param = ".".join(loc) or None
    msg = str(first.get("msg", "invalid value"))
    if first.get("type") == "json_invalid":
        return bad_request(f"request body is not valid JSON: {msg}", code="invalid_json")
    where = f"{param}: " if param else ""
    extra = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return bad_request(f"{where}{msg}{extra}", param=param, code="invalid_value")


def _union_tag(part: object) -> bool:
    """Pydantic names the union member in an error's location ('str', 'list[int]', ...)."""
    return isinstance(part, str) and (part in _TAGS or "[" in part or "(" in part)


_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def install_error_handlers(app: FastAPI) -> None:
    """Route APIError, validation errors, HTTP errors and unexpected errors to the shape."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> Response:
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Response:
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> Response:
        logger.exception("unhandled error")
        return APIError(500, f"internal error: {type(exc).__name__}").response()
