"""The OpenAI-compatible routes: a thin adapter onto the service's worker (one engine, one pool).

Each route checks the model name, turns its prompts into token ids (convert.py), submits them
to the same `ServiceWorker` the service's /sample uses, and writes the trees it gets back as
choices (choices.py), or streams them (stream.py). Nothing here touches the engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse

from trees import Tree

from ..waiting import wait_for
from ..worker import ServiceWorker
from .choices import Writer, leaf_choices, usage
from .convert import (
    CHAT_MAX_TOKENS,
    COMPLETION_MAX_TOKENS,
    Output,
    Served,
    chat_prompt,
    completion_prompts,
    engine_kwargs,
    max_tokens_for,
    output_of,
)
from .errors import OpenAIError
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    GenerateRequest,
    TokenizeRequest,
)
from .schema import (
    ERRORS,
    STREAMED,
    ChatCompletion,
    Completion,
    DetokenizeResponse,
    GenerateResponse,
    ModelList,
    TokenizeResponse,
)
from .stream import DONE, StepObserver, events


def _head(prefix: str, obj: str, model: str) -> dict[str, Any]:
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": obj,
        "created": int(time.time()),
        "model": model,
    }


def _check_stream(body: CompletionRequest | ChatCompletionRequest) -> bool:
    """Whether to stream; stream options without stream, or a streamed tree, are refused."""
    if body.stream_options is not None and not body.stream:
        raise OpenAIError(400, "stream_options needs stream: true", "stream_options")
    if body.stream and body.tree_fields():
        raise OpenAIError(
            400,
            "stream: true with tree fields: a tree's leaves (its choices) are not known "
            "until its branches fork; send the tree request without stream",
            "stream",
        )
    return body.stream


def build_router(worker: ServiceWorker, served: Served, request_timeout: float) -> APIRouter:
    router = APIRouter(tags=["openai"])

    async def sample(prompts: list[list[int]], kwargs: dict, request: Request) -> list[Tree]:
        ticket = worker.submit(prompts, request_timeout, **kwargs)
        return await wait_for(worker, ticket, request)

    async def stream(
        prompts: list[list[int]],
        kwargs: dict,
        writer: Writer,
        chat: bool,
        head: dict,
        include_usage: bool,
    ) -> StreamingResponse:
        """Starts streaming once the first step has run, so a request the engine refuses (a
        bad value, a tree too big for the KV budget) still gets its 4xx, not a broken stream."""
        queue: asyncio.Queue = asyncio.Queue()
        observer = StepObserver(asyncio.get_running_loop(), queue)
        ticket = worker.submit(prompts, request_timeout, on_step=observer, **kwargs)
        observer.watch(ticket)
        try:
            first = await queue.get()
        except asyncio.CancelledError:
            worker.cancel(ticket)
            raise
        if first is DONE and (error := ticket.future.exception()) is not None:
            raise error
        body = events(worker, ticket, queue, first, writer, chat, head, prompts, include_usage)
        return StreamingResponse(body, media_type="text/event-stream")

    @router.get("/v1/models", response_model=ModelList, responses=ERRORS)
    async def models() -> dict[str, Any]:
        """The served model (`max_model_len`: its context, as vLLM reports it)."""
        card = {
            "id": served.name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "tree-rollouts",
            "max_model_len": served.context,
        }
        return {"object": "list", "data": [card]}

    @router.post("/v1/completions", response_model=Completion, responses={**ERRORS, **STREAMED})
    async def completions(body: CompletionRequest, request: Request) -> Response:
        """Text completions; with the tree fields each prompt's leaves are its choices."""
        served.check_model(body.model)
        tokenizer = served.need_tokenizer("/v1/completions")
        streamed = _check_stream(body)
        prompts = await run_in_threadpool(completion_prompts, body.prompt, served)
        max_tokens = max_tokens_for(prompts, body.max_tokens, COMPLETION_MAX_TOKENS, served)
        top = body.logprobs or 0
        kwargs = engine_kwargs(body, max_tokens, top, served)
        writer = Writer(tokenizer, output_of(body, body.logprobs is not None, top))
        head = _head("cmpl", "text_completion", served.name)
        if streamed:
            include = bool(body.stream_options and body.stream_options.include_usage)
            return await stream(prompts, kwargs, writer, False, head, include)
        trees = await sample(prompts, kwargs, request)
        choices = leaf_choices(trees)
        return JSONResponse(
            {
                **head,
                "choices": [writer.completion(c, prompts[c.prompt]) for c in choices],
                "usage": usage(prompts, choices, trees),
            }
        )

    @router.post(
        "/v1/chat/completions", response_model=ChatCompletion, responses={**ERRORS, **STREAMED}
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        """Chat: messages (and tools) through the tokenizer's chat template."""
        served.check_model(body.model)
        tokenizer = served.need_tokenizer("/v1/chat/completions")
        streamed = _check_stream(body)
        if body.top_logprobs and not body.logprobs:
            raise OpenAIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        prompt = await run_in_threadpool(
            chat_prompt,
            body.messages,
            tokenizer,
            body.tools,
            body.add_generation_prompt,
            reasoning_effort=body.reasoning_effort,
            **(body.chat_template_kwargs or {}),
        )
        asked = body.max_completion_tokens or body.max_tokens
        max_tokens = max_tokens_for([prompt], asked, CHAT_MAX_TOKENS, served)
        top = body.top_logprobs or 0
        kwargs = engine_kwargs(body, max_tokens, top, served)
        writer = Writer(tokenizer, output_of(body, body.logprobs, top))
        head = _head("chatcmpl", "chat.completion", served.name)
        if streamed:
            include = bool(body.stream_options and body.stream_options.include_usage)
            chunk_head = {**head, "object": "chat.completion.chunk"}
            return await stream([prompt], kwargs, writer, True, chunk_head, include)
        trees = await sample([prompt], kwargs, request)
        choices = leaf_choices(trees)
        ids = {"prompt_token_ids": prompt} if writer.out.token_ids else {}
        return JSONResponse(
            {
                **head,
                "choices": [writer.chat(c) for c in choices],
                "usage": usage([prompt], choices, trees),
                **ids,
            }
        )

    @router.post("/inference/v1/generate", response_model=GenerateResponse, responses=ERRORS)
    async def generate(body: GenerateRequest, request: Request) -> JSONResponse:
        """vLLM's tokens-in/tokens-out route (verifiers' training client): log-prob tokens
        always read "token_id:<id>"; no text is returned."""
        served.check_model(body.model)
        sp = body.sampling_params
        prompts = [body.token_ids]
        max_tokens = max_tokens_for(prompts, sp.max_tokens, CHAT_MAX_TOKENS, served)
        top = sp.logprobs or 0
        kwargs = engine_kwargs(sp, max_tokens, top, served)
        out: Output = output_of(sp, sp.logprobs is not None, top)
        writer = Writer(served.tokenizer, dataclasses.replace(out, ids_as_tokens=True))
        trees = await sample(prompts, kwargs, request)
        choices = leaf_choices(trees)
        return JSONResponse(
            {
                "request_id": body.request_id or uuid.uuid4().hex,
                "choices": [writer.generate(c) for c in choices],
                "prompt_token_ids": body.token_ids,
                "usage": usage(prompts, choices, trees),
            }
        )

    @router.post("/tokenize", response_model=TokenizeResponse, responses=ERRORS)
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        """Text (`prompt`) or chat `messages` to token ids, as the sampling routes encode them."""
        served.check_model(body.model)
        tokenizer = served.need_tokenizer("/tokenize")
        if (body.prompt is None) == (body.messages is None):
            raise OpenAIError(400, "send exactly one of prompt or messages", "prompt")
        if body.prompt is not None:
            special = True if body.add_special_tokens is None else body.add_special_tokens
            encoded = tokenizer(body.prompt, add_special_tokens=special)
            ids = list(encoded["input_ids"])
        else:
            ids = await run_in_threadpool(
                chat_prompt,
                body.messages,
                tokenizer,
                body.tools,
                body.add_generation_prompt,
                add_special_tokens=bool(body.add_special_tokens),
                **(body.chat_template_kwargs or {}),
            )
        strs = tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return {
            "tokens": ids,
            "count": len(ids),
            "max_model_len": served.context,
            "token_strs": strs,
        }

    @router.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS)
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        """Token ids to text (special tokens kept, as vLLM's /detokenize)."""
        served.check_model(body.model)
        tokenizer = served.need_tokenizer("/detokenize")
        bad = [t for t in body.tokens if t >= served.vocab]
        if bad:
            raise OpenAIError(
                400, f"tokens outside the vocabulary [0, {served.vocab}): {bad[:5]}", "tokens"
            )
        return {"prompt": tokenizer.decode(body.tokens)}

    return router
