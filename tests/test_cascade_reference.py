"""The torch cascade reference against naive softmax attention over each query's materialized KV."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import CascadeCase, naive_attention, random_case
from tree_kernels import cascade as cascade_module
from tree_kernels import cascade_cpu
from tree_kernels.cascade import add_sinks, cascade_attention, resolve_impl
from tree_kernels.cascade_cpu import cascade_attention_cpu, group_layouts
from tree_kernels.cascade_reference import cascade_attention_torch
from tree_kernels.plan import Row, Segment, fuse, plan_cascade


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
        cascade_module,
        "cascade_attention_torch",
        lambda *a, **kw: calls.append(1) or real(*a, **kw),
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


@pytest.mark.parametrize("stride_blocks", [0, 3, 5])
def test_cpu_path_reads_evenly_spaced_prompts_in_place(stride_blocks):
    # Two 10-key prompts (3 blocks of 4) at blocks 2.. and 2 + stride.. (0: one prompt's blocks
    # read by two segments; 5: a gap between them), 3 decode leaves each in shuffled blocks of
    # their own: the prompts' group is one strided view of the pool, no gather.
    gen = torch.Generator().manual_seed(stride_blocks)
    block_size, heads, kv_heads, d = 4, 4, 2, 8
    prompts = [Segment([2 + i * stride_blocks + j for j in range(3)], 10) for i in range(2)]
    free = (20 + torch.randperm(12, generator=gen)).tolist()
    leaves = [Segment(free[2 * i : 2 * i + 2], 1 + (5 * i) % 7, start=10) for i in range(6)]
    rows = [Row(q_start=i, q_len=1, path=[i // 3, 2 + i]) for i in range(6)]
    k_pool = torch.randn(32 * block_size, kv_heads, d, generator=gen)
    v_pool = torch.randn(32 * block_size, kv_heads, d, generator=gen)
    q = torch.randn(6, heads, d, generator=gen)
    case = CascadeCase(q, k_pool, v_pool, prompts + leaves, rows, block_size)
    plan = plan_cascade(case.segments, rows, block_size)
    layout = group_layouts(plan, heads // kv_heads)[0]
    assert (layout.first_slot, layout.slot_stride) == (2 * block_size, stride_blocks * block_size)
    out, lse = cascade_attention_cpu(q, k_pool, v_pool, plan, 0.3, return_lse=True)
    _, ref_lse = cascade_attention_torch(q, k_pool, v_pool, plan, 0.3, return_lse=True)
    torch.testing.assert_close(out.double(), naive_attention(case, 0.3), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [1, 3, 8])
@pytest.mark.parametrize("depth,prefill_rows", [(1, 2), (3, 0), (3, 2)])
@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_sliding_window_matches_naive(window, depth, prefill_rows, impl):
    # Paths of up to ~40 keys against windows of 1-8: queries reach past several segments.
    case = random_case(3, width=3, heads=4, kv_heads=2, head_dim=8, max_len=10,
                       prefill_rows=prefill_rows, seed=window * 3 + depth)
    plan = plan_cascade(case.segments, case.rows, case.block_size, window=window)
    out = cascade_attention(case.q, case.k_pool, case.v_pool, plan, 0.3, impl=impl)
    expected = naive_attention(case, 0.3, window=window)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected, naive_attention(case, 0.3)), "the window must bite"


def test_window_drops_segments_no_query_reaches():
    # prompt (positions 0-19) -> node (20-29) -> leaf decoding at 30: window 5 sees 26..30 only.
    segments = [Segment([0, 1, 2, 3, 4], 20, start=0), Segment([5, 6, 7], 10, start=20),
                Segment([8], 1, start=30)]
    plan = plan_cascade(segments, [Row(0, 1, [0, 1, 2])], block_size=4, window=5)
    assert [g.max_kv_len for g in plan.groups] == [10, 1]
    assert plan.groups[0].q_first.tolist() == [[6]] and plan.groups[0].masked
    full = plan_cascade(segments, [Row(0, 1, [0, 1, 2])], block_size=4)
    assert len(full.groups) == 3 and not any(g.masked for g in full.groups)
    with pytest.raises(ValueError, match="window=0"):
        plan_cascade(segments, [Row(0, 1, [0, 1, 2])], block_size=4, window=0)


@pytest.mark.parametrize("window", [None, 4])
def test_softcap_matches_naive_and_sinks_fold_into_the_lse(window):
    # softcap runs the plain reference even for impl="torch" (the fused CPU path takes masks only)
    case = random_case(3, width=3, heads=4, kv_heads=2, head_dim=8, prefill_rows=2, seed=9)
    plan = plan_cascade(case.segments, case.rows, case.block_size, window=window)
    q = case.q * 4  # scores of several units, so the cap bends them
    case.q = q
    out, lse = cascade_attention(q, case.k_pool, case.v_pool, plan, 0.3, impl="torch",
                                 softcap=2.0, return_lse=True)
    expected = naive_attention(case, 0.3, window=window, softcap=2.0)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected, naive_attention(case, 0.3, window=window), atol=1e-3)
    # a sink is one more softmax logit with value 0: attend over [keys..., a zero key of logit s]
    sinks = torch.tensor([-1.0, 0.0, 0.5, 2.0])
    sunk, _ = add_sinks(out, lse, sinks)
    torch.testing.assert_close(sunk, out * torch.sigmoid(lse - sinks)[..., None])
    with pytest.raises(ValueError, match="softcap=0"):
        cascade_attention(q, case.k_pool, case.v_pool, plan, 0.3, softcap=0.0)


def fuse_private_chains(case):
    """The case's segments with each row's private tail (segments no other row reads) fused."""
    readers = {}
    for row in case.rows:
        for seg_id in row.path:
            readers[seg_id] = readers.get(seg_id, 0) + 1
    segments, rows = list(case.segments), []
    for row in case.rows:
        cut = len(row.path)
        while cut > 0 and readers[row.path[cut - 1]] == 1:
            cut -= 1
        path = list(row.path)
        if len(path) - cut >= 2:
            segments.append(fuse([case.segments[s] for s in path[cut:]], case.block_size))
            path = path[:cut] + [len(segments) - 1]
        rows.append(Row(row.q_start, row.q_len, path))
    return segments, rows


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("impl", ["torch", "reference"])
@pytest.mark.parametrize("seed", range(4))
def test_fused_private_chains_read_slot_tables_exactly(window, impl, seed):
    # depth-4 trees of width <= 2: many rows own a chain of several segments below the fork
    case = random_case(4, width=2, heads=4, kv_heads=2, head_dim=8, max_len=7,
                       prefill_rows=seed % 3, seed=40 + seed)
    segments, rows = fuse_private_chains(case)
    assert any(s.slots is not None for s in segments), "the case should fuse a chain"
    plan = plan_cascade(segments, rows, case.block_size, window=window)
    assert any(g.slot_table is not None for g in plan.groups)
    out = cascade_attention(case.q, case.k_pool, case.v_pool, plan, 0.3, impl=impl)
    expected = naive_attention(case, 0.3, window=window)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("chunk", [3, 256])
@pytest.mark.parametrize("stored", [0, 5])
def test_cpu_prefill_groups_run_the_kernels_causal_case_exactly(stored, chunk, in_place,
                                                                monkeypatch):
    # Two prompts of one length prefill in one step (one group of two segments), each chunk
    # behind `stored` keys already in the pool: the group is the kernel's causal case, no mask.
    # Its queries attend CAUSAL_CHUNK at a time: 3 splits the 8 or 13 queries unevenly. The
    # prompts' blocks are shuffled (gathered) or consecutive (read in place).
    monkeypatch.setattr(cascade_cpu, "CAUSAL_CHUNK", chunk)
    block_size, heads, kv_heads, d, length = 4, 4, 2, 8, 13
    gen = torch.Generator().manual_seed(stored)
    n_blocks = 2 * -(-length // block_size) + 1
    order = list(range(n_blocks)) if in_place else torch.randperm(n_blocks, generator=gen).tolist()
    per = -(-length // block_size)
    segments = [Segment(order[i * per : (i + 1) * per], length, start=3) for i in range(2)]
    q_len = length - stored
    rows = [Row(q_start=i * q_len, q_len=q_len, path=[i]) for i in range(2)]
    k_pool = torch.randn(n_blocks * block_size, kv_heads, d, generator=gen)
    v_pool = torch.randn(n_blocks * block_size, kv_heads, d, generator=gen)
    q = torch.randn(2 * q_len, heads, d, generator=gen)
    case = CascadeCase(q, k_pool, v_pool, segments, rows, block_size)
    plan = plan_cascade(segments, rows, block_size)
    (layout,) = group_layouts(plan, heads // kv_heads)
    assert layout.causal_at == stored and layout.mask is None
    assert (layout.first_slot is not None) == in_place
    out, lse = cascade_attention_cpu(q, k_pool, v_pool, plan, 0.3, return_lse=True)
    _, ref_lse = cascade_attention_torch(q, k_pool, v_pool, plan, 0.3, return_lse=True)
    torch.testing.assert_close(out.double(), naive_attention(case, 0.3), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
