"""The per-branch sampler against softmax frequencies, and the block pool's refcounting."""

from __future__ import annotations

import pytest
import torch
from tree_kernels.fused_cpu import fused_available

from rollout.engine.block_pool import BlockPool, PoolExhausted
from rollout.engine.sampling import draw_inverse_cdf, filter_logprobs, sample, uniform_noise


def test_noise_is_a_pure_function_of_key_and_column():
    keys = torch.tensor([5, 17, 5])
    u = uniform_noise(keys, 1000)
    assert torch.equal(u[0], u[2]) and not torch.equal(u[0], u[1])
    assert torch.equal(uniform_noise(keys[1:2], 1000)[0], u[1])
    big = uniform_noise(torch.arange(200) * 7919, 5000)
    assert 0 < big.min() and big.max() < 1
    assert abs(big.mean().item() - 0.5) < 0.005 and abs(big.var().item() - 1 / 12) < 0.002


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(1.0, 0, 1.0), (0.5, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.7)]
)
def test_sample_frequencies_match_the_filtered_softmax(temperature, top_k, top_p):
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0, 0.5])
    n = 40_000
    drawn = sample(logits.repeat(n, 1), torch.arange(n) * 104729 + 1, temperature, top_k, top_p)
    probs = torch.softmax(logits / temperature, dim=-1)
    order = probs.argsort(descending=True)
    keep = torch.zeros(5, dtype=torch.bool)
    if top_k:
        keep[order[:top_k]] = True
    elif top_p < 1:
        before = torch.cumsum(probs[order], 0) - probs[order]
        keep[order[before < top_p]] = True
    else:
        keep[:] = True
    target = torch.where(keep, probs, torch.zeros_like(probs))
    target = target / target.sum()
    freq = torch.bincount(drawn.tokens, minlength=5).float() / n
    torch.testing.assert_close(freq, target, atol=0.01, rtol=0)
    torch.testing.assert_close(drawn.logprobs, torch.log(probs)[drawn.tokens], atol=1e-6, rtol=0)


@pytest.mark.parametrize("rows,vocab", [(1, 1), (3, 7), (9, 100), (40, 4096), (11, 50257)])
def test_native_draw_gives_the_torch_draws_bits(rows, vocab):
    # sample_cpu.cpp against draw_inverse_cdf (cumsum in double, searchsorted, clamp), exactly:
    # a token at a cumulative-probability boundary must not move, nor a log-prob's last bit.
    if not fused_available():
        pytest.skip("the native CPU library is not built here")
    gen = torch.Generator().manual_seed(rows)
    for scale in (0.05, 1.0, 20.0):  # near-uniform rows, typical ones, and near one-hot ones
        logits = torch.randn(rows, vocab, generator=gen) * scale
        if vocab > 5:
            logits[:, ::5] = float("-inf")  # a masked vocabulary
        logp = torch.log_softmax(logits, -1)
        for allowed in (logp, filter_logprobs(logp, 5, 1.0), filter_logprobs(logp, 0, 0.7)):
            keys = torch.randint(-(2**62), 2**62, (rows,), generator=gen)
            tokens, chosen = torch.ops.tree_kernels_cpu.sample_rows(allowed, logp, keys)
            want_tokens, want_chosen = draw_inverse_cdf(allowed, logp, keys)
            assert torch.equal(tokens, want_tokens)
            assert torch.equal(chosen, want_chosen)
            assert bool((allowed.gather(1, tokens[:, None]) > float("-inf")).all())


def test_native_draw_refuses_what_it_does_not_take():
    if not fused_available():
        pytest.skip("the native CPU library is not built here")
    op = torch.ops.tree_kernels_cpu.sample_rows
    logp = torch.zeros(2, 3)
    with pytest.raises(RuntimeError, match="allowed must be fp32"):
        op(logp.double(), logp, torch.zeros(2, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="keys must be int64"):
        op(logp, logp, torch.zeros(3, dtype=torch.int64))


def test_pool_refcounts_and_exhaustion():
    pool = BlockPool(num_layers=2, num_blocks=4, block_size=2, kv_heads=1, head_dim=4)
    a = pool.allocate(2)
    pool.share(a)
    pool.release(a)
    assert pool.used_blocks == 2
    pool.release(a)
    assert pool.used_blocks == 0 and pool.peak_used == 2
    pool.allocate(4)
    with pytest.raises(PoolExhausted, match="asked for 1 KV blocks, 0 of 4 free"):
        pool.allocate(1)
    assert pool.bytes_per_block == 2 * 2 * 2 * 1 * 4 * 4
