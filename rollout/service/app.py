"""The rollout service: one `Engine` behind HTTP, shared by every trainer that calls it.

    python -m rollout.serve --model tiny:llama --port 8000
    python -m rollout.serve --model ./my-hf-model --kv-budget 8G --token "$ROLLOUT_TOKEN"

Endpoints (OpenAPI at /openapi.json, docs at /docs): POST /sample (the arguments of
`Engine.sample_tree`), POST /weights (a safetensors upload) and POST /weights/file (a safetensors
path on the server), GET /health, GET /stats. `rollout.Client` speaks this protocol. The same
app serves an OpenAI-compatible API (/v1/models, /v1/completions, /v1/chat/completions, /tokenize,
/detokenize, /inference/v1/generate) over the same worker: see rollout/service/openai/.

Design decisions:
- Handlers never touch the engine: they queue work for `ServiceWorker` (one engine thread) and
  await its futures, so the event loop keeps accepting requests while the engine steps.
- A request whose caller disconnects is cancelled at once (its KV freed before the next step).
- Errors map to status codes with a small `detail` message (errors.py); the OpenAI routes
  answer theirs in OpenAI's shape (openai/errors.py).
- GET /health answers 503 "failing" with the error while the last engine step failed, so a
  poisoned engine is not reported healthy; every answer about the policy carries `server_id`.
- Binds to 127.0.0.1; any other host needs --token, so the policy is never open to a network.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .errors import HTTPError, error_response, validation_response
from .openai import mount_openai
from .schema import (
    ERRORS,
    Health,
    SampleRequest,
    SampleResponse,
    WeightsFile,
    WeightsResponse,
)
from .stats import read_safetensors
from .waiting import outcome, wait_for
from .worker import QueueFull, ServiceWorker

LOOPBACK = ("127.0.0.1", "localhost", "::1")


_SCHEME = HTTPBearer(auto_error=False, description="required when the server has --token")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_SCHEME)]


def _bearer(token: str | None) -> Any:
    async def check(creds: Credentials) -> None:
        if token is None:
            return
        given = creds.credentials if creds is not None else ""
        if not secrets.compare_digest(given.encode(), token.encode()):
            raise HTTPError(
                401,
                "missing or wrong bearer token: send 'Authorization: Bearer <token>' with the "
                "server's --token",
                {"WWW-Authenticate": "Bearer"},
            )

    return check


def create_app(
    worker: ServiceWorker,
    *,
    token: str | None = None,
    request_timeout: float = 600.0,
    served_model_name: str | None = None,
) -> FastAPI:
    """The FastAPI app around a started `ServiceWorker`. `served_model_name` is the `model` the
    OpenAI routes answer to (default: the model's name, as GET /health reports it)."""
    auth = [Depends(_bearer(token))]
    app = FastAPI(title="tree-rollouts service", version="1", dependencies=auth)
    engine = worker.engine
    model_name = getattr(engine.model.config, "_name_or_path", "") or type(engine.model).__name__

    for exc_type in (HTTPError, QueueFull, ValueError, TypeError, TimeoutError, RuntimeError):
        app.add_exception_handler(exc_type, lambda _req, exc: error_response(exc))
    app.add_exception_handler(RequestValidationError, validation_response)
    mount_openai(app, worker, served_model_name or model_name, request_timeout)

    failing = {503: {"model": Health, "description": "the last engine step failed"}}

    @app.get("/health", response_model=Health, responses={**ERRORS, **failing})
    async def health() -> JSONResponse:
        """Status "ok", or 503 "failing" with the error while the last engine step failed."""
        error = worker.failing
        body = {
            "status": "ok" if error is None else "failing",
            "policy_version": engine.policy_version,
            "model": model_name,
            "server_id": worker.server_id,
            "error": error,
        }
        return JSONResponse(body, 200 if error is None else 503)

    @app.get("/stats", response_model=dict[str, int | float], responses=ERRORS)
    async def stats() -> dict[str, Any]:
        return worker.snapshot()

    @app.post("/sample", response_model=SampleResponse, responses=ERRORS)
    async def sample(body: SampleRequest, request: Request) -> JSONResponse:
        """Sample one tree per prompt (see `rollout.sample_tree` for the arguments)."""
        timeout = min(body.timeout or request_timeout, request_timeout)
        ticket = worker.submit(body.prompts, timeout, **body.engine_kwargs())
        trees = await wait_for(worker, ticket, request)
        answer = {
            "trees": [t.to_dict() for t in trees],
            "policy_version": trees[0].policy_version,
            "server_id": worker.server_id,
        }
        return JSONResponse(answer)

    @app.post(
        "/weights",
        response_model=WeightsResponse,
        responses=ERRORS,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
                },
            }
        },
    )
    async def weights(request: Request) -> dict[str, Any]:
        """Load a state dict (safetensors bytes) once the trees queued before it finish."""
        state = await run_in_threadpool(read_safetensors, await request.body())
        return await _update(worker, state)

    @app.post("/weights/file", response_model=WeightsResponse, responses=ERRORS)
    async def weights_file(body: WeightsFile) -> dict[str, Any]:
        """Load a .safetensors file from the server's disk (see POST /weights)."""
        state = await run_in_threadpool(read_safetensors, None, body.path)
        return await _update(worker, state)

    return app


async def _update(worker: ServiceWorker, state: dict[str, Any]) -> dict[str, Any]:
    future = await run_in_threadpool(worker.update_weights, state)
    version = await outcome(future)
    return {"policy_version": version, "tensors": len(state), "server_id": worker.server_id}


def check_host(host: str, token: str | None) -> None:
    """Any host but loopback needs a bearer token."""
    if host not in LOOPBACK and not token:
        raise ValueError(
            f"--host {host} exposes the policy beyond this machine: pass --token (or set "
            "ROLLOUT_TOKEN), or bind 127.0.0.1"
        )
