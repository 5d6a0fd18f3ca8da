"""Flow-matching tree rollouts (Dynamic-TreeRPO) for diffusers flow-matching pipelines.

`sample_flow_tree` samples one `trees.Tree` per prompt; `FlowStep`s on the nodes hold what a
trainer needs to recompute each SDE step's log-probability (`recompute_logprobs`);
`save_flow_trees` / `load_flow_trees` move them between processes. Pipelines: diffusers' SD3 and
Flux pipelines, or the tiny digits model (`load_digits_pipeline`) with its classifier reward
(`DigitReward`, decode leaves with `leaf_image`), which need no download.
"""

from __future__ import annotations

from .classifier import DigitReward, leaf_image
from .digits import DigitsPipeline, load_digits_pipeline
from .flux import FluxAdapter
from .pipeline import FlowPipeline, PromptEmbeds, SD3Adapter, as_flow_pipeline
from .sampler import sample_flow_tree
from .sde import SDE_STEPS, euler_step, gaussian_logprob
from .serialize import flow_tree_from_dict, flow_tree_to_dict, load_flow_trees, save_flow_trees
from .spec import FlowTreeSpec, SlidingWindow, build_spec, default_noise_levels
from .steps import FlowStep, recompute_logprobs, step_logprobs

__all__ = [
    "SDE_STEPS",
    "DigitReward",
    "DigitsPipeline",
    "FluxAdapter",
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
    "flow_tree_from_dict",
    "flow_tree_to_dict",
    "gaussian_logprob",
    "leaf_image",
    "load_digits_pipeline",
    "load_flow_trees",
    "recompute_logprobs",
    "sample_flow_tree",
    "save_flow_trees",
    "step_logprobs",
]
