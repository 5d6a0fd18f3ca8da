"""The SDE step kernels against the written formulas (METHODS.md), and sampled moments."""

from __future__ import annotations

import math

import pytest
import torch

from rollout.flow.sde import (
    SDE_STEPS,
    dance_grpo_gaussian,
    euler_step,
    flow_grpo_gaussian,
    gaussian_logprob,
    sde_sample,
)


def _case(n: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 4, 4, generator=gen), torch.randn(n, 2, 4, 4, generator=gen)


@pytest.mark.parametrize("sde", sorted(SDE_STEPS))
def test_zero_noise_is_the_euler_step(sde):
    x, v = _case()
    s, s_next = torch.tensor(0.8), torch.tensor(0.6)
    gaussian = SDE_STEPS[sde](x, v, s, s_next, 0.0, 0.9)
    torch.testing.assert_close(gaussian.mean, euler_step(x, v, s, s_next), atol=1e-6, rtol=0)
    assert float(gaussian.std.max()) == 0.0


@pytest.mark.parametrize("s,s_next,sigma_max", [(0.8, 0.6, 0.9), (1.0, 0.9, 0.9), (0.1, 0.0, 0.9)])
def test_flow_grpo_matches_the_written_formula(s, s_next, sigma_max):
    x, v = _case()
    a, dt = 0.7, s_next - s
    std = a * math.sqrt(s / (1 - (sigma_max if s == 1.0 else s)))
    mean = x * (1 + std**2 / (2 * s) * dt) + v * (1 + std**2 * (1 - s) / (2 * s)) * dt
    gaussian = flow_grpo_gaussian(x, v, s, s_next, a, sigma_max)
    torch.testing.assert_close(gaussian.mean, mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gaussian.std.flatten(), torch.full((3,), std * math.sqrt(-dt)))
    x_next = mean + 0.3
    tot = std * math.sqrt(-dt)
    log_norm = math.log(tot) + math.log(math.sqrt(2 * math.pi))
    per_elem = -((x_next - mean) ** 2) / (2 * tot**2) - log_norm
    torch.testing.assert_close(gaussian_logprob(x_next, gaussian), per_elem.flatten(1).sum(1))


def test_dance_grpo_matches_the_written_formula():
    x, v = _case()
    s, s_next, eta = 0.7, 0.5, 0.4
    x0 = x - s * v
    score = -(x - (1 - s) * x0) / s**2
    mean = x + (s_next - s) * v - 0.5 * eta**2 * score * (s_next - s)
    gaussian = dance_grpo_gaussian(x, v, s, s_next, eta, 0.9)
    torch.testing.assert_close(gaussian.mean, mean, atol=1e-6, rtol=1e-6)
    expected_std = torch.full((3,), eta * math.sqrt(s - s_next))
    torch.testing.assert_close(gaussian.std.flatten(), expected_std)


def test_per_row_sigmas_and_noise_levels():
    x, v = _case()
    sig, nxt, a = torch.tensor([1.0, 0.5, 0.2]), torch.tensor([0.8, 0.3, 0.0]), [0.0, 0.5, 1.0]
    batched = flow_grpo_gaussian(x, v, sig, nxt, torch.tensor(a), 0.8)
    for r in range(3):
        one = flow_grpo_gaussian(x[r : r + 1], v[r : r + 1], sig[r], nxt[r], a[r], 0.8)
        torch.testing.assert_close(batched.mean[r : r + 1], one.mean)
        torch.testing.assert_close(batched.std[r : r + 1], one.std)


@pytest.mark.parametrize("sde", sorted(SDE_STEPS))
def test_sampled_moments_match_the_gaussian(sde):
    gen = torch.Generator().manual_seed(3)
    x, v = _case(1, seed=4)
    n = 20000
    gaussian = SDE_STEPS[sde](x.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1), 0.6, 0.45, 0.8, 0.9)
    samples = sde_sample(gaussian, torch.randn(n, 2, 4, 4, generator=gen))
    std = float(gaussian.std[0])
    torch.testing.assert_close(samples.mean(0), gaussian.mean[0], atol=5 * std / math.sqrt(n),
                               rtol=0)
    torch.testing.assert_close(samples.var(0), torch.full_like(x[0], std**2),
                               atol=5 * std**2 * math.sqrt(2 / n), rtol=0)
    # log-density of samples: E[log p] = -d/2 - d log(std) - d log sqrt(2 pi) for d elements.
    d = x[0].numel()
    expected = -d / 2 - d * math.log(std) - d * 0.5 * math.log(2 * math.pi)
    lp = gaussian_logprob(samples, gaussian)
    assert abs(float(lp.mean()) - expected) < 5 * math.sqrt(d / 2) / math.sqrt(n)
