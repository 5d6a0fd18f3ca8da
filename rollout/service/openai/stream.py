"""Server-sent events for `stream: true`: one chunk per engine step per choice that got tokens.

Two halves, one per thread:
- `StepObserver` runs on the engine thread (the worker's `on_step`) after every step: it slices
  each choice's new tokens, log-probs and alternatives out of the trees (cheap list slices, no
  decoding) and hands them to the route's asyncio queue with `loop.call_soon_threadsafe`. When the
  ticket's future is set (trees, or an error), a final `DONE` follows them on the same queue.
- `events` runs on the event loop: it decodes each choice's text so far, sends what is new, and
  ends with a usage chunk (when asked) and `data: [DONE]`. An error after the first byte (an
  engine step that failed, the timeout) is one `data: {"error": ...}` event, as vLLM sends it.
  If the caller goes away the generator is cancelled, and it cancels the ticket (its KV is freed
  before the next step).

Only depth-1 requests stream (n choices): a deeper tree's leaves, and so the choice indices, are
not known until its branches have forked.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ..worker import ServiceWorker, Ticket
from .choices import FINISH, Writer
from .errors import error_body

DONE = object()  # queue sentinel: the ticket's future is set


@dataclass(frozen=True)
class Delta:
    """One choice's news from one step."""

    index: int
    prompt: int
    tokens: list[int]
    logprobs: list[float]
    top: list | None
    finish: str | None


class StepObserver:
    """The worker's `on_step` for one streamed request (engine thread)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
        self.loop, self.queue = loop, queue
        self.sent: dict[int, int] = {}  # id(leaf) -> tokens handed over

    def watch(self, ticket: Ticket) -> None:
        """Queue `DONE` once the ticket's future is set (after every step's deltas)."""
        ticket.future.add_done_callback(
            lambda _f: self.loop.call_soon_threadsafe(self.queue.put_nowait, DONE)
        )

    def __call__(self, ticket: Ticket) -> None:
        deltas = []
        for p, job in enumerate(ticket.jobs):
            n = job.spec.width[0]
            for j, leaf in enumerate(job.tree.root.children):
                done = self.sent.get(id(leaf), 0)
                if len(leaf.tokens) == done:
                    continue
                self.sent[id(leaf)] = len(leaf.tokens)
                top = None if leaf.top_logprobs is None else leaf.top_logprobs[done:]
                new = Delta(
                    index=p * n + j,
                    prompt=p,
                    tokens=leaf.tokens[done:],
                    logprobs=leaf.logprobs[done:],
                    top=top,
                    finish=leaf.finish_reason,
                )
                deltas.append(new)
        if deltas:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, deltas)


@dataclass
class _ChoiceState:
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    offset: int = 0  # text offset of the next token (completions' log-probs)


def sse(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload, allow_nan=False)}\n\n".encode()


async def events(
    worker: ServiceWorker,
    ticket: Ticket,
    queue: asyncio.Queue,
    first: Any,
    writer: Writer,
    chat: bool,
    head: dict[str, Any],
    prompts: list[list[int]],
    include_usage: bool,
) -> AsyncIterator[bytes]:
    """The SSE body from the queue's `first` item on. `head`: the fields every chunk starts with
    (id, object, created, model). With return_token_ids, `prompt_token_ids` comes once: in the
    first chunk (chat), or in each choice's first chunk (completions), as vLLM sends them.

    NOTE: each step decodes a choice's whole text so far (the held-back tail can change), which
    is quadratic in its length; fine for the lengths RL samples, and only on streamed requests."""
    states: dict[int, _ChoiceState] = {}
    item = first
    try:
        while item is not DONE:
            for d in item:
                new = d.index not in states
                state = states.setdefault(d.index, _ChoiceState())
                if new and chat:
                    yield sse(_chat_role(head, d, prompts if len(states) == 1 else None, writer))
                state.tokens += d.tokens
                text = writer.text(state.tokens, d.finish)
                piece, state.text = text[len(state.text) :], text
                choice = (_chat_delta if chat else _completion_delta)(d, piece, writer, state)
                if new and not chat and writer.out.token_ids:
                    choice["prompt_token_ids"] = prompts[d.prompt]
                yield sse({**head, "choices": [choice]})
            item = await queue.get()
        error = ticket.future.exception()
        if error is not None:
            status, message, _ = error_body(error)
            kind = "server_error" if status >= 500 else "invalid_request_error"
            yield sse({"error": {"message": message, "type": kind, "param": None, "code": status}})
        elif include_usage:
            prompt = sum(map(len, prompts))
            completion = sum(len(s.tokens) for s in states.values())
            cached = sum(t.stats.prefix_tokens_reused for t in ticket.future.result())
            use = {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached},
            }
            yield sse({**head, "choices": [], "usage": use})
        yield b"data: [DONE]\n\n"
    finally:
        if not ticket.future.done():
            worker.cancel(ticket)  # the caller went away mid-stream


def _chat_role(head: dict, d: Delta, prompts: list[list[int]] | None, writer: Writer) -> dict:
    """A chat choice's first chunk: the assistant role (and, given `prompts`, the prompt's ids
    when asked)."""
    delta = {
        "index": d.index,
        "delta": {"role": "assistant", "content": ""},
        "logprobs": None,
        "finish_reason": None,
    }
    ids = {"prompt_token_ids": prompts[d.prompt]} if prompts and writer.out.token_ids else {}
    return {**head, **ids, "choices": [delta]}


def _completion_delta(d: Delta, piece: str, writer: Writer, state: _ChoiceState) -> dict:
    logprobs = writer.legacy_logprobs(d.tokens, d.logprobs, d.top, state.offset)
    state.offset += writer.text_len(d.tokens)
    out = {
        "index": d.index,
        "text": piece,
        "logprobs": logprobs,
        "finish_reason": FINISH.get(d.finish or ""),
    }
    return {**out, **({"token_ids": d.tokens} if writer.out.token_ids else {})}


def _chat_delta(d: Delta, piece: str, writer: Writer, state: _ChoiceState) -> dict:
    out = {
        "index": d.index,
        "delta": {"content": piece},
        "logprobs": writer.chat_logprobs(d.tokens, d.logprobs, d.top),
        "finish_reason": FINISH.get(d.finish or ""),
    }
    return {**out, **({"token_ids": d.tokens} if writer.out.token_ids else {})}
