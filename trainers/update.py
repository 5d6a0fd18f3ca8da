"""The parts of one RL update that every kind's trainer shares (text `TreeTrainer`, `FlowTrainer`).

- Advantages are estimated over the trees of all processes (gathered as plain objects), so
  batch-level whitening (TreeRL, TreePO) and the loss normalizers are the same for any process
  count; each process then trains on its own share.
- Loss normalizers and logged sums are summed over processes on the CPU.
- The optimizer step ends the same way for every kind: clip, step, LR schedule, clear gradients,
  then the run loop's hook (the sampler's `policy_updated`), so nothing sampled under old weights
  is reused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from trees import Tree
from trees.advantages import AdvantageOptions, assign_advantages, compute_advantages

from .config import LossConfig


def assign_global_advantages(trees: Sequence[Tree], loss: LossConfig, accelerator: Any) -> None:
    """Estimate advantages over the trees of every process (text or flow); write them onto
    `trees`, this process's share."""
    options = AdvantageOptions(eps=loss.adv_eps)
    acc = accelerator
    if acc is None or acc.num_processes == 1:
        assign_advantages(trees, compute_advantages(trees, loss.estimator, options))
        return
    from accelerate.utils import gather_object

    everyone = gather_object([list(trees)])  # one list per process, in rank order
    offset = sum(len(t) for t in everyone[: acc.process_index])
    flat = [tree for part in everyone for tree in part]
    advs = compute_advantages(flat, loss.estimator, options)
    assign_advantages(trees, advs[offset : offset + len(trees)])


def sum_over_processes(x: torch.Tensor, accelerator: Any) -> torch.Tensor:
    """`x` summed over all processes (itself with one process), on the CPU."""
    if accelerator is None or accelerator.num_processes == 1:
        return x
    return accelerator.reduce(x.to(accelerator.device), reduction="sum").cpu()


def finish_update(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    grad_clip: float,
    on_optimizer_step: Callable[[], object] | None,
    clip_fn: Callable[..., object] = torch.nn.utils.clip_grad_norm_,
) -> None:
    """After backward: clip, step the optimizer and LR schedule, clear gradients, run the hook
    (the run loop's hook drops every KV computed under the old weights)."""
    if grad_clip > 0:
        clip_fn(model.parameters(), grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if on_optimizer_step is not None:
        on_optimizer_step()
