"""Policy losses shared by every kind: pure functions in a registry, over ratios and advantages.

Per target (a token of a text tree, an SDE step of a flow tree), with ratio
rho = exp(logp_new - logp_old) (METHODS.md, GRPO):
- "clipped": -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)   (PPO/GRPO surrogate)
- "pg":      -rho A                                                  (unclipped; rho = 1 on-policy)
Each also returns where the clip was active. Bounds are floats or per-target tensors, so
LayerTuning-RL's adaptive bounds (trainers/flow/layer_tuning.py) go through the same functions.
How the per-target losses are averaged belongs to each kind (trainers/text/losses.py,
trainers/flow/losses.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ClipRange:
    """Ratio bounds [1 - low, 1 + high]: floats, or per-element tensors (adaptive clipping)."""

    low: float | torch.Tensor = 0.2
    high: float | torch.Tensor = 0.2


def clipped_surrogate(
    logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, clip: ClipRange
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO/PPO clipped surrogate per token; also returns where the clip was active (bool)."""
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1.0 - clip.low, 1.0 + clip.high)
    unclipped_obj, clipped_obj = ratio * adv, clipped * adv
    loss = -torch.minimum(unclipped_obj, clipped_obj)
    active = clipped_obj < unclipped_obj
    return loss, active


def policy_gradient(
    logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, clip: ClipRange
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unclipped importance-weighted policy gradient, -rho A."""
    del clip
    ratio = torch.exp(logp - old_logp)
    return -ratio * adv, torch.zeros_like(adv, dtype=torch.bool)


PolicyLoss = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, ClipRange], tuple[torch.Tensor, torch.Tensor]
]
POLICY_LOSSES: dict[str, PolicyLoss] = {"clipped": clipped_surrogate, "pg": policy_gradient}
