"""From an OpenAI request to the engine's terms: prompt token ids, `Engine.make_jobs` keyword
arguments, and `Output` (how the answer is written).

Design decisions:
- Prompts become token ids here, in the route (on a worker thread: a long chat template should
  not hold the event loop), so the answer knows each prompt's ids and the context check can speak
  OpenAI's names (`max_tokens`). Completions encode text as the engine does (the tokenizer's
  special tokens added); chat renders `apply_chat_template(messages, tools=...,
  add_generation_prompt=True)` and encodes without adding special tokens (the template has them),
  as vLLM does.
- `n` choices are one depth-1 tree of width n, so a prompt is computed once. The tree fields make
  each prompt a deeper tree; `n` must then be absent or equal its leaf count.
- No seed draws a fresh random one: repeated identical requests then differ, as with OpenAI
  (this engine is deterministic per seed, so a fixed default would repeat every answer).
- Stop token ids join the model's EOS ids (`ignore_eos` drops the latter).
- Default max_tokens: 16 for completions (OpenAI's), 256 for chat and generate (or the context
  left, if less). Not vLLM's whole rest of the context: this engine reserves each tree's
  worst-case KV when it starts, so that default would reserve a full context per choice.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError

from trees.spec import TreeSpec

from .errors import OpenAIError
from .protocol import ChatMessage, SamplingFields

COMPLETION_MAX_TOKENS = 16  # max_tokens when a request names none (see the module doc)
CHAT_MAX_TOKENS = 256  # the same, for chat and generate


@dataclass(frozen=True)
class Served:
    """The served model as the routes see it."""

    name: str
    tokenizer: Any  # None: token ids only (/inference/v1/generate)
    context: int | None  # the model's context length (tokens), if it has one
    eos: frozenset[int]  # the model's own EOS ids
    vocab: int  # token ids are below it

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.name:
            raise OpenAIError(
                404,
                f"The model `{model}` does not exist: this server serves `{self.name}`",
                "model",
                "model_not_found",
            )

    def need_tokenizer(self, what: str) -> Any:
        if self.tokenizer is None:
            raise OpenAIError(
                400,
                f"{what} needs text but this server has no tokenizer: send token ids to "
                "/inference/v1/generate, or serve a model folder with a tokenizer",
            )
        return self.tokenizer


@dataclass(frozen=True)
class Output:
    """What the request asked to see in its choices."""

    logprobs: bool  # per-token log-probs
    top: int  # alternatives per token (0: none)
    token_ids: bool  # return_token_ids: prompt_token_ids and token_ids in the answer
    ids_as_tokens: bool  # return_tokens_as_token_ids: log-prob tokens read "token_id:<id>"
    stop: tuple[str, ...]  # stop strings: the text is cut before the first one
    keep_stop: bool  # include_stop_str_in_output
    skip_special: bool  # skip_special_tokens when decoding
    tree: bool  # tree fields given: choices carry tree_path and tree_segment_lens


def completion_prompts(prompt: Any, served: Served) -> list[list[int]]:
    """Token ids per prompt: text, ids, or a list of either."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    if any(isinstance(p, str) for p in prompt):
        tokenizer = served.need_tokenizer("a text prompt")
        return [list(tokenizer(p)["input_ids"]) if isinstance(p, str) else p for p in prompt]
    return [list(p) for p in prompt]


def chat_prompt(
    messages: list[ChatMessage],
    tokenizer: Any,
    tools: list[dict[str, Any]] | None,
    add_generation_prompt: bool = True,
    add_special_tokens: bool = False,
    **template_kwargs: Any,
) -> list[int]:
    """The chat template's token ids for `messages` (text parts joined by newlines); the
    template writes the special tokens, so none are added unless asked (/tokenize)."""
    plain = []
    for m in messages:
        d = m.model_dump(exclude_none=True)
        if isinstance(m.content, list):
            d["content"] = "\n".join(part.text for part in m.content)
        plain.append(d)
    kwargs = {k: v for k, v in template_kwargs.items() if v is not None}
    try:
        text = tokenizer.apply_chat_template(
            plain,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
            **kwargs,
        )
    except (TemplateError, ValueError, TypeError) as exc:
        raise OpenAIError(400, f"the chat template failed on these messages: {exc}") from exc
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def max_tokens_for(
    prompts: list[list[int]], asked: int | None, default: int, served: Served
) -> int:
    """`asked`, else the smaller of `default` and the context left after the longest prompt;
    checked against the context so the answer names max_tokens (vLLM's message)."""
    longest = max(map(len, prompts))
    limit = served.context
    if asked is None:
        asked = min(default, limit - longest) if limit else default
    if limit is not None and longest + asked > limit:
        raise OpenAIError(
            400,
            f"This model's maximum context length is {limit} tokens. However, you "
            f"requested {longest + asked} tokens ({longest} in the prompt, {asked} for the "
            "completion). Please reduce the prompt or max_tokens.",
            "max_tokens",
            "context_length_exceeded",
        )
    return max(asked, 1)


def engine_kwargs(fields: SamplingFields, max_tokens: int, top: int, served: Served) -> dict:
    """The keyword arguments of `Engine.make_jobs` (everything but prompts)."""
    tree = fields.tree_fields()
    if tree:
        shape = dict(depth=1, width=1, segment_len=32) | tree
        leaves = TreeSpec.make(**shape, max_new_tokens=max_tokens).num_leaves
        if fields.n not in (None, leaves):
            raise OpenAIError(
                400,
                f"n={fields.n}, but with the tree fields each prompt has {leaves} leaves (the "
                "product of width; fewer when a branch ends before it forks), which are its "
                f"choices: leave n out or send n={leaves}",
                "n",
            )
    else:
        shape = dict(depth=1, width=fields.n or 1)
        leaves = shape["width"]
    if fields.best_of not in (None, leaves):
        raise OpenAIError(
            400,
            f"best_of={fields.best_of}: only best_of == n ({leaves}) is "
            "supported (every sample is returned)",
            "best_of",
        )
    eos = (frozenset() if fields.ignore_eos else served.eos) | set(fields.stop_token_ids or [])
    return dict(
        shape,
        max_new_tokens=max_tokens,
        temperature=1.0 if fields.temperature is None else fields.temperature,
        top_p=1.0 if fields.top_p is None else fields.top_p,
        top_k=max(fields.top_k or 0, 0),
        seed=secrets.randbits(63) if fields.seed is None else fields.seed,
        eos_token_id=sorted(eos),
        stop=_stops(fields) or None,
        top_logprobs=top,
    )


def _stops(fields: SamplingFields) -> list[str]:
    return [fields.stop] if isinstance(fields.stop, str) else list(fields.stop or [])


def output_of(fields: SamplingFields, logprobs: bool, top: int) -> Output:
    """What the answer shows: `logprobs` whether to write log-probs, `top` alternatives each."""
    return Output(
        logprobs=logprobs,
        top=top,
        token_ids=bool(fields.return_token_ids),
        ids_as_tokens=bool(fields.return_tokens_as_token_ids),
        stop=tuple(_stops(fields)),
        keep_stop=fields.include_stop_str_in_output,
        skip_special=fields.skip_special_tokens,
        tree=bool(fields.tree_fields()),
    )
