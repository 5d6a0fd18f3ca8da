"""The `kind: text` run: a causal LM, the text engine (or a rollout service), a task, `TreeTrainer`.

`python -m trainers.train --config configs/toy_tree_grpo.yaml` goes through the shared run loop
(trainers/train.py); this module only builds the text parts. The sampler is the in-process
`rollout.Engine` unless `rollout.server` names a service or fleet; then the trainer factory swaps
in a `RemoteTextSampler` once accelerate exists (it needs to know the main process), and every
optimizer step uploads the weights there.
"""

from __future__ import annotations

from typing import Any

import torch

from rollout import Engine

from ..config import RunConfig
from ..policy import Policy, frozen_copy
from .models import load_policy
from .samplers import RemoteTextSampler, TextSampler
from .tasks import build_task
from .trainer import TreeTrainer


def build_text_policy(cfg: RunConfig) -> Policy:
    """A causal LM and its tokenizer, the text engine, the task, `TreeTrainer`."""
    model, tokenizer = load_policy(cfg)
    task = build_task(cfg, tokenizer)
    ref = frozen_copy(model) if cfg.loss.kl_beta > 0 else None
    sampler: TextSampler = TextSampler(
        Engine(model, tokenizer, kv_budget=cfg.rollout.kv_budget), tokenizer, cfg.rollout
    )

    def make_trainer(prepared: torch.nn.Module, opt: Any, sched: Any, acc: Any) -> TreeTrainer:
        nonlocal sampler
        if cfg.rollout.server is not None:  # sample on a service or fleet, not in-process
            sampler = policy.sampler = RemoteTextSampler(model, tokenizer, cfg.rollout, acc)
        return tree_trainer(cfg, prepared, opt, sched, acc, ref, sampler.policy_updated, tokenizer)

    policy = Policy(model, sampler, task, make_trainer)
    return policy


def tree_trainer(
    cfg: RunConfig, prepared: torch.nn.Module, opt: Any, sched: Any, acc: Any,
    ref: torch.nn.Module | None, on_optimizer_step: Any, tokenizer: Any,
) -> TreeTrainer:
    """`TreeTrainer` as the config says (text and agent runs), once accelerate has prepared."""
    return TreeTrainer(
        prepared,
        opt,
        cfg.loss,
        scheduler=sched,
        ref_model=ref.to(acc.device) if ref is not None else None,
        temperature=cfg.rollout.temperature,
        micro_batch_trees=cfg.train.micro_batch_trees,
        updates_per_batch=cfg.train.updates_per_batch,
        grad_clip=cfg.optim.grad_clip,
        accelerator=acc,
        on_optimizer_step=on_optimizer_step,
        pad_token_id=getattr(tokenizer, "pad_token_id", None) or 0,
    )
