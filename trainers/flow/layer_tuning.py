"""Dynamic-TreeRPO's LayerTuning-RL: an SFT term weighted by the tree's process reward, and
clipping bounds that adapt per node. Pure functions; `FlowTrainer` calls them per micro-batch.

The paper (arXiv 2509.23352, no public code) says only that the SFT loss is recast as a
dynamically weighted process reward model and paired with dynamic-adaptive clipping bounds so the
SFT pull does not disrupt exploration. The details below are our choices:

1. Process reward. A tree gives every intermediate node a Monte-Carlo value: the advantage A(n)
   the configured estimator assigns it (sibling-relative, depth-normalized, ...), recomputed from
   the current policy's tree at every step, so the weights move with the policy ("dynamic").
2. SFT term. The flow-matching loss the model was pre-trained with, ||v_theta(x_t, t) - u||^2
   (mean over elements), whose target u = (x_t - x0*) / t points from the step's latents to x0*,
   the final latents of the best leaf below the node: supervised learning on the tree's own best
   continuation. Weight w(n) = sft_coef * max(A(n), 0): only nodes better than their group pull.
3. Adaptive bounds. With s = tanh(A(n)), eps_high(n) = eps_high (1 + kappa max(s, 0)) and
   eps_low(n) = eps_low (1 + kappa max(-s, 0)): a node with a confident signal gets a wider trust
   region on the side its advantage pushes (up for good nodes, down for bad ones); a node with
   A ~ 0 keeps the base bounds. kappa = 0 gives fixed bounds.
4. The coupling. A step's SFT term is switched off (a detached mask) once its ratio leaves the
   node's adaptive region [1 - eps_low(n), 1 + eps_high(n)], so the regression toward one leaf
   cannot move a step further in one batch than the policy-gradient term may, which would collapse
   the branch diversity the tree's noise levels create.
"""

from __future__ import annotations

import torch
from torch import Tensor

from trees import Node

from ..policy_losses import ClipRange


def best_leaf(node: Node) -> Node:
    """The highest-reward leaf under `node` (the leftmost on ties)."""
    leaves = node.leaves()
    best = max(range(len(leaves)), key=lambda i: (float(leaves[i].reward), -i))
    return leaves[best]


def sft_weights(advantages: Tensor, sft_coef: float) -> Tensor:
    """w(n) = sft_coef * max(A(n), 0) per SDE step (each step carries its node's advantage)."""
    return sft_coef * advantages.clamp_min(0.0)


def adaptive_clip(advantages: Tensor, clip: ClipRange, kappa: float) -> ClipRange:
    """Per-step bounds widened by tanh(A) on the side the advantage pushes (see point 3)."""
    if kappa == 0:
        return clip
    s = torch.tanh(advantages)
    return ClipRange(
        low=clip.low * (1 + kappa * (-s).clamp_min(0)),
        high=clip.high * (1 + kappa * s.clamp_min(0)),
    )


def reflow_target(latents: Tensor, final: Tensor, sigma: Tensor) -> Tensor:
    """u = (x_t - x0) / t, the rectified-flow velocity from x_t to x0 (diffusers' convention
    x_t = (1 - t) x0 + t noise, v = noise - x0). latents, final [N, ...]; sigma [N] > 0."""
    shape = (-1,) + (1,) * (latents.ndim - 1)
    return (latents.float() - final.float()) / sigma.float().reshape(shape)


def sft_term(
    velocity: Tensor,
    target: Tensor,
    weights: Tensor,
    ratio: Tensor,
    bounds: ClipRange,
) -> Tensor:
    """w * ||v - u||^2 (mean over elements) per step, masked outside the node's trust region."""
    mse = (velocity.float() - target).pow(2).flatten(1).mean(dim=1)  # [N]
    inside = (ratio <= 1 + bounds.high) & (ratio >= 1 - bounds.low)
    return weights * mse * inside.detach().float()
