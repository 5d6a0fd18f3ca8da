"""Response bodies of the OpenAI-compatible routes, for their OpenAPI schema.

The routes build plain dicts (choices.py) and return them as they are; these models document the
shape (and let the schema fuzzer in tests/test_service_errors.py check answers against it). Fields
past OpenAI's are vLLM's (`prompt_token_ids`, `token_ids`, `max_model_len`) or ours for trees
(`tree_path`, `tree_segment_lens`).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="prompt tokens read from KV computed before")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


TREE_PATH = "node ids from the root to this choice's leaf (with tree fields)"
TREE_LENS = "tokens of each node on tree_path; the root's are the prompt's (with tree fields)"
TOKEN_IDS = "every sampled token, including a stop string's or EOS (with return_token_ids)"


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None
    prompt_token_ids: list[int] | None = Field(default=None, description="with return_token_ids")
    token_ids: list[int] | None = Field(default=None, description=TOKEN_IDS)
    tree_path: list[int] | None = Field(default=None, description=TREE_PATH)
    tree_segment_lens: list[int] | None = Field(default=None, description=TREE_LENS)


class Completion(BaseModel):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ChatMessageOut(BaseModel):
    role: str
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = Field(default=None, description=TOKEN_IDS)
    tree_path: list[int] | None = Field(default=None, description=TREE_PATH)
    tree_segment_lens: list[int] | None = Field(default=None, description=TREE_LENS)


class ChatCompletion(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_token_ids: list[int] | None = Field(default=None, description="with return_token_ids")


class GenerateChoice(BaseModel):
    index: int
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None
    token_ids: list[int]
    tree_path: list[int] | None = Field(default=None, description=TREE_PATH)
    tree_segment_lens: list[int] | None = Field(default=None, description=TREE_LENS)


class GenerateResponse(BaseModel):
    request_id: str
    choices: list[GenerateChoice]
    prompt_token_ids: list[int]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int | None = None
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


_SSE = {"text/event-stream": {"schema": {"type": "string", "description": "with stream: true"}}}
STREAMED: dict[int | str, dict[str, Any]] = {200: {"content": _SSE}}
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": why}
    for code, why in {
        400: "a bad value or an unsupported field; `error.message` says which and why",
        401: "missing or wrong bearer token",
        404: "the model is not the one this server serves",
        503: "queue full: retry after the Retry-After header",
        504: "the request's timeout passed",
    }.items()
}
