"""Per-token losses of text trees and how they are averaged: pure functions in a registry.

Per target token: a policy loss of trainers/policy_losses.py ("clipped" GRPO/PPO surrogate or
"pg"), plus a KL to a frozen reference, k3 estimator: exp(ref - new) - (ref - new) - 1, added with
weight beta.

Aggregations turn token losses into one number. Each returns per-token weights and the local
normalizer; the trainer sums normalizers over micro-batches and processes first, so
sum(weights * loss) / global normalizer is the same number whatever the split:
- "sequence" (GRPO): mean over each leaf's tokens, then over leaves of a tree, then over trees.
  Shared tokens enter once with the summed weight of the leaves that contain them.
- "token" (DAPO): mean over all sampled tokens of the batch, each unique token once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..policy_losses import POLICY_LOSSES, ClipRange
from .packing import PackedBatch


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi || pi_ref) per token: exp(r) - r - 1 with r = ref - new (>= 0)."""
    r = ref_logp - logp
    return torch.exp(r) - r - 1.0


def sequence_weights(batch: PackedBatch) -> tuple[torch.Tensor, float]:
    return batch.seq_weights, float(batch.num_trees)


def token_weights(batch: PackedBatch) -> tuple[torch.Tensor, float]:
    return torch.ones_like(batch.seq_weights), float(batch.target_ids.numel())


Aggregation = Callable[[PackedBatch], tuple[torch.Tensor, float]]
AGGREGATIONS: dict[str, Aggregation] = {"sequence": sequence_weights, "token": token_weights}


@dataclass(frozen=True)
class LossTerms:
    """Weighted sums over one micro-batch; divide by the global normalizer to get the loss."""

    loss_sum: torch.Tensor  # differentiable
    pg_sum: torch.Tensor
    kl_sum: torch.Tensor
    clip_sum: torch.Tensor
    weight_sum: torch.Tensor


def loss_terms(
    logp: torch.Tensor,
    batch: PackedBatch,
    weights: torch.Tensor,
    *,
    policy_loss: str = "clipped",
    clip: ClipRange = ClipRange(),
    kl_beta: float = 0.0,
    ref_logp: torch.Tensor | None = None,
) -> LossTerms:
    """Weighted token-loss sums for one packed micro-batch (see the module docstring)."""
    device = logp.device
    old, adv, w = (x.to(device) for x in (batch.old_logprobs, batch.advantages, weights))
    pg, active = POLICY_LOSSES[policy_loss](logp, old, adv, clip)
    kl = k3_kl(logp, ref_logp.to(device)) if ref_logp is not None else torch.zeros_like(logp)
    total = pg + kl_beta * kl
    return LossTerms(
        loss_sum=(w * total).sum(),
        pg_sum=(w * pg).detach().sum(),
        kl_sum=(w * kl).detach().sum(),
        clip_sum=(w * active.float()).sum(),
        weight_sum=w.sum(),
    )
