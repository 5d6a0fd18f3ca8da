"""Request and response bodies of the rollout service (they are its OpenAPI schema).

Design decisions:
- Strict types, no coercion: `"3"` is not a depth and `true` is not a token id; unknown fields are
  refused, so a misspelt argument (`max_tokens`) is an error, not a silent default.
- Bounds at the door keep one request from exhausting the server: depth, width, lengths and
  prompt sizes have ceilings here, before the engine sees them. The engine then checks what
  depends on the model (vocabulary, context length, the KV budget) with its own messages.
- Trees travel as `Tree.to_dict()` (the JSON round trip in trees/tree.py), so the client rebuilds
  the same `trees.Tree` objects that in-process sampling returns.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from ..engine.validation import MAX_STOP_STRINGS, MAX_TOP_LOGPROBS

MAX_DEPTH = 16
MAX_WIDTH = 1024
MAX_TOKENS = 1 << 16  # per prompt, per segment and per path
MAX_PROMPT_CHARS = 1 << 20
MAX_PROMPTS = 4096

TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
TokenIds = Annotated[list[TokenId], Field(min_length=1, max_length=MAX_TOKENS)]
Text = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
Width = Annotated[int, Field(ge=1, le=MAX_WIDTH)]
Length = Annotated[int, Field(ge=1, le=MAX_TOKENS)]


class SampleRequest(BaseModel):
    """The arguments of `rollout.Engine.sample_tree`, plus a timeout."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompts: Annotated[list[Text] | list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)] = (
        Field(description="strings (the server needs a tokenizer) or token-id lists")
    )
    depth: Annotated[int, Field(ge=1, le=MAX_DEPTH)] = 1
    width: Width | Annotated[list[Width], Field(min_length=1, max_length=MAX_DEPTH)] = 1
    segment_len: Length | Annotated[list[Length], Field(min_length=1, max_length=MAX_DEPTH)] = 32
    max_new_tokens: Length = 256
    temperature: Annotated[float, Field(ge=0, le=1e4, allow_inf_nan=False)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 1.0
    top_k: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] = 0
    eos_token_id: TokenId | Annotated[list[TokenId], Field(max_length=1024)] | None = None
    branch_entropy: Annotated[float, Field(ge=0, le=1e4, allow_inf_nan=False)] | None = None
    min_segment_len: (
        Length | Annotated[list[Length], Field(min_length=1, max_length=MAX_DEPTH)] | None
    ) = None
    stop: Text | Annotated[list[Text], Field(max_length=MAX_STOP_STRINGS)] | None = Field(
        default=None, description="strings that end a branch (finish_reason 'stop')"
    )
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] = 0
    timeout: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = Field(
        default=None, description="seconds; the server's --request-timeout when absent (and cap)"
    )

    def engine_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `Engine.make_jobs` (everything but prompts and timeout)."""
        return self.model_dump(exclude={"prompts", "timeout"})


SERVER_ID = "random per start of the server: a new one means it restarted (startup weights)"


class SampleResponse(BaseModel):
    trees: list[dict[str, Any]] = Field(description="one `Tree.to_dict()` per prompt, in order")
    policy_version: int
    server_id: str = Field(description=SERVER_ID)


class WeightsFile(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    path: Annotated[str, Field(min_length=1, max_length=4096)] = Field(
        description="a .safetensors file on the server's disk"
    )


class WeightsResponse(BaseModel):
    policy_version: int
    tensors: int
    server_id: str = Field(description=SERVER_ID)


class Health(BaseModel):
    status: str = Field(description='"ok", or "failing" (HTTP 503) while the last step failed')
    policy_version: int
    model: str
    server_id: str = Field(description=SERVER_ID)
    error: str | None = Field(default=None, description="the failed step's error when failing")


class ErrorBody(BaseModel):
    detail: Any


ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "missing or wrong bearer token"},
    422: {"model": ErrorBody, "description": "the request is malformed; `detail` says why"},
    503: {"model": ErrorBody, "description": "queue full: retry after the Retry-After header"},
    504: {"model": ErrorBody, "description": "the request's timeout passed"},
}
