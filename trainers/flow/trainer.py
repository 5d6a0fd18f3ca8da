"""One RL update of a flow-matching model from scored flow trees (Flow-GRPO / Dynamic-TreeRPO).

The flow counterpart of `TreeTrainer`, with the same phases and the same contract with the run
loop: advantages (the text estimators, over the trees of every process) -> the SDE steps of every
node, packed once per node -> one transformer call per micro-batch -> the per-step loss of
trainers/flow/losses.py -> optimizer step -> `on_optimizer_step` (the sampler's policy version).
Design decisions:
- The transformer is driven through the pipeline adapter (`FlowPipeline.predict_velocity`, the
  code the sampler runs), so recomputed log-probs equal the recorded ones bit for bit in fp32.
  Because that call reaches the bare module, gradients are averaged over processes explicitly
  after backward rather than by a DDP wrapper.
- The loss is a mean over the unique SDE steps of all processes' trees (each node's steps once).
- The KL reference is a frozen copy of the transformer, swapped into the pipeline for its call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from rollout.flow.pipeline import FlowPipeline
from trees import Tree

from ..config import LossConfig
from ..policy_losses import ClipRange
from ..update import assign_global_advantages, finish_update, sum_over_processes
from .config import FlowConfig
from .losses import FlowLossOptions, StepBatch, flow_loss_terms, pack_steps, step_velocity

_TERMS = ("loss_sum", "pg_sum", "kl_sum", "sft_sum", "clip_sum", "count")


@contextmanager
def using_transformer(pipe: FlowPipeline, module: torch.nn.Module) -> Iterator[None]:
    """Run `pipe` with `module` as its transformer inside the block (the KL reference)."""
    own = pipe.transformer
    pipe.transformer = module
    try:
        yield
    finally:
        pipe.transformer = own


class FlowTrainer:
    """Flow-GRPO (depth-1 trees) and Dynamic-TreeRPO updates of `model`, `pipe`'s transformer."""

    def __init__(
        self,
        pipe: FlowPipeline,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loss: LossConfig,
        flow: FlowConfig,
        *,
        scheduler: Any = None,
        ref_model: torch.nn.Module | None = None,
        updates_per_batch: int = 1,
        grad_clip: float = 1.0,
        accelerator: Any = None,
        on_optimizer_step: Callable[[], Any] | None = None,
    ) -> None:
        if loss.kl_beta > 0 and ref_model is None:
            raise ValueError(f"loss.kl_beta={loss.kl_beta} needs ref_model= (a frozen copy)")
        if loss.aggregation != "token":
            raise ValueError(f"loss.aggregation={loss.aggregation!r}: flow losses average over "
                             "the unique SDE steps of the batch; use token")
        self.pipe, self.model, self.optimizer, self.scheduler = pipe, model, optimizer, scheduler
        self.loss, self.flow, self.ref_model = loss, flow, ref_model
        self.updates_per_batch, self.grad_clip = updates_per_batch, grad_clip
        self.accelerator, self.on_optimizer_step = accelerator, on_optimizer_step
        self.options = FlowLossOptions(
            policy_loss=loss.policy_loss,
            clip=ClipRange(loss.clip_low, loss.clip_high),
            kl_beta=loss.kl_beta,
            sft_coef=flow.layer_tuning.sft_coef,
            adaptive_clip=flow.layer_tuning.adaptive_clip,
        )

    def assign_advantages(self, trees: Sequence[Tree]) -> None:
        assign_global_advantages(trees, self.loss, self.accelerator)

    def _pack(self, trees: Sequence[Tree]) -> tuple[list[StepBatch], float]:
        batches = pack_steps(trees, self.flow.logprob_reduction, self.flow.micro_batch_steps)
        local = torch.tensor([float(sum(len(b.steps) for b in batches))])
        return batches, sum_over_processes(local, self.accelerator)[0].item()

    def _ref_velocities(self, batches: list[StepBatch]) -> list[torch.Tensor | None]:
        if self.ref_model is None or self.loss.kl_beta == 0:
            return [None] * len(batches)
        with torch.no_grad(), using_transformer(self.pipe, self.ref_model):
            return [step_velocity(self.pipe, b.steps) for b in batches]

    def _terms(self, batch: StepBatch, ref: torch.Tensor | None):
        return flow_loss_terms(batch, step_velocity(self.pipe, batch.steps), self.options, ref)

    def _average_gradients(self) -> None:
        acc = self.accelerator
        if acc is None or acc.num_processes == 1:
            return
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad = acc.reduce(p.grad, reduction="mean")

    def _update(self, batches: list[StepBatch], refs: list, norm: float) -> torch.Tensor:
        """One optimizer step over all micro-batches; returns the summed terms [6]."""
        world = 1 if self.accelerator is None else self.accelerator.num_processes
        sums = torch.zeros(len(_TERMS))
        for batch, ref in zip(batches, refs, strict=True):
            terms = self._terms(batch, ref)
            (terms.loss_sum * (world / norm)).backward()
            sums += torch.stack([getattr(terms, k).detach().float().cpu() for k in _TERMS])
        self._average_gradients()
        finish_update(self.model, self.optimizer, self.scheduler, self.grad_clip,
                      self.on_optimizer_step)
        return sums

    def loss_value(self, trees: Sequence[Tree]) -> float:
        """The loss on already-advantaged `trees` under the current weights (no update)."""
        batches, norm = self._pack(trees)
        refs = self._ref_velocities(batches)
        with torch.no_grad():
            local = sum(self._terms(b, r).loss_sum for b, r in zip(batches, refs, strict=True))
        return sum_over_processes(local.reshape(1).cpu(), self.accelerator)[0].item() / norm

    def step(self, trees: Sequence[Tree]) -> dict[str, float]:
        """Advantages, then `updates_per_batch` optimizer steps on the trees' SDE steps."""
        if not trees:
            raise ValueError("FlowTrainer.step: got no trees")
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        self.assign_advantages(trees)
        batches, norm = self._pack(trees)
        refs = self._ref_velocities(batches)
        first = last = None
        for _ in range(self.updates_per_batch):
            last = self._update(batches, refs, norm)
            first = last if first is None else first
        self.model.eval()
        return self._metrics(batches, first, last)

    def _metrics(self, batches: list[StepBatch], first: torch.Tensor, last: torch.Tensor):
        adv = torch.cat([b.advantages for b in batches])
        local = torch.cat([first[:4], last[4:5], torch.stack([adv.sum(), (adv**2).sum(),
                                                              torch.tensor(float(adv.numel()))])])
        g = sum_over_processes(local, self.accelerator)
        n = g[7].clamp_min(1)
        mean = g[5] / n
        return {
            "loss": (g[0] / n).item(),
            "pg_loss": (g[1] / n).item(),
            "kl": (g[2] / n).item(),
            "sft_loss": (g[3] / n).item(),
            "clip_frac": (g[4] / n).item(),
            "adv_mean": mean.item(),
            "adv_std": (g[6] / n - mean**2).clamp_min(0).sqrt().item(),
            "train_nfe": g[7].item(),
        }
