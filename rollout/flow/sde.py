"""The flow-matching step kernels: deterministic Euler and the SDE steps RL samples with.

Free functions over a scheduler's sigma table (not a scheduler subclass), so a tree can step any
set of branches at any step index: diffusers' `FlowMatchEulerDiscreteScheduler.step` keeps an
internal step index that advances on every call and cannot be shared by branches. Everything is
computed in fp32 whatever dtype the transformer runs in (bf16 overflows in `std^2 / (2 s)` and the
squared residuals of the log-probability).

NOTE: log-probabilities are SUMMED over the elements of one latent: the value is the true log
density of the step, so `exp(logp_new - logp_old)` is the true ratio. Flow-GRPO averages instead;
a trainer that wants its scale divides by `latents[0].numel()`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


class StepGaussian(NamedTuple):
    """The Gaussian of one SDE step: x' ~ N(mean, std^2 I); `std` is per row, shape [N, 1, ...]."""

    mean: Tensor
    std: Tensor


def _per_row(value: Tensor | float, like: Tensor) -> Tensor:
    """Broadcast a scalar or a [N] vector against `like` ([N, ...]) as fp32 [N, 1, ...]."""
    t = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if t.ndim == 0:
        t = t.expand(like.shape[0])
    return t.reshape(like.shape[0], *([1] * (like.ndim - 1)))


def euler_step(latents: Tensor, velocity: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """x' = x + (s' - s) v in fp32: the arithmetic of `FlowMatchEulerDiscreteScheduler.step`."""
    dt = sigma_next - sigma
    return latents.float() + dt * velocity.float()


def flow_grpo_gaussian(
    latents: Tensor,
    velocity: Tensor,
    sigma: Tensor | float,
    sigma_next: Tensor | float,
    noise_level: Tensor | float,
    sigma_max: Tensor | float,
) -> StepGaussian:
    """Flow-GRPO's SDE step (Liu et al. 2025, eq. 9 with the std of their released sampler).

        std_t = a * sqrt(s / (1 - s))         (s = 1 uses `sigma_max`, the schedule's second sigma)
        mean  = x (1 + std_t^2 / (2 s) dt) + v (1 + std_t^2 (1 - s) / (2 s)) dt,   dt = s' - s < 0
        x'    = mean + std_t sqrt(-dt) eps

    Shapes: latents, velocity [N, ...]; sigma, sigma_next, noise_level scalars or [N].
    """
    x, v = latents.float(), velocity.float()
    s, s_next = _per_row(sigma, x), _per_row(sigma_next, x)
    a = _per_row(noise_level, x)
    dt = s_next - s
    denom = torch.where(s >= 1.0, 1.0 - _per_row(sigma_max, x), 1.0 - s)
    std_t = a * torch.sqrt(s / denom)
    mean = x * (1 + std_t**2 / (2 * s) * dt) + v * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
    return StepGaussian(mean, std_t * torch.sqrt(-dt))


def dance_grpo_gaussian(
    latents: Tensor,
    velocity: Tensor,
    sigma: Tensor | float,
    sigma_next: Tensor | float,
    noise_level: Tensor | float,
    sigma_max: Tensor | float,
) -> StepGaussian:
    """DanceGRPO / BranchGRPO's SDE step, with `noise_level` as their eta.

        x0_hat = x - s v;  score = -(x - (1 - s) x0_hat) / s^2
        mean   = x + dt v - eta^2 / 2 * score * dt;  std = eta sqrt(s - s')
    """
    del sigma_max  # the form needs no special case at s = 1
    x, v = latents.float(), velocity.float()
    s, s_next = _per_row(sigma, x), _per_row(sigma_next, x)
    eta = _per_row(noise_level, x)
    dt = s_next - s
    x0_hat = x - s * v
    score = -(x - (1 - s) * x0_hat) / s**2
    mean = x + dt * v - 0.5 * eta**2 * score * dt
    return StepGaussian(mean, eta * torch.sqrt(-dt))


# (latents, velocity, sigma, sigma_next, noise_level, sigma_max) -> StepGaussian
SdeFn = Callable[..., StepGaussian]

# The SDE forms a tree may sample with; `FlowTreeSpec.sde` names one.
SDE_STEPS: dict[str, SdeFn] = {"flow_grpo": flow_grpo_gaussian, "dance_grpo": dance_grpo_gaussian}


def gaussian_logprob(sample: Tensor, gaussian: StepGaussian) -> Tensor:
    """log N(sample; mean, std^2 I), summed over all elements but the first dim: [N] fp32."""
    mean, std = gaussian
    z = (sample.float() - mean) / std
    per_elem = -0.5 * z**2 - torch.log(std) - _LOG_SQRT_2PI  # [N, ...]
    return per_elem.flatten(1).sum(dim=1)


def sde_sample(gaussian: StepGaussian, noise: Tensor) -> Tensor:
    """x' = mean + std * eps for standard-normal `noise` [N, ...]."""
    return gaussian.mean + gaussian.std * noise.float()
