"""ALiBi in the cascade (`alibi=` slopes): against the naive oracle, and against Bloom's own
attention module on a branching tree (Bloom adds slope * key position to the scaled scores)."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import naive_attention, random_case
from test_cascade_reference import fuse_private_chains
from transformers import BloomConfig
from transformers.models.bloom.modeling_bloom import BloomAttention, build_alibi_tensor
from tree_kernels.cascade import cascade_attention
from tree_kernels.plan import Row, Segment, plan_cascade

SLOPES = torch.tensor([0.5, 0.25, 0.125, 0.0625])


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("impl", ["torch", "reference"])
@pytest.mark.parametrize("fused", [False, True])
def test_alibi_matches_naive(window, impl, fused):
    case = random_case(3, width=2, heads=4, kv_heads=2, head_dim=8, max_len=9, prefill_rows=2,
                       seed=5)
    if fused:
        case.segments, case.rows = fuse_private_chains(case)
    plan = plan_cascade(case.segments, case.rows, case.block_size, window=window)
    out = cascade_attention(case.q, case.k_pool, case.v_pool, plan, 0.3, impl=impl, alibi=SLOPES)
    expected = naive_attention(case, 0.3, window=window, alibi=SLOPES)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    # the biases matter at these positions (segments start past a few tokens)
    assert not torch.allclose(expected, naive_attention(case, 0.3, window=window), atol=1e-3)


def test_alibi_bad_slopes_raise():
    case = random_case(1, width=2, heads=4, kv_heads=2, head_dim=8, seed=1)
    plan = plan_cascade(case.segments, case.rows, case.block_size)
    with pytest.raises(ValueError, match="one float per query head"):
        cascade_attention(case.q, case.k_pool, case.v_pool, plan, 0.3, alibi=SLOPES[:3])


def test_alibi_tree_equals_blooms_own_attention():
    # A prompt of P tokens and two branches of C tokens each: the cascade reads the prompt once;
    # Bloom's module runs each branch as its own sequence (prompt + branch), eager, causal.
    cfg = BloomConfig(hidden_size=48, n_head=6, n_layer=1, attention_dropout=0.0)
    torch.manual_seed(0)
    attn = BloomAttention(cfg, layer_idx=0).eval()
    P, C, hidden = 7, 5, cfg.hidden_size
    prompt, branches = torch.randn(P, hidden), [torch.randn(C, hidden) for _ in range(2)]
    slopes = build_alibi_tensor(torch.ones(1, 2), cfg.n_head, torch.float32)[:, 0, 1]  # pos 1
    with torch.no_grad():
        own = []
        for branch in branches:
            hs = torch.cat([prompt, branch])[None]
            L = hs.shape[1]
            alibi = build_alibi_tensor(torch.ones(1, L), cfg.n_head, torch.float32)
            causal = torch.full((L, L), torch.finfo(torch.float32).min).triu(1)[None, None]
            out = attn(hs, torch.zeros_like(hs), alibi, causal)[0]
            own.append(out[0])
        # ours: every token's q, k, v from the same projection; the pool holds the prompt once
        tokens = torch.cat([prompt, *branches])[None]
        q, k, v = (x[0].transpose(0, 1) for x in attn._reshape(attn.query_key_value(tokens)))
        segments = [Segment(list(range(P)), P, start=0)] + [
            Segment(list(range(P + b * C, P + (b + 1) * C)), C, start=P) for b in range(2)
        ]
        rows = [Row(0, P, [0]), Row(P, C, [0, 1]), Row(P + C, C, [0, 2])]
        plan = plan_cascade(segments, rows, block_size=1)
        ctx = cascade_attention(q.contiguous(), k.contiguous(), v.contiguous(), plan,
                                attn.inv_norm_factor, alibi=slopes)
        ours = attn.dense(ctx.reshape(len(ctx), hidden))
    torch.testing.assert_close(ours[:P], own[0][:P], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[P : P + C], own[0][P:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[P + C :], own[1][P:], atol=1e-5, rtol=1e-5)
