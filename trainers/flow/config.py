"""The `flow:` section of a run config: how flow-matching trees are sampled and scored in training.

Kept apart from trainers/config.py because only `kind: flow` runs read it; `RunConfig` nests it
(`flow.num_inference_steps=6`, `flow.layer_tuning.sft_coef=0.5` work as dotted overrides). The
tree shape itself (depth, width per level) stays in `rollout:`, shared with text trees.

Design decisions:
- The SDE window is either fixed (`sde_window: [start, end]`) or sliding (`window_size` > 0):
  Dynamic-TreeRPO slides its window over training, here by the training step (a sweep with
  `window_stride`), so a resumed run sees the same windows as an uninterrupted one.
- `logprob_reduction` decides the scale of every step log-probability the loss sees. The sampler
  records the SUM over latent elements (the true density, rollout/flow/sde.py); "mean" divides
  both the recorded and the recomputed value by the element count, as Flow-GRPO does, which keeps
  ratios near 1 on megapixel latents. Both sides are always treated alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

LOGPROB_REDUCTIONS = ("sum", "mean")


def _need(cond: bool, key: str, value: object, fix: str) -> None:
    if not cond:
        raise ValueError(f"{key}={value!r}: {fix}")


@dataclass(frozen=True)
class LayerTuningConfig:
    """Dynamic-TreeRPO's LayerTuning-RL (trainers/flow/layer_tuning.py); both parts off at 0."""

    sft_coef: float = 0.0  # weight of the process-reward-weighted SFT term (0 = off)
    adaptive_clip: float = 0.0  # kappa: how far a node's clip bound widens with |A| (0 = fixed)

    def __post_init__(self) -> None:
        for key, value in (
            ("flow.layer_tuning.sft_coef", self.sft_coef),
            ("flow.layer_tuning.adaptive_clip", self.adaptive_clip),
        ):
            _need(math.isfinite(value) and value >= 0, key, value, "use a finite value >= 0")


@dataclass(frozen=True)
class FlowConfig:
    num_inference_steps: int = 10
    sde_window: list[int] | None = None  # [start, end) step indices; None: first half
    window_size: int = 0  # > 0: a sliding window of this many steps (overrides sde_window)
    window_stride: int = 1  # steps the sliding window moves per training step
    noise_levels: list[float] | None = None  # one per tree depth; None: 1.0, 0.7, 0.49, ...
    guidance_scale: float | None = None  # None: the pipeline's default; <= 1: no CFG
    sde: str = "flow_grpo"  # a key of rollout.flow.SDE_STEPS
    logprob_reduction: str = "sum"
    image_size: list[int] | None = None  # [height, width] for diffusers pipelines
    micro_batch_steps: int = 256  # SDE steps per training forward
    layer_tuning: LayerTuningConfig = field(default_factory=LayerTuningConfig)

    def __post_init__(self) -> None:
        from rollout.flow import SDE_STEPS

        _need(self.num_inference_steps >= 1, "flow.num_inference_steps",
              self.num_inference_steps, "use >= 1")
        _need(self.sde_window is None or len(self.sde_window) == 2, "flow.sde_window",
              self.sde_window, "give [start, end] step indices, or leave it out")
        _need(self.window_size >= 0, "flow.window_size", self.window_size,
              "use 0 (fixed window) or the sliding window's size in steps")
        _need(self.window_stride >= 1, "flow.window_stride", self.window_stride, "use >= 1")
        _need(self.sde in SDE_STEPS, "flow.sde", self.sde, f"choose one of {sorted(SDE_STEPS)}")
        _need(self.logprob_reduction in LOGPROB_REDUCTIONS, "flow.logprob_reduction",
              self.logprob_reduction, f"choose one of {list(LOGPROB_REDUCTIONS)}")
        _need(self.image_size is None or len(self.image_size) == 2, "flow.image_size",
              self.image_size, "give [height, width]")
        _need(self.micro_batch_steps >= 1, "flow.micro_batch_steps", self.micro_batch_steps,
              "use >= 1")
