"""An OpenAI-compatible API on the rollout service: the same worker, engine and KV pool.

    GET  /v1/models                 the served model (--served-model-name), with max_model_len
    POST /v1/completions            text or token-id prompts, n choices each (streamed or not)
    POST /v1/chat/completions       messages (and tools) through the tokenizer's chat template
    POST /tokenize, /detokenize     vLLM's shapes
    POST /inference/v1/generate     vLLM's tokens-in/tokens-out route (verifiers trains on it)

n choices are one depth-1 tree of width n, so the prompt is computed once; the tree fields
(`depth`, `width`, `segment_len`, `branch_entropy`, `min_segment_len`) sample deeper trees whose
leaves are the choices. protocol.py says what RL clients read and which fields are refused;
errors come in OpenAI's shape (errors.py), while /sample keeps its own.
"""

from __future__ import annotations

from fastapi import FastAPI

from ...engine.validation import context_limit, eos_ids
from ..worker import ServiceWorker
from .convert import Served
from .errors import OpenAIError, dispatching, openai_response
from .routes import build_router


def mount_openai(
    app: FastAPI, worker: ServiceWorker, served_model_name: str, request_timeout: float
) -> None:
    """Add the routes to `app`; call after the service's own exception handlers are set."""
    engine = worker.engine
    served = Served(
        name=served_model_name,
        tokenizer=engine.tokenizer,
        context=context_limit(engine.model),
        eos=eos_ids(None, engine.model, engine.tokenizer),
        vocab=engine.model.get_output_embeddings().weight.shape[0],
    )
    router = build_router(worker, served, request_timeout)
    app.include_router(router)
    paths = {route.path for route in router.routes}
    for exc_type, handler in list(app.exception_handlers.items()):
        app.exception_handlers[exc_type] = dispatching(paths, handler)
    app.add_exception_handler(OpenAIError, lambda _request, exc: openai_response(exc))
