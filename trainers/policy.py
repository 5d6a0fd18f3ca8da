"""What a run kind ("text", "flow") hands the run loop before any update.

A kind's builder loads the trainable weights, a sampler, the task and (when a KL term is on) a
frozen reference, and says how to build its trainer once accelerate has prepared the optimizer.
The run loop (trainers/train.py) is otherwise the same for both kinds: generate, score, update,
report, checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .samplers import Sampler
from .tasks import Task

# (model as prepared, optimizer, LR scheduler, accelerator) -> a trainer with `.step(trees)`
TrainerFactory = Callable[[torch.nn.Module, torch.optim.Optimizer, Any, Any], Any]


@dataclass
class Policy:
    model: torch.nn.Module  # the trainable weights: optimized and checkpointed
    sampler: Sampler
    task: Task
    make_trainer: TrainerFactory
    wrap_model: bool = True  # let accelerate wrap the model (DDP); flow averages grads itself
