"""Loading the policy and its tokenizer: the toy model built here, or any transformers causal LM.

`model.name: toy` builds and pretrains the toy policy (seconds, nothing downloaded); anything else
goes to `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained` (a hub id or a
local directory). The frozen reference for the KL term is a deep copy taken before any update
(`frozen_copy`, trainers/policy.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..config import RunConfig
from ..policy import DTYPES
from .toy_task import build_toy_policy


def _toy(cfg: RunConfig) -> tuple[torch.nn.Module, Any]:
    return build_toy_policy(
        cfg.model.pretrain_steps, cfg.task.num_digits, cfg.train.seed, cfg.model.attn_implementation
    )


def _pretrained(cfg: RunConfig) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        cfg.model.name,
        dtype=DTYPES[cfg.model.dtype],
        attn_implementation=cfg.model.attn_implementation,
    )
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.name)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


LOADERS: dict[str, Callable[[RunConfig], tuple[torch.nn.Module, Any]]] = {"toy": _toy}


def load_policy(cfg: RunConfig) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) for `cfg.model.name`, in eval mode, on the CPU."""
    return LOADERS.get(cfg.model.name, _pretrained)(cfg)
