"""Checks at the door for the text sampler: each names the argument, the value and the fix."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel

from .features import UnsupportedModelError, check_features, check_native

PATHS = ("auto", "cascade", "native")


def check_causal_lm(model: Any, path: str = "cascade") -> str:
    """A transformers decoder-only LM that `path` computes exactly; returns the path it runs on
    ("auto" picks "cascade" where the cascade engine computes the model, else "native" where the
    native path does; what neither computes is refused by name)."""
    if path not in PATHS:
        raise ValueError(f"path={path!r}: expected one of {PATHS}")
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            "model must be a transformers PreTrainedModel (a causal LM), got "
            f"{type(model).__name__}"
        )
    cfg = model.config
    if getattr(cfg, "is_encoder_decoder", False) or model.get_output_embeddings() is None:
        raise TypeError(
            f"model {type(model).__name__} is not a decoder-only causal LM; load it with "
            "AutoModelForCausalLM"
        )
    if path == "native":
        check_native(model)
        return "native"
    try:
        check_features(model)
    except UnsupportedModelError as e:
        if path == "auto" and e.native_ok:
            return "native"
        raise
    return "cascade"


def context_limit(model: PreTrainedModel) -> int | None:
    """Tokens the model attends over at most: its position table. Sliding windows do not cap it:
    each sliding layer reads its own windowed plan (layout.py)."""
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    return limit or None


MIN_TEMPERATURE = 1e-6  # below it logits / temperature overflows fp32: use 0 (greedy) instead


def check_sampling(temperature: float, top_p: float, top_k: int, seed: int) -> None:
    if (
        not isinstance(temperature, (int, float))
        or not math.isfinite(temperature)
        or temperature < 0
        or 0 < temperature < MIN_TEMPERATURE
    ):
        raise ValueError(
            f"temperature={temperature!r}: expected 0 (greedy) or a finite number >= "
            f"{MIN_TEMPERATURE}"
        )
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r}: expected a number in (0, 1] (1 = off)")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k={top_k!r}: expected an int >= 0 (0 = off)")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed={seed!r}: expected an int")


MAX_TOP_LOGPROBS = 20  # as OpenAI and vLLM cap them
MAX_STOP_STRINGS = 16


def check_outputs(stop: Sequence[str] | None, top_logprobs: int, tokenizer: Any) -> tuple[str, ...]:
    """Stop strings (as a tuple; empty for none) and the number of top log-probs per token."""
    if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int):
        raise TypeError(f"top_logprobs must be an int, got {top_logprobs!r}")
    if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        raise ValueError(
            f"top_logprobs={top_logprobs}: expected 0 (none) to {MAX_TOP_LOGPROBS} alternatives"
        )
    if stop is None:
        return ()
    strings = (stop,) if isinstance(stop, str) else tuple(stop)
    if not all(isinstance(s, str) and s for s in strings) or len(strings) > MAX_STOP_STRINGS:
        raise ValueError(
            f"stop={stop!r}: expected up to {MAX_STOP_STRINGS} non-empty strings, or None"
        )
    if strings and tokenizer is None:
        raise ValueError("stop strings need a tokenizer to read the text: pass tokenizer=")
    return strings


def encode_prompts(
    prompts: Sequence[str] | Sequence[Sequence[int]], tokenizer: Any, model: PreTrainedModel
) -> list[list[int]]:
    """Token ids per prompt; strings need a tokenizer (chat templates are the caller's business)."""
    if isinstance(prompts, (str, torch.Tensor)) or not isinstance(prompts, Sequence):
        raise TypeError("prompts must be a list of strings or a list of token-id lists")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: pass at least one prompt")
    vocab = model.get_output_embeddings().weight.shape[0]
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError(
                    f"prompt {i} is a string but no tokenizer was given: pass tokenizer="
                )
            ids = list(tokenizer(p)["input_ids"])
        elif isinstance(p, Sequence) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in p
        ):
            ids = list(p)
        else:
            raise TypeError(
                f"prompt {i} must be a string or a list of ints, got {type(p).__name__}"
            )
        if not ids:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(
                f"prompt {i} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}"
            )
        out.append(ids)
    return out


def eos_ids(
    eos_token_id: int | Sequence[int] | None, model: PreTrainedModel, tokenizer: Any
) -> frozenset[int]:
    """The ids that end a branch: the argument, else the model's generation config, else the
    tokenizer's. An empty set means branches stop only at their length."""
    for source in (
        eos_token_id,
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
    ):
        if source is not None:
            return frozenset([source] if isinstance(source, int) else source)
    return frozenset()
