"""The `kind: flow` run: a flow-matching pipeline, its tree sampler, an image task, `FlowTrainer`.

`python -m trainers.train --config configs/digits_tree.yaml` goes through the same run loop as
text (trainers/train.py); this module only builds the flow parts. Checked before any model loads:
the task is a flow task, and the tree shape fits the flow schedule.
"""

from __future__ import annotations

from typing import Any

import torch

from rollout.flow import build_spec

from ..config import RunConfig
from ..policy import Policy, frozen_copy
from .models import load_flow_policy
from .sampler import FlowSampler
from .tasks import FLOW_TASKS, check_prompt_file
from .trainer import FlowTrainer


def check_flow_config(cfg: RunConfig) -> None:
    """ValueErrors for a flow run that cannot work, before anything is loaded."""
    if cfg.task.name not in FLOW_TASKS:
        raise ValueError(f"task.name={cfg.task.name!r} is not a flow task; with kind: flow "
                         f"choose one of {sorted(FLOW_TASKS)}")
    if cfg.task.name == "prompt_file":
        check_prompt_file(cfg)
    if cfg.loss.aggregation != "token":
        raise ValueError(f"loss.aggregation={cfg.loss.aggregation!r}: flow losses average over "
                         "the unique SDE steps of the batch; use token")
    f = cfg.flow
    if f.window_size > f.num_inference_steps:
        raise ValueError(f"flow.window_size={f.window_size}: at most "
                         f"flow.num_inference_steps={f.num_inference_steps}")
    if f.window_size:
        window: tuple[int, int] | None = (0, f.window_size)
    else:
        window = tuple(f.sde_window) if f.sde_window is not None else None
    # guidance is unknown until the pipeline loads; the scale does not change the shape checks
    build_spec(cfg.rollout.depth, cfg.rollout.width, f.num_inference_steps, window,
               f.noise_levels, 1.0, sde=f.sde)


def build_flow_policy(cfg: RunConfig) -> Policy:
    """Pipeline (only its transformer trains), sampler, task, trainer factory."""
    check_flow_config(cfg)
    pipe, transformer = load_flow_policy(cfg)
    task = FLOW_TASKS[cfg.task.name](cfg, None)
    sampler = FlowSampler(pipe, cfg.rollout, cfg.flow)
    ref = frozen_copy(transformer) if cfg.loss.kl_beta > 0 else None

    def make_trainer(model: torch.nn.Module, opt: Any, sched: Any, acc: Any) -> FlowTrainer:
        return FlowTrainer(
            pipe, model, opt, cfg.loss, cfg.flow,
            scheduler=sched,
            ref_model=ref,
            updates_per_batch=cfg.train.updates_per_batch,
            grad_clip=cfg.optim.grad_clip,
            accelerator=acc,
            on_optimizer_step=sampler.policy_updated,
        )

    return Policy(transformer, sampler, task, make_trainer, wrap_model=False)
