"""Forwarding one request from the front to a replica, with failover.

Design decisions:
- The body is read once and parsed once, for its routing key (`router.routing_key`); it is
  forwarded as it came, so the replica validates it and answers errors in its own shape. A body
  that does not parse is routed by load and refused by the replica.
- One request goes to one replica whole (all its prompts, all `n` choices): the replica plans
  them together and shares their prefixes, and a request's trees carry one policy version.
- Failover: a request whose replica cannot be reached or drops the connection is sent to another
  replica (requests are safe to repeat: the same seed gives the same trees), after `lost` has
  marked the replica down. An answer is relayed only once it is complete (a JSON body) or has
  begun (a stream's first event), and a failed attempt relays nothing, so no request is ever
  answered twice. A stream whose replica dies after its first event cannot be repeated (the
  caller has part of it): it ends with an error event in OpenAI's shape.
- A caller that goes away cancels the upstream request (its connection is closed, so the replica
  frees the request's KV at once), as on a single server.
- Answers pass through with their status code: a replica's 503 (queue full, with Retry-After)
  reaches the client, whose transport retries it; it is not a failover.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from ..service.errors import HTTPError
from ..service.waiting import until_disconnected
from .replicas import Lease, ReplicaSet, describe
from .router import routing_key

log = logging.getLogger("rollout.fleet")

# the replica is gone or going: its process died, or it stopped listening
LOST = (httpx.NetworkError, httpx.RemoteProtocolError, httpx.ConnectTimeout)
PASSED_HEADERS = ("content-type", "retry-after")


@dataclass
class Answer:
    """A replica's answer: complete (`stream` None) or a stream whose first chunk is read."""

    status: int
    headers: dict[str, str]
    content: bytes
    stream: httpx.Response | None = None
    chunks: AsyncIterator[bytes] | None = None


def request_key(path: str, body: bytes) -> tuple:
    """The routing key of a raw body; () when it is not a JSON object (routed by load)."""
    try:
        parsed = json.loads(body) if body else {}
        return routing_key(path, parsed) if isinstance(parsed, dict) else ()
    except (ValueError, TypeError, AttributeError, KeyError):  # malformed: the replica refuses it
        return ()


class Proxy:
    """The front's HTTP client to its replicas (`start()` on the front's event loop)."""

    def __init__(self, replicas: ReplicaSet, token: str, request_timeout: float) -> None:
        self.replicas = replicas
        self.token = token
        self.request_timeout = request_timeout
        self.max_attempts = 2 * len(replicas.members) + 1
        self.http: httpx.AsyncClient | None = None

    def start(self) -> None:
        # NOTE: no pool limit and no pool timeout: requests wait for engines, not for sockets
        self.http = httpx.AsyncClient(
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=httpx.Timeout(self.request_timeout + 60.0, connect=10.0, pool=None),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
        )

    async def close(self) -> None:
        if self.http is not None:
            await self.http.aclose()

    async def forward(self, request: Request, path: str) -> Response:
        """The answer of one replica to this request, retried on another if it is lost."""
        body = await request.body()
        key = request_key(path, body)
        headers = {k: v for k, v in request.headers.items() if k in ("content-type", "accept")}
        for attempt in range(self.max_attempts):
            lease = await self.replicas.acquire(key)
            try:
                answer = await _unless_gone(request, self._send(lease, path, body, headers))
            except LOST as exc:
                self.replicas.release(lease, answered=False)
                await self.replicas.lost(lease, exc)
                self.replicas.retried += 1
                log.warning(
                    "%s on replica %d: %s; retry %d",
                    path,
                    lease.member.index,
                    describe(exc),
                    attempt + 1,
                )
                continue
            except httpx.TimeoutException as exc:
                self.replicas.release(lease, answered=False)
                raise HTTPError(504, f"replica {lease.member.index} did not answer") from exc
            except BaseException:
                self.replicas.release(lease, answered=False)
                raise
            if answer.stream is None:
                self.replicas.release(lease, answered=True)
                return Response(answer.content, answer.status, answer.headers)
            return StreamingResponse(self._relay(lease, answer), answer.status, answer.headers)
        raise HTTPError(502, f"{path}: {self.max_attempts} replicas were lost under this request")

    async def _send(self, lease: Lease, path: str, body: bytes, headers: dict[str, str]) -> Answer:
        assert self.http is not None, "Proxy.start() first"
        method = "GET" if path == "/v1/models" else "POST"
        upstream = self.http.build_request(method, lease.url + path, content=body, headers=headers)
        response = await self.http.send(upstream, stream=True)
        try:
            kept = {k: v for k, v in response.headers.items() if k in PASSED_HEADERS}
            if not response.headers.get("content-type", "").startswith("text/event-stream"):
                content = await response.aread()
                await response.aclose()
                return Answer(response.status_code, kept, content)
            chunks = response.aiter_raw()
            first = await anext(chunks, b"")
            return Answer(response.status_code, kept, first, response, chunks)
        except BaseException:
            await response.aclose()
            raise

    async def _relay(self, lease: Lease, answer: Answer) -> AsyncIterator[bytes]:
        """A stream's chunks as they come; an error event if its replica is lost midway."""
        assert answer.stream is not None and answer.chunks is not None
        answered = False
        try:
            yield answer.content
            async for chunk in answer.chunks:
                yield chunk
            answered = True
        except LOST as exc:
            await self.replicas.lost(lease, exc)
            message = f"replica {lease.member.index} was lost mid-stream ({describe(exc)})"
            error = {"message": message, "type": "server_error", "param": None, "code": None}
            yield f"data: {json.dumps({'error': error})}\n\n".encode()
        finally:
            await answer.stream.aclose()
            self.replicas.release(lease, answered)


async def _unless_gone(request: Request, work: Coroutine[Any, Any, Answer]) -> Answer:
    """`work`'s result, or 499 (and `work` cancelled, closing its connection) if the caller
    goes away first."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        gone.cancel()
    if not task.done():
        task.cancel()
        raise HTTPError(499, "the caller closed the connection")
    return task.result()
