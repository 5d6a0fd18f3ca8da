"""Plugs cascade attention into any transformers model through its own attention interface.

The model keeps its embeddings, RoPE, norms and MLPs; only the attention call changes. The engine
forwards one packed row of all the step's tokens with explicit `position_ids` and passes a
`StepContext` as the `tree_step` keyword, which transformers hands to both our cache object
(`PoolCache.update` stores the new keys/values in the block pool) and our attention function
(which runs `cascade_attention` over the step's plan). No attention mask is built: the plan is
the mask.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from tree_kernels.cascade import cascade_attention
from tree_kernels.plan import CascadePlan

from .block_pool import BlockPool

ATTN_NAME = "tree_cascade"


@dataclass
class StepContext:
    """What the attention layers need for one engine step."""

    pool: BlockPool
    plan: CascadePlan
    slots: torch.Tensor  # [T] int64 flat pool slot of each new token
    impl: str = "auto"


class PoolCache:
    """A transformers cache that stores each layer's new keys/values in the block pool.

    It returns the new keys/values unchanged: the attention function reads the whole path from the
    pool through the plan, so nothing is concatenated.
    """

    is_compileable = False

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        step = _step_from(kwargs.get("kwargs", kwargs))
        # [1, KVH, T, D] -> [T, KVH, D]
        step.pool.write(
            layer_idx, step.slots, key_states[0].transpose(0, 1), value_states[0].transpose(0, 1)
        )
        return key_states, value_states


def _step_from(kwargs: dict[str, Any]) -> StepContext:
    step = kwargs.get("tree_step")
    if step is None:
        raise RuntimeError(
            f"attn_implementation={ATTN_NAME!r} runs only inside the rollout engine "
            "(the model was called without its tree_step)"
        )
    return step


def tree_cascade_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query [1, H, T, D] -> output [1, T, H, D], attending over the pool via the step's plan."""
    step = _step_from(kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    k_pool, v_pool = step.pool.layer(module.layer_idx)
    out = cascade_attention(
        query[0].transpose(0, 1), k_pool, v_pool, step.plan, scaling, impl=step.impl
    )
    return out.unsqueeze(0), None


AttentionInterface.register(ATTN_NAME, tree_cascade_attention)


@contextmanager
def cascade_attention_enabled(model: torch.nn.Module) -> Iterator[None]:
    """Switch `model` to cascade attention for the block, then restore its own implementation."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTN_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
