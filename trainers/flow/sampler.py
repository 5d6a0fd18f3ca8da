"""What a flow run samples with: Dynamic-TreeRPO's sliding-window SDE trees from a pipeline.

It implements the run loop's `Sampler` (trainers/policy.py) with costs in network function
evaluations (NFE, transformer calls per latent). The window is fixed (`flow.sde_window`) or
slides with the training step (`flow.window_size`, trainers/flow/config.py); the policy version
is a counter the trainer bumps after each optimizer step, stamped on every tree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rollout.flow import SlidingWindow, leaf_image, sample_flow_tree
from rollout.flow.pipeline import FlowPipeline
from trees import Trajectory, Tree

from ..config import RolloutConfig
from ..policy import CostKeys
from .config import FlowConfig


class FlowSampler:
    """Flow-matching trees (Dynamic-TreeRPO's sliding-window SDE tree) from a pipeline."""

    cost_keys = CostKeys("sample_nfe", "train_nfe", "nfe_total", "nfe_per_s")

    def __init__(self, pipe: FlowPipeline, rollout: RolloutConfig, flow: FlowConfig) -> None:
        self.pipe, self.rollout, self.flow = pipe, rollout, flow
        self.policy_version = 0
        self.window: tuple[int, int] | SlidingWindow | None = (
            SlidingWindow(flow.window_size, stride=flow.window_stride) if flow.window_size
            else tuple(flow.sde_window) if flow.sde_window is not None else None)

    def sample(self, prompts: Sequence[Any], seed: int, step: int) -> list[Tree]:
        f = self.flow
        trees = sample_flow_tree(
            list(prompts), self.rollout.depth, self.rollout.width, self.pipe,
            num_inference_steps=f.num_inference_steps, sde_window=self.window,
            noise_levels=f.noise_levels, guidance_scale=f.guidance_scale, seed=seed,
            sde=f.sde, train_step=step)
        for tree in trees:
            tree.policy_version = self.policy_version
        return trees

    def decode(self, trajectory: Trajectory) -> torch.Tensor:
        return leaf_image(trajectory)

    def costs(self, trees: Sequence[Tree]) -> list[float]:
        return [float(sum(t.stats.nfe for t in trees))]

    def cost_metrics(self, summed: Sequence[float]) -> dict[str, float]:
        return {"sample_nfe": summed[0]}

    def policy_updated(self) -> int:
        self.policy_version += 1
        return self.policy_version
