"""One RL update from scored trees: advantages -> packed forward -> loss -> optimizer step.

The trainer takes trees, not a sampler, so any loop that calls `rollout.sample_tree` and
`rollout.score_trees` can hand its trees to `TreeTrainer.step`. Flat GRPO is the same code on
depth-1 trees. Design decisions:
- Advantages are computed over the trees of all processes (trainers/update.py), so
  batch-level whitening (TreeRL, TreePO) and the loss normalizers are the same for any process
  count; each process then trains on its own trees and accelerate averages the gradients.
- Old log-probs are the sampler's, recorded at the sampling temperature; the training forward uses
  the same temperature, so on-policy ratios are 1 up to rounding.
- `on_optimizer_step` runs after every optimizer step (with several updates per batch, after each
  one); the run loop passes `engine.policy_updated`, so no KV from old weights is ever reused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch

from trees import Tree

from ..config import LossConfig
from ..policy_losses import ClipRange
from ..update import assign_global_advantages, finish_update, sum_over_processes
from .forward import packed_logprobs
from .losses import AGGREGATIONS, LossTerms, loss_terms
from .packing import PackedBatch, pack_trees


def _chunks(items: Sequence[Tree], size: int) -> list[Sequence[Tree]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class TreeTrainer:
    """GRPO / tree-GRPO updates on a policy (optionally wrapped by `accelerate`)."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loss: LossConfig,
        *,
        scheduler: Any = None,
        ref_model: torch.nn.Module | None = None,
        temperature: float = 1.0,
        micro_batch_trees: int = 4,
        updates_per_batch: int = 1,
        grad_clip: float = 1.0,
        accelerator: Any = None,
        on_optimizer_step: Callable[[], Any] | None = None,
        pad_token_id: int = 0,
    ) -> None:
        if loss.kl_beta > 0 and ref_model is None:
            raise ValueError(f"loss.kl_beta={loss.kl_beta} needs ref_model= (a frozen copy)")
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.loss, self.ref_model, self.temperature = loss, ref_model, temperature
        self.micro_batch_trees, self.updates_per_batch = micro_batch_trees, updates_per_batch
        self.grad_clip, self.accelerator = grad_clip, accelerator
        self.on_optimizer_step, self.pad_token_id = on_optimizer_step, pad_token_id
        self.clip = ClipRange(loss.clip_low, loss.clip_high)

    # 1. advantages --------------------------------------------------------------------------
    def assign_advantages(self, trees: Sequence[Tree]) -> None:
        """Estimate advantages over the trees of every process; write them onto `trees`."""
        assign_global_advantages(trees, self.loss, self.accelerator)

    # 2. packing and the global normalizer ---------------------------------------------------
    def _pack(self, trees: Sequence[Tree]) -> tuple[list[PackedBatch], float]:
        batches = [
            pack_trees(chunk, self.pad_token_id) for chunk in _chunks(trees, self.micro_batch_trees)
        ]
        local = sum(AGGREGATIONS[self.loss.aggregation](b)[1] for b in batches)
        return batches, self._sum_over_processes(torch.tensor([local]))[0].item()

    def _sum_over_processes(self, x: torch.Tensor) -> torch.Tensor:
        return sum_over_processes(x, self.accelerator)

    # 3. loss ------------------------------------------------------------------------------
    def _ref_logprobs(self, batches: list[PackedBatch]) -> list[torch.Tensor | None]:
        if self.ref_model is None or self.loss.kl_beta == 0:
            return [None] * len(batches)
        with torch.no_grad():
            return [packed_logprobs(self.ref_model, b, self.temperature) for b in batches]

    def _terms(self, batch: PackedBatch, ref: torch.Tensor | None) -> LossTerms:
        logp = packed_logprobs(self.model, batch, self.temperature)
        weights, _ = AGGREGATIONS[self.loss.aggregation](batch)
        return loss_terms(
            logp,
            batch,
            weights,
            policy_loss=self.loss.policy_loss,
            clip=self.clip,
            kl_beta=self.loss.kl_beta,
            ref_logp=ref,
        )

    def _update(self, batches: list[PackedBatch], refs: list, norm: float) -> torch.Tensor:
        """One optimizer step over all micro-batches; returns summed [loss, pg, kl, clip, w]."""
        acc = self.accelerator
        world = 1 if acc is None else acc.num_processes
        sums = torch.zeros(5)
        for i, (batch, ref) in enumerate(zip(batches, refs, strict=True)):
            last = i == len(batches) - 1
            sync = acc.no_sync(self.model) if (acc is not None and not last) else nullcontext()
            with sync:
                terms = self._terms(batch, ref)
                loss = terms.loss_sum * (world / norm)
                if acc is not None:
                    acc.backward(loss)
                else:
                    loss.backward()
            sums += torch.stack(
                [
                    terms.loss_sum.detach(),
                    terms.pg_sum,
                    terms.kl_sum,
                    terms.clip_sum,
                    terms.weight_sum,
                ]
            ).cpu()
        clip = acc.clip_grad_norm_ if acc is not None else torch.nn.utils.clip_grad_norm_
        finish_update(self.model, self.optimizer, self.scheduler, self.grad_clip,
                      self.on_optimizer_step, clip)
        return sums

    def loss_value(self, trees: Sequence[Tree]) -> float:
        """The loss on already-advantaged `trees` under the current policy (no update)."""
        batches, norm = self._pack(trees)
        refs = self._ref_logprobs(batches)
        with torch.no_grad():
            local = sum(self._terms(b, r).loss_sum for b, r in zip(batches, refs, strict=True))
        return self._sum_over_processes(local.reshape(1).cpu())[0].item() / norm

    def step(self, trees: Sequence[Tree]) -> dict[str, float]:
        """Advantages, then `updates_per_batch` optimizer steps on `trees`; returns metrics."""
        if not trees:
            raise ValueError("TreeTrainer.step: got no trees")
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)  # gradients from elsewhere must not leak in
        self.assign_advantages(trees)
        batches, norm = self._pack(trees)
        refs = self._ref_logprobs(batches)
        first = None
        for _ in range(self.updates_per_batch):
            sums = self._update(batches, refs, norm)
            first = sums if first is None else first
        self.model.eval()
        return self._metrics(batches, first, sums)

    def _metrics(self, batches: list[PackedBatch], first: torch.Tensor, last: torch.Tensor):
        adv = torch.cat([b.advantages for b in batches])
        local = torch.stack(
            [
                first[0],
                first[1],
                first[2],
                last[3],
                last[4],
                adv.sum(),
                (adv**2).sum(),
                torch.tensor(float(adv.numel())),
                torch.tensor(float(sum(b.num_input_tokens for b in batches))),
            ]
        )
        g = self._sum_over_processes(local)
        norm = self._sum_over_processes(
            torch.tensor([sum(AGGREGATIONS[self.loss.aggregation](b)[1] for b in batches)])
        )[0]
        mean = g[5] / g[7]
        return {
            "loss": (g[0] / norm).item(),
            "pg_loss": (g[1] / norm).item(),
            "kl": (g[2] / norm).item(),
            "clip_frac": (g[3] / g[4].clamp_min(1e-12)).item(),
            "adv_mean": mean.item(),
            "adv_std": (g[6] / g[7] - mean**2).clamp_min(0).sqrt().item(),
            "train_tokens": g[8].item(),
            "target_tokens": g[7].item(),
        }
