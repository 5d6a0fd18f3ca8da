"""Awaiting the engine thread from a handler: a request's trees, or a weight update's version.

Shared by the service's own routes (app.py) and the OpenAI-compatible ones (openai/), so both
cancel a request the same way when its caller goes away: at once, its KV freed before the next
engine step.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from typing import Any

from fastapi import Request

from .errors import HTTPError
from .worker import ServiceWorker, Ticket


async def until_disconnected(request: Request) -> None:
    """Returns when the caller closes the connection (the body is already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def retrieved(future: asyncio.Future) -> None:
    """Done callback: mark the outcome as seen, so asyncio does not log it as never retrieved."""
    if not future.cancelled():
        future.exception()


async def outcome(future: Future) -> Any:
    """Await a worker future; if this handler leaves first (cancelled), its outcome, which
    nobody will read, is still retrieved when it arrives."""
    wrapped = asyncio.wrap_future(future)
    wrapped.add_done_callback(retrieved)
    return await asyncio.shield(wrapped)


async def wait_for(worker: ServiceWorker, ticket: Ticket, request: Request) -> Any:
    """The ticket's result; cancels it if the caller goes away or this handler is cancelled."""
    result = asyncio.wrap_future(ticket.future)
    # NOTE: a cancelled ticket's future gets ConnectionAbortedError after this handler is gone
    result.add_done_callback(retrieved)
    gone = asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        worker.cancel(ticket)
        raise
    finally:
        gone.cancel()
    if not result.done():
        worker.cancel(ticket)
        raise HTTPError(499, "the caller closed the connection")
    return result.result()
