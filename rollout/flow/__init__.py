"""Flow-matching tree rollouts (Dynamic-TreeRPO) for diffusers flow-matching pipelines.

`sample_flow_tree` samples one `trees.Tree` per prompt; `FlowStep`s on the nodes hold what a
trainer needs to recompute each SDE step's log-probability (`recompute_logprobs`). The tiny
digits model (`load_digits_pipeline`) and its classifier reward (`DigitReward`) need no download.
"""

from __future__ import annotations

from .pipeline import FlowPipeline, PromptEmbeds, SD3Adapter, as_flow_pipeline
from .sampler import sample_flow_tree
from .sde import SDE_STEPS, euler_step, gaussian_logprob
from .spec import FlowTreeSpec, SlidingWindow, build_spec, default_noise_levels
from .steps import FlowStep, recompute_logprobs, step_logprobs

__all__ = [
    "SDE_STEPS",
    "FlowPipeline",
    "FlowStep",
    "FlowTreeSpec",
    "PromptEmbeds",
    "SD3Adapter",
    "SlidingWindow",
    "as_flow_pipeline",
    "build_spec",
    "default_noise_levels",
    "euler_step",
    "gaussian_logprob",
    "recompute_logprobs",
    "sample_flow_tree",
    "step_logprobs",
]
