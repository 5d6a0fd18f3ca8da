"""Errors of the OpenAI-compatible routes, in OpenAI's shape:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "n", "code": null}}

Design decisions:
- One answer per request, its first (most telling) problem, as OpenAI and vLLM give: a client
  shows `message`, so it names the field and the fix. Schema errors prefer what is wrong with a
  value (out of range, too short) over "not of type X" (one per member of a union such as
  `prompt`), and an unknown field says it is not implemented rather than "extra inputs".
- Status codes follow the service's mapping (../errors.py) with 400 where it answers 422 (bad
  values, as OpenAI and vLLM answer them): 401 bad token, 404 unknown model, 503 queue full
  (with Retry-After), 504 timeout, 500 anything else.
- The service's exception handlers stay as they are for its own routes: `dispatching` wraps each
  so that a request to one of these routes gets this shape, any other the service's own.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..errors import HTTPError
from ..worker import QueueFull

_TYPES = {401: "authentication_error", 404: "not_found_error", 503: "server_overloaded"}
_FIELD = re.compile(r"[a-z_][a-z0-9_]*")  # a field name; pydantic's union tags are not
_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none"}
UNSUPPORTED = "this server does not implement it; see the README's OpenAI section for the fields"


class OpenAIError(Exception):
    """An answer a route decided on: status, message, and the request field it is about."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_json(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status, headers=headers)


def error_body(exc: BaseException) -> tuple[int, str, dict[str, str] | None]:
    """(status, message, headers) for an exception a route, the worker or the engine raised."""
    if isinstance(exc, HTTPError):
        return exc.status, exc.detail, exc.headers
    if isinstance(exc, HTTPException):
        return exc.status_code, str(exc.detail), exc.headers
    if isinstance(exc, QueueFull):
        return 503, str(exc), {"Retry-After": str(math.ceil(exc.retry_after))}
    if isinstance(exc, (ValueError, TypeError)):
        # the engine names its own arguments; this API calls max_new_tokens max_tokens
        return 400, str(exc).replace("max_new_tokens", "max_tokens"), None
    if isinstance(exc, TimeoutError):
        return 504, str(exc), None
    if isinstance(exc, ConnectionAbortedError):
        return 499, str(exc), None
    return 500, f"{type(exc).__name__}: {exc}", None


def openai_response(exc: BaseException) -> JSONResponse:
    if isinstance(exc, OpenAIError):
        return error_json(exc.status, exc.message, exc.param, exc.code)
    if isinstance(exc, RequestValidationError):
        return validation_error(exc)
    status, message, headers = error_body(exc)
    return error_json(status, message, headers=headers)


def validation_error(exc: RequestValidationError) -> JSONResponse:
    """400 naming the first field that is wrong, and how."""
    errors = [dict(e) for e in exc.errors()]
    if not errors:
        return error_json(400, "the request body is invalid")
    telling = [e for e in errors if not str(e.get("type", "")).endswith("_type")] or errors
    first = telling[0]
    param = _param(first.get("loc", ()))
    kind = first.get("type")
    msg = str(first.get("msg", "")).removeprefix("Value error, ")
    if kind == "extra_forbidden":
        return error_json(400, f"{param}: unsupported field: {UNSUPPORTED}", param, "unsupported")
    if kind == "json_invalid":
        return error_json(400, f"the body is not valid JSON: {msg}")
    more = len({_param(e.get("loc", ())) for e in errors} - {param})
    tail = f" (and {more} more fields)" if more else ""
    return error_json(400, f"{param or 'body'}: {msg}{tail}", param)


def _param(loc: tuple[Any, ...] | list[Any]) -> str:
    """('body', 'messages', 0, 'role') -> 'messages.0.role', union member tags dropped."""
    parts = [
        str(p)
        for p in list(loc)[1:]
        if isinstance(p, int) or (_FIELD.fullmatch(str(p)) and str(p) not in _TYPE_NAMES)
    ]
    return ".".join(parts)


def dispatching(paths: set[str], handler: Callable[..., Any]) -> Callable[..., Any]:
    """An exception handler answering in OpenAI's shape on `paths`, else as `handler` does."""

    async def handle(request: Request, exc: Exception) -> Any:
        if request.url.path in paths:
            return openai_response(exc)
        out = handler(request, exc)
        return await out if inspect.isawaitable(out) else out

    return handle
