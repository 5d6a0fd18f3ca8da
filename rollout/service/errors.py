"""How the rollout service turns exceptions into answers: a status code and a small `detail`.

Design decisions:
- One mapping for handlers and engine alike: 422 for anything wrong with the request (schema,
  vocabulary, context, KV budget, weights), 503 + Retry-After when the queue is full, 504 when
  the request's timeout passes, 401 for a missing or wrong bearer token, 500 for the rest.
- Schema errors name the cause first and stay small. Pydantic reports one error per member of a
  union (`prompts` is strings or token-id lists), so a 100k-token prompt used to be answered
  "Input should be a valid string" before the real cause, with the whole prompt echoed twice
  (400 KB). Per field we keep the errors that say what is wrong with the value (too long, out of
  range) over those that only say it is not of some union member's type; among type errors, the
  union member that matched deepest; the offending input is echoed only when it is short.
"""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from .worker import QueueFull

MAX_ERRORS = 8  # schema errors reported per answer
MAX_ECHO = 80  # characters of an offending input (or context value) echoed back


class HTTPError(Exception):
    """An answer a handler decided on: status code, message, headers."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers


def error_response(exc: BaseException) -> JSONResponse:
    """The status code and message for an exception a handler or the engine raised."""
    if isinstance(exc, HTTPError):
        return JSONResponse({"detail": exc.detail}, exc.status, headers=exc.headers)
    if isinstance(exc, QueueFull):
        retry = str(math.ceil(exc.retry_after))
        return JSONResponse({"detail": str(exc)}, 503, headers={"Retry-After": retry})
    if isinstance(exc, (ValueError, TypeError)):
        return JSONResponse({"detail": str(exc)}, 422)
    if isinstance(exc, TimeoutError):
        return JSONResponse({"detail": str(exc)}, 504)
    return JSONResponse({"detail": f"{type(exc).__name__}: {exc}"}, 500)


async def validation_response(_request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with at most MAX_ERRORS schema errors, the most telling one of each field first."""
    errors = [dict(e) for e in exc.errors()]
    fields: dict[Any, list[dict[str, Any]]] = {}
    for e in errors:
        fields.setdefault(_field(e), []).append(e)
    detail = [d for errs in fields.values() for d in _most_relevant(errs)]
    if len(detail) > MAX_ERRORS:
        left = len(detail) - MAX_ERRORS
        detail = detail[:MAX_ERRORS] + [{"loc": ["body"], "msg": f"and {left} more errors"}]
    return JSONResponse({"detail": detail}, 422)


def _field(error: dict[str, Any]) -> Any:
    loc = tuple(error.get("loc", ()))
    return loc[1] if len(loc) > 1 and loc[0] == "body" else loc


def _clean_loc(loc: tuple[Any, ...]) -> list[Any]:
    """('body', 'prompts', 'list[constrained-str]', 0) -> ['body', 'prompts', 0].

    NOTE: the service's bodies are flat models, so after the field name a location holds only
    list indices (ints) and pydantic's union member tags (strings), which we drop."""
    if len(loc) < 2 or loc[0] != "body":
        return list(loc)
    return [*loc[:2], *(x for x in loc[2:] if isinstance(x, int))]


def _is_type_error(error: dict[str, Any]) -> bool:
    kind = str(error.get("type", ""))
    return kind.endswith("_type") or kind in ("is_instance_of", "none_required", "literal_error")


def _most_relevant(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One field's errors: constraint violations if any, else the deepest type errors; errors at
    the same location (one per union member) merged into one message."""
    chosen = [e for e in errors if not _is_type_error(e)]
    if not chosen:
        depth = max(len(_clean_loc(tuple(e.get("loc", ())))) for e in errors)
        chosen = [e for e in errors if len(_clean_loc(tuple(e.get("loc", ())))) == depth]
    merged: dict[tuple[Any, ...], dict[str, Any]] = {}
    for e in chosen:
        loc = _clean_loc(tuple(e.get("loc", ())))
        out = merged.get(tuple(loc))
        if out is None:
            merged[tuple(loc)] = _small(e, loc)
        elif e.get("msg") not in out["msg"]:
            out["msg"] += " or " + str(e.get("msg", "")).removeprefix("Input should be ")
    return list(merged.values())


def _small(error: dict[str, Any], loc: list[Any]) -> dict[str, Any]:
    """The error without its url, its input echoed only when short, its context as short text."""
    out: dict[str, Any] = {"loc": loc, "msg": str(error.get("msg", "")), "type": error.get("type")}
    if "input" in error and _fits(error["input"]):
        out["input"] = error["input"]
    ctx = error.get("ctx")
    if isinstance(ctx, dict):
        out["ctx"] = {str(k): v if _fits(v) else str(v)[:MAX_ECHO] for k, v in ctx.items()}
    return out


def _fits(value: Any) -> bool:
    """Whether `value` is JSON of at most MAX_ECHO characters."""
    try:
        return len(json.dumps(value)) <= MAX_ECHO
    except (TypeError, ValueError):
        return False
