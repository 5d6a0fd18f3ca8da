"""The fleet's HTTP front: the single server's routes, answered by the fleet's replicas.

Design decisions:
- A reverse proxy, not a second implementation: every sampling and OpenAI route is forwarded
  whole to one replica (proxy.py), which answers it exactly as a single server would; the
  front adds only what needs the whole fleet: `/health`, `/stats` and the weight routes.
- `/weights` and `/weights/file` read the safetensors here (a path is read from the front's
  disk, as the single server reads its own) and load them on every replica as one new policy
  version (replicas.py: routing pauses, in-flight requests finish, one `ray.put`, every replica
  loads and takes the version, routing resumes).
- `/health` is "ok" (200) when every replica is up and its last engine step succeeded, else
  "degraded" (503), with each replica's status; `/stats` is the replicas' counters summed, the
  front's own (requests per replica, retries, restarts, the last update's timings) and each
  replica's snapshot. Both carry the fleet's `server_id` and policy version, so
  `rollout.Client` reads a fleet as it reads one server.
- The same bearer token as a single server (`--token`); errors on the OpenAI paths come in
  OpenAI's shape, as there.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from ..service.app import _bearer
from ..service.errors import HTTPError, error_response, validation_response
from ..service.openai.errors import openai_response
from ..service.schema import WeightsFile
from ..service.stats import read_safetensors
from .proxy import Proxy
from .replicas import UP, Member, ReplicaSet, describe

OPENAI_POST = ("/v1/completions", "/v1/chat/completions", "/inference/v1/generate")
OPENAI_PATHS = {"/v1/models", "/tokenize", "/detokenize", *OPENAI_POST}
FORWARDED_POST = ("/sample", "/tokenize", "/detokenize", *OPENAI_POST)
# per-replica values that do not add up across replicas
NOT_SUMMED = {"policy_version", "max_queue", "prefix_sharing_ratio", "uptime_s", "weight_updates"}


def create_front(
    replicas: ReplicaSet,
    proxy: Proxy,
    *,
    model: str,
    server_id: str,
    routing: str,
    token: str | None = None,
    health_interval: float = 1.0,
) -> FastAPI:
    """The front app; its lifespan starts the proxy's client and the replicas' watch."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        proxy.start()
        watch = asyncio.ensure_future(replicas.watch(health_interval))
        try:
            yield
        finally:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
            await replicas.close()
            await proxy.close()

    app = FastAPI(
        title="tree-rollouts fleet",
        version="1",
        dependencies=[Depends(_bearer(token))],
        lifespan=lifespan,
    )

    async def errors(request: Request, exc: Exception) -> Response:
        if request.url.path in OPENAI_PATHS:
            return openai_response(exc)
        if isinstance(exc, RequestValidationError):
            return await validation_response(request, exc)
        return error_response(exc)

    for exc_type in (HTTPError, ValueError, TypeError, TimeoutError, RuntimeError):
        app.add_exception_handler(exc_type, errors)
    app.add_exception_handler(RequestValidationError, errors)

    def forward(path: str) -> Any:
        async def route(request: Request) -> Response:
            return await proxy.forward(request, path)

        route.__name__ = "forward_" + path.strip("/").replace("/", "_")
        return route

    for path in FORWARDED_POST:
        app.post(path)(forward(path))
    app.get("/v1/models")(forward("/v1/models"))

    @app.get("/health")
    async def health() -> JSONResponse:
        rows = await asyncio.gather(*(_replica_health(replicas, m) for m in replicas.members))
        ok = all(r["status"] == "ok" for r in rows)
        body = {
            "status": "ok" if ok else "degraded",
            "policy_version": replicas.version,
            "model": model,
            "server_id": server_id,
            "error": None
            if ok
            else "; ".join(
                f"replica {r['index']}: {r['status']}" for r in rows if r["status"] != "ok"
            ),
            "replicas": rows,
        }
        return JSONResponse(body, 200 if ok else 503)

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return {**await _fleet_stats(replicas), "server_id": server_id, "routing": routing}

    @app.post("/weights")
    async def weights(request: Request) -> dict[str, Any]:
        """A safetensors upload, loaded on every replica as one new policy version."""
        state = await run_in_threadpool(read_safetensors, await request.body())
        return await _update(replicas, state, server_id)

    @app.post("/weights/file")
    async def weights_file(body: WeightsFile) -> dict[str, Any]:
        """A .safetensors file on the front's disk (see POST /weights)."""
        state = await run_in_threadpool(read_safetensors, None, body.path)
        return await _update(replicas, state, server_id)

    return app


async def _update(replicas: ReplicaSet, state: dict[str, Any], server_id: str) -> dict[str, Any]:
    version = await replicas.update(state)
    return {"policy_version": version, "tensors": len(state), "server_id": server_id}


async def _replica_health(replicas: ReplicaSet, member: Member) -> dict[str, Any]:
    """ok, failing (its last engine step failed), unreachable, or restarting."""
    row: dict[str, Any] = {
        "index": member.index,
        "status": member.status,
        "url": member.url,
        "restarts": member.restarts,
        "error": member.error,
    }
    if member.status != UP:
        return row
    try:
        found = await asyncio.wait_for(member.actor.health.remote(), replicas.ping_timeout)
    except Exception as exc:
        return {**row, "status": "unreachable", "error": describe(exc)}
    return {**row, **found}


async def _fleet_stats(replicas: ReplicaSet) -> dict[str, Any]:
    async def one(member: Member) -> dict[str, Any] | None:
        if member.status != UP:
            return None
        try:
            return await asyncio.wait_for(member.actor.stats.remote(), replicas.ping_timeout)
        except Exception:
            return None

    snapshots = await asyncio.gather(*(one(m) for m in replicas.members))
    totals: dict[str, float] = {}
    for snap in filter(None, snapshots):
        for name, value in snap.items():
            if name not in NOT_SUMMED and isinstance(value, (int, float)):
                totals[name] = totals.get(name, 0) + value
    rows = [
        {
            "index": m.index,
            "status": m.status,
            "url": m.url,
            "requests": m.answered,
            "routed": m.routed,
            "in_flight": m.in_flight,
            "restarts": m.restarts,
            "stats": snap,
        }
        for m, snap in zip(replicas.members, snapshots, strict=True)
    ]
    return {
        **totals,
        "policy_version": replicas.version,
        "requests": sum(m.answered for m in replicas.members),
        "retried": replicas.retried,
        "restarts": sum(m.restarts for m in replicas.members),
        "weight_updates": replicas.updates,
        "last_update": replicas.last_update,
        "replicas": rows,
    }
