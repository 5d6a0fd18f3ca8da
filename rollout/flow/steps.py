"""One recorded SDE step of a flow tree, and how a trainer recomputes its log-probability.

A node's `steps` hold `FlowStep`s for the SDE steps it took (Euler steps outside the window carry no
log-probability and are not recorded). A step keeps everything the trainer needs to score it again
under new weights: the latents before and after, the timestep and sigmas, the noise level it was
sampled with (the same scaled std must be used to score it), the guidance scale, and a reference
to its prompt's embeddings (shared by all steps of a tree, not copied).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .pipeline import FlowPipeline, PromptEmbeds, guided_velocity
from .sde import SDE_STEPS, gaussian_logprob


@dataclass(frozen=True)
class FlowStep:
    """An SDE step x -> x' of one node. Latents are fp32, without the batch dim."""

    index: int  # step index in the schedule
    timestep: float  # the transformer's timestep input (scheduler units, sigma * 1000)
    sigma: float
    sigma_next: float
    sigma_max: float  # the schedule's second sigma: the SDE's std at s = 1 uses it
    noise_level: float
    sde: str
    guidance_scale: float
    latents: Tensor  # x   [C, H, W]
    next_latents: Tensor  # x'  [C, H, W]
    logprob: float  # log p(x' | x), summed over elements (see rollout/flow/sde.py)
    cond: PromptEmbeds  # this prompt's embeddings, one row
    uncond: PromptEmbeds | None  # the negative embeddings when guided, one row


def step_logprobs(steps: Sequence[FlowStep], velocity: Tensor) -> Tensor:
    """log p(x' | x) for `steps` given the velocities [N, ...] a model predicts for them: [N] fp32.

    Differentiable in `velocity`: a trainer runs its model on the stored latents, then this.
    """
    latents = torch.stack([s.latents for s in steps]).to(velocity.device)
    nexts = torch.stack([s.next_latents for s in steps]).to(velocity.device)
    by_sde = {s.sde for s in steps}
    if len(by_sde) != 1:
        raise ValueError(f"steps mix SDE forms {sorted(by_sde)}: score each form separately")
    sde = SDE_STEPS[by_sde.pop()]

    def column(name: str) -> Tensor:
        return torch.tensor([getattr(s, name) for s in steps], dtype=torch.float32,
                            device=velocity.device)

    gaussian = sde(latents, velocity, column("sigma"), column("sigma_next"),
                   column("noise_level"), column("sigma_max"))
    return gaussian_logprob(nexts, gaussian)


def recompute_logprobs(pipe: FlowPipeline, steps: Sequence[FlowStep]) -> Tensor:
    """Re-run the model on the stored inputs of `steps` (any mix of trees and step indices, one
    batch) and return their log-probabilities [N]; equals the recorded `logprob` under the same
    weights."""
    if not steps:
        return torch.zeros(0)
    scales = {s.guidance_scale for s in steps}
    if len(scales) != 1:
        raise ValueError(f"steps mix guidance scales {sorted(scales)}: score each separately")
    device = pipe.device
    latents = torch.stack([s.latents for s in steps]).to(device)
    timestep = torch.tensor([s.timestep for s in steps], dtype=torch.float32, device=device)
    cond = _stack_embeds([s.cond for s in steps])
    guided = steps[0].uncond is not None
    uncond = _stack_embeds([s.uncond for s in steps]) if guided else None
    velocity = guided_velocity(pipe, latents, timestep, cond, uncond, scales.pop())
    return step_logprobs(steps, velocity.float())


def _stack_embeds(rows: Sequence[PromptEmbeds | None]) -> PromptEmbeds:
    assert all(r is not None for r in rows), "some steps are guided and some are not"
    keys = rows[0].tensors.keys()
    return PromptEmbeds({k: torch.cat([r.tensors[k] for r in rows]) for k in keys})
