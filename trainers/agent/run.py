"""The `kind: agent` run: a causal LM plays multi-turn episodes against the task's environment.

Everything but sampling is the text run's: the packed tree forward (observation tokens are inputs,
never targets: trainers/text/packing.py), `TreeTrainer`, its losses and tree advantages from the
leaves' rewards, which the environment gives. `model.name: toy` builds the toy calculator policy
(trainers/agent/toy_task.py); any other name loads a transformers causal LM.
"""

from __future__ import annotations

from typing import Any

import torch

from rollout import Engine

from ..config import RunConfig
from ..policy import Policy, frozen_copy
from ..text.models import load_policy
from ..text.run import tree_trainer
from ..text.trainer import TreeTrainer
from .sampler import AgentSampler
from .tasks import build_agent_task
from .toy_task import build_toy_agent_policy


def _load(cfg: RunConfig) -> tuple[torch.nn.Module, Any]:
    if cfg.model.name == "toy":
        return build_toy_agent_policy(
            cfg.model.pretrain_steps, cfg.train.seed, cfg.model.attn_implementation
        )
    return load_policy(cfg)


def build_agent_policy(cfg: RunConfig) -> Policy:
    """The policy and tokenizer, the engine with the task's environment, `TreeTrainer`."""
    if cfg.rollout.server is not None:
        raise ValueError(
            "rollout.server with kind: agent: the environment runs in the trainer's process and a "
            "service cannot call it; drop rollout.server"
        )
    model, tokenizer = _load(cfg)
    task = build_agent_task(cfg, tokenizer)
    ref = frozen_copy(model) if cfg.loss.kl_beta > 0 else None
    engine = Engine(model, tokenizer, kv_budget=cfg.rollout.kv_budget)
    sampler = AgentSampler(engine, tokenizer, cfg.rollout, cfg.agent, task.env)

    def make_trainer(prepared: torch.nn.Module, opt: Any, sched: Any, acc: Any) -> TreeTrainer:
        return tree_trainer(cfg, prepared, opt, sched, acc, ref, sampler.policy_updated, tokenizer)

    return Policy(model, sampler, task, make_trainer)
