"""The torch cascade reference against naive softmax attention over each query's materialized KV."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import naive_attention, random_case
from tree_kernels import cascade as cascade_module
from tree_kernels.cascade import cascade_attention, resolve_impl
from tree_kernels.cascade_cpu import cascade_attention_cpu, group_layouts
from tree_kernels.cascade_reference import cascade_attention_torch
from tree_kernels.plan import Row, Segment, plan_cascade


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("prefill_rows", [0, 2])
def test_reference_matches_naive(depth, heads, kv_heads, prefill_rows):
    case = random_case(
        depth,
        width=3,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=8,
        prefill_rows=prefill_rows,
        seed=depth * 7 + heads + kv_heads,
    )
    plan = plan_cascade(case.segments, case.rows, case.block_size)
    out = cascade_attention(case.q, case.k_pool, case.v_pool, plan, 0.3, impl="torch")
    expected = naive_attention(case, 0.3)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_reference_bf16_within_tolerance():
    case = random_case(3, width=3, seed=11, dtype=torch.bfloat16)
    plan = plan_cascade(case.segments, case.rows, case.block_size)
    out = cascade_attention(case.q, case.k_pool, case.v_pool, plan, 0.25, impl="torch")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), naive_attention(case, 0.25), atol=2e-2, rtol=2e-2)


def test_plan_groups_batch_sharers_and_bound_padding():
    # 64 decode rows under one 100-key prompt: the prompt is one segment read by all 64 queries.
    segments = [Segment(blocks=list(range(25)), length=100)]
    rows = []
    for i in range(64):
        segments.append(Segment(blocks=[25 + i], length=1))
        rows.append(Row(q_start=i, q_len=1, path=[0, i + 1]))
    plan = plan_cascade(segments, rows, block_size=4)
    assert len(plan.groups) == 2
    prompt_group = plan.groups[0]
    assert prompt_group.q_index.shape == (1, 64)
    assert plan.groups[1].q_index.shape == (64, 1)


def test_bad_inputs_raise_clear_errors():
    segments = [Segment(blocks=[0], length=2)]
    with pytest.raises(ValueError, match="shorter than its row"):
        plan_cascade(segments, [Row(q_start=0, q_len=3, path=[0])], block_size=4)
    plan = plan_cascade(segments, [Row(q_start=0, q_len=1, path=[0])], block_size=4)
    pool = torch.zeros(4, 2, 8)
    with pytest.raises(ValueError, match="do not fit"):
        cascade_attention(torch.zeros(1, 3, 8), pool, pool, plan, 1.0)
    with pytest.raises(ValueError, match="plan is for 1 queries"):
        cascade_attention(torch.zeros(2, 2, 8), pool, pool, plan, 1.0)
    with pytest.raises(ValueError, match="expected one of"):
        resolve_impl("cuda", torch.device("cpu"))


def test_reference_impl_runs_the_plain_spec(monkeypatch):
    case = random_case(2, width=3, heads=4, kv_heads=2, head_dim=8, seed=4)
    plan = plan_cascade(case.segments, case.rows, case.block_size)
    calls = []
    real = cascade_module.cascade_attention_torch
    monkeypatch.setattr(
        cascade_module, "cascade_attention_torch", lambda *a: calls.append(1) or real(*a)
    )
    out = cascade_attention(case.q, case.k_pool, case.v_pool, plan, 0.3, impl="reference")
    assert calls == [1]
    torch.testing.assert_close(out.double(), naive_attention(case, 0.3), atol=1e-5, rtol=1e-5)
    cascade_attention(case.q, case.k_pool, case.v_pool, plan, 0.3, impl="torch")
    assert calls == [1], "impl='torch' on the CPU must take the fused path, not the spec"


@pytest.mark.parametrize("depth", [1, 2, 4])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 1)])
@pytest.mark.parametrize("prefill_rows", [0, 2])
def test_plain_reference_matches_naive(depth, heads, kv_heads, prefill_rows):
    # The public op runs the fused CPU path on CPU tensors; the plain spec must hold on its own.
    case = random_case(
        depth,
        width=3,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=8,
        prefill_rows=prefill_rows,
        seed=depth * 5 + kv_heads,
    )
    plan = plan_cascade(case.segments, case.rows, case.block_size)
    out = cascade_attention_torch(case.q, case.k_pool, case.v_pool, plan, 0.3)
    torch.testing.assert_close(out.double(), naive_attention(case, 0.3), atol=1e-5, rtol=1e-5)


def test_cpu_path_reads_contiguous_prefix_in_place_and_lse_matches():
    # The prompt moved to consecutive blocks 0.. (read as a view; sharing blocks with other
    # segments is harmless here), decode rows in shuffled blocks.
    case = random_case(1, width=5, heads=4, kv_heads=2, head_dim=8, max_len=40, seed=2)
    prompt = case.segments[0]
    case.segments[0] = Segment(blocks=list(range(len(prompt.blocks))), length=prompt.length)
    plan = plan_cascade(case.segments, case.rows, case.block_size)
    out, lse = cascade_attention_cpu(case.q, case.k_pool, case.v_pool, plan, 0.3, return_lse=True)
    ref_out, ref_lse = cascade_attention_torch(
        case.q, case.k_pool, case.v_pool, plan, 0.3, return_lse=True
    )
    assert group_layouts(plan)[0].first_slot == 0
    torch.testing.assert_close(out.double(), naive_attention(case, 0.3), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
