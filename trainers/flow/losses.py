"""Per-SDE-step losses for flow-matching trees (Flow-GRPO, Dynamic-TreeRPO), as pure functions.

A flow tree's trainable unit is one recorded SDE step x -> x' of one node (`FlowStep`): every
node's steps enter once, with the node's advantage, however many leaves lie below it; Euler steps
outside the window carry no log-probability and no loss. Per step, with the reduction `scale`
(1 for "sum", 1 / elements for "mean", trainers/flow/config.py) applied to both log-probs:

    rho  = exp(scale * (log p_theta(x' | x) - log p_old(x' | x)))
    pg   = POLICY_LOSSES[name](rho, A)            (the text trainer's clipped surrogate)
    kl   = scale * ||mu_theta - mu_ref||^2 / (2 std^2)   (exact: both Gaussians share std)
    sft  = LayerTuning-RL's weighted flow-matching term (trainers/flow/layer_tuning.py)
    loss = pg + beta kl + sft,   averaged over every unique SDE step of the batch

The KL is Flow-GRPO's closed form rather than the text trainer's k3 estimate: the step policies
are Gaussians with the same std, so the exact value is as cheap. Log-probs are fp32 throughout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rollout.flow import FlowStep, PromptEmbeds
from rollout.flow.pipeline import FlowPipeline, guided_velocity
from rollout.flow.sde import SDE_STEPS, StepGaussian, gaussian_logprob
from trees import Tree

from ..policy_losses import POLICY_LOSSES, ClipRange
from .layer_tuning import adaptive_clip, best_leaf, reflow_target, sft_term, sft_weights


@dataclass(frozen=True)
class StepBatch:
    """SDE steps of several nodes, trained together (one transformer call)."""

    steps: list[FlowStep]
    advantages: Tensor  # [N] the advantage of each step's node
    finals: Tensor  # [N, ...] final latents of the best leaf under each step's node (SFT target)
    scale: float  # log-prob reduction: 1.0 ("sum") or 1 / elements ("mean")

    @property
    def old_logprobs(self) -> Tensor:
        return torch.tensor([s.logprob for s in self.steps], dtype=torch.float32) * self.scale


def pack_steps(trees: Sequence[Tree], reduction: str, chunk: int) -> list[StepBatch]:
    """Every SDE step of every non-root node, in tree order, in batches of at most `chunk`."""
    rows = []
    for tree in trees:
        for node in tree.nodes():
            if node is tree.root or not node.steps:
                continue
            assert node.advantage is not None, f"node {node.id} has no advantage: assign first"
            final = best_leaf(node).meta["latents"]
            rows.extend((step, node.advantage, final) for step in node.steps)
    if not rows:
        raise ValueError("the trees hold no SDE steps: widen flow.sde_window or use noise > 0")
    numel = rows[0][0].latents.numel()
    scale = 1.0 if reduction == "sum" else 1.0 / numel
    return [
        StepBatch(
            steps=[r[0] for r in part],
            advantages=torch.tensor([r[1] for r in part], dtype=torch.float32),
            finals=torch.stack([r[2] for r in part]),
            scale=scale,
        )
        for part in (rows[i : i + chunk] for i in range(0, len(rows), chunk))
    ]


def _stack(rows: Sequence[PromptEmbeds]) -> PromptEmbeds:
    return PromptEmbeds({k: torch.cat([r.tensors[k] for r in rows]) for k in rows[0].tensors})


def step_velocity(pipe: FlowPipeline, steps: Sequence[FlowStep]) -> Tensor:
    """The (guided) velocity [N, ...] of the pipeline's current transformer at each step's x."""
    scales = {s.guidance_scale for s in steps}
    if len(scales) != 1:
        raise ValueError(f"steps mix guidance scales {sorted(scales)}: train them separately")
    device = pipe.device
    latents = torch.stack([s.latents for s in steps]).to(device)
    timestep = torch.tensor([s.timestep for s in steps], dtype=torch.float32, device=device)
    cond = _stack([s.cond for s in steps])
    uncond = _stack([s.uncond for s in steps]) if steps[0].uncond is not None else None
    return guided_velocity(pipe, latents, timestep, cond, uncond, scales.pop()).float()


def step_gaussians(steps: Sequence[FlowStep], velocity: Tensor) -> StepGaussian:
    """The SDE step's Gaussian under `velocity`, with each step's own sigma and noise level."""
    by_sde = {s.sde for s in steps}
    if len(by_sde) != 1:
        raise ValueError(f"steps mix SDE forms {sorted(by_sde)}: train each form separately")
    device = velocity.device

    def column(name: str) -> Tensor:
        return torch.tensor([getattr(s, name) for s in steps], dtype=torch.float32, device=device)

    latents = torch.stack([s.latents for s in steps]).to(device)
    return SDE_STEPS[by_sde.pop()](latents, velocity.float(), column("sigma"),
                                   column("sigma_next"), column("noise_level"),
                                   column("sigma_max"))


def step_logprobs(batch: StepBatch, gaussian: StepGaussian) -> Tensor:
    """scale * log p(x' | x) per step [N] (fp32)."""
    nexts = torch.stack([s.next_latents for s in batch.steps]).to(gaussian.mean.device)
    return gaussian_logprob(nexts, gaussian) * batch.scale


def gaussian_kl(gaussian: StepGaussian, ref_mean: Tensor, scale: float) -> Tensor:
    """KL(N(mu, s^2) || N(mu_ref, s^2)) = ||mu - mu_ref||^2 / (2 s^2) per step, times scale."""
    per_elem = (gaussian.mean - ref_mean.float()).pow(2) / (2 * gaussian.std**2)
    return per_elem.flatten(1).sum(dim=1) * scale


@dataclass(frozen=True)
class FlowLossTerms:
    """Sums over one batch of steps; divide by the global step count to get means."""

    loss_sum: Tensor  # differentiable
    pg_sum: Tensor
    kl_sum: Tensor
    sft_sum: Tensor
    clip_sum: Tensor
    count: Tensor


@dataclass(frozen=True)
class FlowLossOptions:
    policy_loss: str = "clipped"
    clip: ClipRange = ClipRange()
    kl_beta: float = 0.0
    sft_coef: float = 0.0
    adaptive_clip: float = 0.0


def flow_loss_terms(
    batch: StepBatch,
    velocity: Tensor,
    options: FlowLossOptions,
    ref_velocity: Tensor | None = None,
) -> FlowLossTerms:
    """The per-step loss of the module docstring, summed over `batch`."""
    gaussian = step_gaussians(batch.steps, velocity)
    device = gaussian.mean.device
    logp = step_logprobs(batch, gaussian)
    old, adv = batch.old_logprobs.to(device), batch.advantages.to(device)
    bounds = adaptive_clip(adv, options.clip, options.adaptive_clip)
    pg, active = POLICY_LOSSES[options.policy_loss](logp, old, adv, bounds)
    kl = torch.zeros_like(logp)
    if ref_velocity is not None and options.kl_beta > 0:
        ref = step_gaussians(batch.steps, ref_velocity)
        kl = gaussian_kl(gaussian, ref.mean, batch.scale)
    sft = torch.zeros_like(logp)
    if options.sft_coef > 0:
        latents = torch.stack([s.latents for s in batch.steps]).to(device)
        sigma = torch.tensor([s.sigma for s in batch.steps], device=device)
        target = reflow_target(latents, batch.finals.to(device), sigma)
        ratio = torch.exp(logp - old).detach()
        sft = sft_term(velocity, target, sft_weights(adv, options.sft_coef), ratio, bounds)
    total = pg + options.kl_beta * kl + sft
    return FlowLossTerms(
        loss_sum=total.sum(),
        pg_sum=pg.detach().sum(),
        kl_sum=kl.detach().sum(),
        sft_sum=sft.detach().sum(),
        clip_sum=active.float().sum(),
        count=torch.tensor(float(logp.numel())),
    )
