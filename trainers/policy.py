"""What a run kind ("text", "flow") hands the run loop before any update, and what kinds share.

A kind's builder (trainers/text/run.py, trainers/flow/run.py) loads the trainable weights, a
`Sampler`, a `Task` and (when a KL term is on) a `frozen_copy` reference, and says how to build its
trainer once accelerate has prepared the optimizer; the run loop (trainers/train.py) is otherwise
the same for both kinds. A sampler draws this process's trees, decodes a leaf for the reward,
counts costs in its own unit (`CostKeys`: policy-forward tokens for text, network function
evaluations for flow, so a benchmark can plot reward against either) and forgets the old policy
after an optimizer step. A task's prompts are a pure function of (seed, step) (`step_rng`), so a
resumed run sees the prompts the uninterrupted run would have; its reward is one batched call
(`rollout.RewardFunction`) on all decoded completions of a step.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from rollout import RewardFunction
from trees import Trajectory, Tree

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # `model.dtype` -> torch dtype


@dataclass(frozen=True)
class CostKeys:
    """Metric names: the sampler's per-step cost, the trainer's, the running total, the rate."""

    sample: str
    train: str
    total: str
    rate: str


class Sampler(Protocol):
    cost_keys: CostKeys
    policy_version: int

    def sample(self, prompts: Sequence[Any], seed: int, step: int) -> list[Tree]: ...
    def decode(self, trajectory: Trajectory) -> Any: ...
    def costs(self, trees: Sequence[Tree]) -> list[float]: ...
    def cost_metrics(self, summed: Sequence[float]) -> dict[str, float]: ...
    def policy_updated(self) -> int: ...


@dataclass(frozen=True)
class Task:
    prompts: Callable[[int, int], list[Any]]  # (step, n) -> n prompts
    reward_fn: RewardFunction


def step_rng(seed: int, step: int) -> random.Random:
    """The random source of one step's prompts: the same (seed, step), the same prompts."""
    return random.Random(seed * 1_000_003 + step)


# (model as prepared, optimizer, LR scheduler, accelerator) -> a trainer with `.step(trees)`
TrainerFactory = Callable[[torch.nn.Module, torch.optim.Optimizer, Any, Any], Any]


@dataclass
class Policy:
    model: torch.nn.Module  # the trainable weights: optimized and checkpointed
    sampler: Sampler
    task: Task
    make_trainer: TrainerFactory
    wrap_model: bool = True  # let accelerate wrap the model (DDP); flow averages grads itself


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A reference policy: same weights, no gradients, eval mode."""
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref
