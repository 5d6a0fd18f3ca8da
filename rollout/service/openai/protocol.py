"""Request bodies of the OpenAI-compatible routes (their OpenAPI schema), and what we refuse.

What RL clients read, checked in their source (verifiers 0.4.0, `verifiers/v1`):
- Evaluation (`clients/eval.py`, `dialects/chat.py`) relays the harness's body to
  POST /v1/chat/completions and reads a standard `ChatCompletion`: `choices[0].message.content`
  (and `reasoning` / `reasoning_content`, `tool_calls`), `choices[0].finish_reason` ("stop",
  "length", "tool_calls") and `usage` (prompt_tokens, completion_tokens, total_tokens).
  Log-probs are relayed untouched, never read; its chat path refuses n != 1 itself.
- Training (`clients/train.py` through `renderers.client.generate`) renders the chat template
  client-side, first GETs /v1/models (`data[i].max_model_len` where `data[i].id == model`, a
  pre-flight context check), then POSTs /inference/v1/generate (vLLM's tokens-in/tokens-out
  route, at the server root) with {"model", "token_ids", "sampling_params": {the sampling config
  with extra_body keys flattened in, "stop_token_ids", "logprobs": 1, "skip_special_tokens":
  false}} and reads `choices[0].token_ids`, `choices[0].logprobs.content[i].token` (which must be
  "token_id:<id>"), `.logprob` (finite, not vLLM's -9999 sentinel), `choices[0].finish_reason`,
  and, when present, top-level `prompt_token_ids`, `request_id` and `usage`.
- Neither sends `return_token_ids` / `return_tokens_as_token_ids` nor reads `prompt_token_ids` /
  `token_ids` from the chat route (verifiers before 0.4 did). We accept both as vLLM does, for
  other trainers: then completions choices carry `prompt_token_ids` and `token_ids`, chat answers
  carry top-level `prompt_token_ids` and per-choice `token_ids` (vLLM's layout).

Design decisions:
- Unknown fields are refused (400), never ignored. Fields we accept but ignore are harmless: they
  do not change what is sampled (`user`, `metadata`, `priority`, `parallel_tool_calls`,
  `spaces_between_special_tokens`, and on the generate route `detokenize`,
  `routed_experts_prompt_start`, `reasoning_effort`: the caller rendered the prompt). Fields we
  cannot honour are accepted only at their neutral value (`neutral`): penalties, `logit_bias`,
  `min_p`, `min_tokens`, `best_of` other than n, `echo`, `suffix`, `response_format` other than
  text, `cache_salt` (prefixes are shared across requests by design), `tool_choice` other than
  "none" (tools are rendered into the prompt; no tool calls are parsed from the output).
- Tree sampling rides on the same routes: the extra fields `depth`, `width`, `segment_len`,
  `branch_entropy`, `min_segment_len` make each prompt one tree whose leaves are its choices.
- Strict types as in ../schema.py: "3" is not a count and true is not a token id.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from ...engine.validation import MAX_STOP_STRINGS, MAX_TOP_LOGPROBS
from ..schema import MAX_DEPTH, MAX_PROMPT_CHARS, MAX_PROMPTS, MAX_TOKENS, TokenId, Width
from .errors import UNSUPPORTED

Text = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
TokenIds = Annotated[list[TokenId], Field(min_length=1, max_length=MAX_TOKENS)]
Length = Annotated[int, Field(ge=1, le=MAX_TOKENS)]
PerLevel = Annotated[list[Length], Field(min_length=1, max_length=MAX_DEPTH)]
TopLogprobs = Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)]
Number = Annotated[float, Field(allow_inf_nan=False)]
STRICT = ConfigDict(extra="forbid", strict=True)


def neutral(*allowed: Any, why: str = UNSUPPORTED) -> AfterValidator:
    """A field we cannot honour: only its neutral values (`allowed`) pass."""

    def check(value: Any) -> Any:
        if value not in allowed:
            raise ValueError(f"{value!r} is not supported: {why}")
        return value

    return AfterValidator(check)


NO_PENALTY = "the policy's own distribution is sampled (RL needs its log-probs); only 0 passes"


class SamplingFields(BaseModel):
    """Sampling fields of /v1/completions, /v1/chat/completions and the generate route's
    `sampling_params`. None means the route's default."""

    model_config = STRICT

    n: Width | None = None
    max_tokens: Length | None = None
    temperature: Annotated[float, Field(ge=0, le=1e4, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] | None = None
    top_k: Annotated[int, Field(ge=-1, le=2**31 - 1)] | None = Field(
        default=None, description="0 or -1: off (vLLM's convention)"
    )
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | None = Field(
        default=None, description="same seed, same samples; absent: a fresh random seed"
    )
    stop: Text | Annotated[list[Text], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=1024)] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    # tree sampling: each prompt's leaves are its choices
    depth: Annotated[int, Field(ge=1, le=MAX_DEPTH)] | None = None
    width: Width | Annotated[list[Width], Field(min_length=1, max_length=MAX_DEPTH)] | None = None
    segment_len: Length | PerLevel | None = None
    branch_entropy: Annotated[float, Field(ge=0, le=1e4, allow_inf_nan=False)] | None = None
    min_segment_len: Length | PerLevel | None = None
    # token fields for RL (vLLM's extras)
    return_token_ids: bool | None = None
    return_tokens_as_token_ids: bool | None = None
    # harmless: they do not change what is sampled
    user: Annotated[str, Field(max_length=1024)] | None = None
    metadata: dict[str, str] | None = None
    priority: int | None = None
    # refused unless neutral
    presence_penalty: Annotated[Number | None, neutral(None, 0, why=NO_PENALTY)] = None
    frequency_penalty: Annotated[Number | None, neutral(None, 0, why=NO_PENALTY)] = None
    repetition_penalty: Annotated[Number | None, neutral(None, 1, why=NO_PENALTY)] = None
    min_p: Annotated[Number | None, neutral(None, 0)] = None
    min_tokens: Annotated[int | None, neutral(None, 0)] = None
    logit_bias: Annotated[dict[str, Number] | None, neutral(None, {}, why=NO_PENALTY)] = None
    best_of: Annotated[int, Field(ge=1, le=1024)] | None = Field(
        default=None, description="only equal to n: every sample is returned"
    )
    response_format: Annotated[
        dict[str, Any] | None, neutral(None, {"type": "text"}, why="no constrained decoding")
    ] = None
    cache_salt: Annotated[
        str | None, neutral(None, why="prefixes are shared across requests by design")
    ] = None

    def tree_fields(self) -> dict[str, Any]:
        """The tree extra fields that were given (empty: plain n-sampling)."""
        names = ("depth", "width", "segment_len", "branch_entropy", "min_segment_len")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # harmless: nothing is padded
    continuous_usage_stats: Annotated[bool | None, neutral(None, False)] = None


class Streaming(BaseModel):
    stream: bool = False
    stream_options: StreamOptions | None = None


CompletionPrompt = (
    Text
    | TokenIds
    | Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS)]
    | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
)


class CompletionRequest(SamplingFields, Streaming):
    """POST /v1/completions. `prompt`: text, token ids, or a list of either (n choices each)."""

    model: str | None = None
    prompt: CompletionPrompt = Field(description=f"at most {MAX_PROMPTS} prompts")
    logprobs: TopLogprobs | None = Field(
        default=None, description="log-probs of each token and its n likeliest alternatives"
    )
    echo: Annotated[bool | None, neutral(None, False)] = None
    suffix: Annotated[str | None, neutral(None, "")] = None


class TextPart(BaseModel):
    model_config = STRICT

    type: Literal["text"] = Field(description="only text content parts")
    text: str


class ChatMessage(BaseModel):
    """A message as the chat template reads it; fields beyond role and content (name,
    tool_calls, tool_call_id, reasoning_content, ...) pass through to the template."""

    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] | list[TextPart] | None = None


Messages = Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_PROMPTS)]
Tools = Annotated[list[dict[str, Any]], Field(max_length=1024)]
TEMPLATE = "passed to the tokenizer's chat template"


class ChatTemplateFields(BaseModel):
    tools: Tools | None = Field(default=None, description=TEMPLATE)
    chat_template_kwargs: dict[str, Any] | None = Field(default=None, description=TEMPLATE)
    add_generation_prompt: bool = True


class ChatCompletionRequest(SamplingFields, Streaming, ChatTemplateFields):
    """POST /v1/chat/completions: messages rendered by the tokenizer's chat template."""

    model: str | None = None
    messages: Messages
    max_completion_tokens: Length | None = None
    logprobs: bool = False
    top_logprobs: TopLogprobs | None = None
    reasoning_effort: str | None = Field(default=None, description=TEMPLATE)
    tool_choice: Annotated[
        str | dict[str, Any] | None,
        neutral(
            None,
            "none",
            why="tools are rendered into the prompt but no tool calls are "
            "parsed from the output: send 'none' (or leave it out) and parse the text",
        ),
    ] = None
    parallel_tool_calls: bool | None = None
    echo: Annotated[bool | None, neutral(None, False)] = None


class TokenizeRequest(ChatTemplateFields):
    """POST /tokenize (vLLM's shape): `prompt` text, or chat `messages` (rendered)."""

    model_config = STRICT

    model: str | None = None
    prompt: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] | None = None
    messages: Messages | None = None
    add_special_tokens: bool | None = Field(
        default=None, description="default true for a prompt, false for messages (vLLM's)"
    )
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    """POST /detokenize: token ids back to text."""

    model_config = STRICT

    model: str | None = None
    tokens: Annotated[list[TokenId], Field(max_length=MAX_TOKENS)]


class GenerateSampling(SamplingFields):
    logprobs: TopLogprobs | None = Field(
        default=None, description="log-probs of each token and its n likeliest alternatives"
    )
    detokenize: bool | None = None  # harmless: this route returns no text
    routed_experts_prompt_start: Annotated[int, Field(ge=0)] | None = None  # no experts returned
    reasoning_effort: str | None = None  # harmless: the caller rendered the prompt


class GenerateRequest(BaseModel):
    """POST /inference/v1/generate: vLLM's tokens-in/tokens-out route, which verifiers' training
    client calls (see the module doc)."""

    model_config = STRICT

    model: str | None = None
    request_id: Annotated[str, Field(max_length=256)] | None = None
    token_ids: TokenIds
    sampling_params: GenerateSampling = Field(default_factory=GenerateSampling)
    stream: Annotated[bool, neutral(False, why="use /v1/completions to stream")] = False
    priority: int | None = None
    cache_salt: Annotated[
        str | None, neutral(None, why="prefixes are shared across requests by design")
    ] = None
