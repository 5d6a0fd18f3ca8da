"""The native CPU op for small cascade groups (kernels/cascade_cpu_native.cpp) against the naive
oracle: alone, merged into earlier partials, and inside the CPU cascade path."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_cases import naive_attention, random_case
from tree_kernels import cascade_cpu_native
from tree_kernels.cascade_cpu import cascade_attention_cpu, group_layouts, merge_all
from tree_kernels.cascade_cpu_native import amx_attention, merge_group, native_enabled, native_op
from tree_kernels.cascade_cpu_schedule import schedule
from tree_kernels.plan import plan_cascade


def test_the_op_builds_on_this_machine():
    # CI installs a compiler and ninja: the tests below must run the native op, not skip it.
    assert native_op() is not None


def _naive_group(q, k_pool, v_pool, slots, q_index, q_first, q_limit, scale):
    """Each (query, head)'s softmax over its visible keys, in fp64: {(t, h): (out, lse)}."""
    heads, rep = q.shape[1], q.shape[1] // k_pool.shape[1]
    found = {}
    for s in range(slots.shape[0]):
        for n in range(q_index.shape[1]):
            t, a, b = int(q_index[s, n]), int(q_first[s, n]), int(q_limit[s, n])
            if t >= q.shape[0] or b <= a:
                continue
            keys = slots[s, a:b]
            for h in range(heads):
                k, v = k_pool[keys, h // rep].double(), v_pool[keys, h // rep].double()
                scores = (q[t, h].double() @ k.T) * scale
                found[(t, h)] = (torch.softmax(scores, 0) @ v, torch.logsumexp(scores, 0))
    return found


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "segments,queries,keys,heads,kv_heads,dim",
    [(5, 3, 20, 8, 2, 64), (4, 1, 37, 4, 4, 32), (3, 6, 9, 6, 2, 16), (2, 2, 40, 32, 1, 128)],
)
def test_op_matches_the_oracle_and_merges_exactly(dtype, segments, queries, keys, heads,
                                                  kv_heads, dim):
    # The vector path: an exact fp32 softmax whatever the pools' dtype.
    _check_group(dtype, segments, queries, keys, heads, kv_heads, dim, tiles=False,
                 out_tol=lambda v: 2e-6, lse_tol=2e-6)


# Each numerator rounded to bf16 (relative error u = 2^-9, plus the 2^t polynomial's 5e-5)
# moves the normalized weights by at most 2u / (1 - u) of themselves, so the output by at most
# that much of the largest |v|, and the log-sum-exp by at most log(1 + u).
@pytest.mark.parametrize(
    "segments,queries,keys,heads,kv_heads,dim",
    [(5, 3, 20, 8, 2, 64), (4, 1, 37, 4, 4, 32), (2, 2, 40, 32, 1, 128), (2, 5, 300, 8, 2, 64),
     (3, 7, 150, 6, 2, 32)],
)
def test_tiles_match_the_oracle_within_bf16_numerators(segments, queries, keys, heads, kv_heads,
                                                        dim):
    # 16-row passes (32 heads: two and more), more than one 64-key pass, ragged spans.
    if not amx_attention(dim):
        pytest.skip("this CPU has no AMX tiles")
    _check_group(torch.bfloat16, segments, queries, keys, heads, kv_heads, dim, tiles=True,
                 out_tol=lambda v: 4.2e-3 * float(v.abs().max()), lse_tol=2.1e-3)


def test_tiles_are_refused_where_they_do_not_apply():
    q = torch.randn(3, 4, 16)
    pool = torch.randn(10, 2, 16)
    acc, lse = torch.zeros(16, 16), torch.full((16,), float("-inf"))
    idx = torch.tensor([[0]])
    with pytest.raises(RuntimeError, match="tiles: AMX tiles take bf16"):
        merge_group(acc, lse, q, pool, pool, torch.tensor([[0, 1]]), idx, idx, idx + 2, 1.0,
                    tiles=True)


def _check_group(dtype, segments, queries, keys, heads, kv_heads, dim, tiles, out_tol, lse_tol):
    # Ragged visible spans [q_first, q_limit), a padding query, keys scattered over the pool;
    # GQA (rep 4, 1, 3), MQA with 32 heads (more stacked rows than one pass takes).
    gen = torch.Generator().manual_seed(segments * keys)
    T = segments * queries + 2
    q = torch.randn(T, heads, dim, generator=gen).to(dtype)
    k_pool = torch.randn(400, kv_heads, dim, generator=gen).to(dtype)
    v_pool = torch.randn(400, kv_heads, dim, generator=gen).to(dtype)
    slots = torch.randint(0, 400, (segments, keys), generator=gen)
    q_index = torch.randperm(T, generator=gen)[: segments * queries].view(segments, queries)
    q_index[0, -1] = T  # padding
    q_limit = torch.randint(1, keys + 1, (segments, queries), generator=gen)
    q_first = (q_limit - torch.randint(1, keys + 1, (segments, queries), generator=gen)).clamp(0)
    args = (q, k_pool, v_pool, slots, q_index, q_first, q_limit, 0.3)
    acc = torch.full(((T + 1) * heads, dim), float("nan"))  # overwritten where merged
    lse = torch.full(((T + 1) * heads,), float("-inf"))
    merge_group(acc, lse, *args, tiles=tiles)
    want = _naive_group(*args)
    rows = [t * heads + h for t, h in want]
    got_out, got_lse = acc[rows].double(), lse[rows].double()
    want_out = torch.stack([o for o, _ in want.values()])
    want_lse = torch.stack([s for _, s in want.values()])
    tol = out_tol(v_pool)
    torch.testing.assert_close(got_out, want_out, atol=tol, rtol=0)
    torch.testing.assert_close(got_lse, want_lse, atol=lse_tol, rtol=0)
    untouched = torch.ones_like(lse, dtype=torch.bool)
    untouched[rows] = False
    assert bool((lse[untouched] == float("-inf")).all())  # padding and unseen rows stay empty
    # Merged into itself: the same output, the log-sum-exp up by log 2 (METHODS.md's merge).
    before_out, before_lse = acc[rows].clone(), lse[rows].clone()
    merge_group(acc, lse, *args, tiles=tiles)
    torch.testing.assert_close(acc[rows], before_out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse[rows], before_lse + math.log(2), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("depth,prefill_rows", [(1, 0), (3, 0), (3, 2)])
def test_cpu_path_with_native_groups_matches_naive(monkeypatch, dtype, window, depth,
                                                   prefill_rows):
    # A tree of ragged segments: decode groups run natively, prefill groups and (with the op
    # off) everything on torch's kernels; both equal the oracle, on fp32 and bf16 pools.
    case = random_case(depth, width=3, heads=8, kv_heads=2, head_dim=32, max_len=12,
                       prefill_rows=prefill_rows, seed=depth + 7 * prefill_rows, dtype=dtype)
    plan = plan_cascade(case.segments, case.rows, case.block_size, window=window)
    layouts = group_layouts(plan, 4, native=True)
    assert any(lay.native for lay in layouts)
    want = naive_attention(case, 0.3, window=window)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the output is rounded to bf16
    # bf16 on AMX: decode groups of 8 rows and more on the tiles, numerators in bf16
    wide = dtype == torch.bfloat16 and amx_attention(32)
    tiled = [lay.tiles for lay in group_layouts(plan, 4, native=True, wide=wide)]
    eight_rows = any(4 * g.q_index.shape[1] >= 8 for g in plan.groups)  # 4 heads per KV head
    assert any(tiled) == (wide and eight_rows)
    results = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("TREE_ROLLOUTS_CPU_NATIVE", flag)
        out, lse = cascade_attention_cpu(case.q, case.k_pool, case.v_pool, plan, 0.3,
                                         return_lse=True)
        torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
        results[flag] = lse
    lse_tol = 2.1e-3 if wide else 1e-5  # see test_tiles_match_the_oracle_within_bf16_numerators
    torch.testing.assert_close(results["1"], results["0"], atol=lse_tol, rtol=1e-5)
    native_groups = [run for run in schedule(plan, 8, case.k_pool, native=True).groups
                     if run.layout.native]
    assert native_groups and all(run.q is None and run.k is None for run in native_groups)


def test_the_switch_is_checked(monkeypatch):
    monkeypatch.setenv("TREE_ROLLOUTS_CPU_NATIVE", "yes")
    with pytest.raises(ValueError, match="TREE_ROLLOUTS_CPU_NATIVE='yes'"):
        native_enabled()
    monkeypatch.setenv("TREE_ROLLOUTS_CPU_NATIVE", "0")
    assert native_op() is None


def test_a_failed_build_warns_once_and_the_torch_path_runs(monkeypatch):
    # No compiler (here: the builder raises): one warning naming the fix, then None, so
    # cascade_attention_cpu takes its torch path (equal to the oracle: the test above, op off).
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cascade_cpu_native, "_registered", lambda: None)
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.setattr(cascade_cpu_native, "_tried", False)
    monkeypatch.setattr(cascade_cpu_native, "_op", None)
    with pytest.warns(RuntimeWarning, match="Ninja is required.*pip install ninja"):
        assert native_op() is None
    assert native_op() is None  # tried once: no second build, no second warning
    case = random_case(2, width=3, heads=4, kv_heads=2, head_dim=16, seed=3)
    plan = plan_cascade(case.segments, case.rows, case.block_size)
    out = cascade_attention_cpu(case.q, case.k_pool, case.v_pool, plan, 0.3)
    torch.testing.assert_close(out.double(), naive_attention(case, 0.3), atol=1e-5, rtol=1e-5)


def test_indices_out_of_range_are_refused():
    q = torch.randn(3, 4, 16)
    pool = torch.randn(10, 2, 16)
    acc, lse = torch.zeros(16, 16), torch.full((16,), float("-inf"))
    slots = torch.tensor([[0, 1, 10]])  # slot 10 of a 10-slot pool
    index, first, limit = torch.tensor([[0]]), torch.tensor([[0]]), torch.tensor([[3]])
    with pytest.raises(RuntimeError, match="a slot is outside the pools"):
        merge_group(acc, lse, q, pool, pool, slots, index, first, limit, 1.0)
    with pytest.raises(RuntimeError, match="q_first, q_limit in"):
        merge_group(acc, lse, q, pool, pool, slots.clamp(max=9), index, first, limit + 1, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_groups_partials_scatter_as_the_torch_merge_does(dtype):
    # The single-part merge in one native pass: the same accumulators, bit for bit (rows no
    # partial reaches stay 0 / -inf), from fp32 or bf16 partials (widened exactly).
    assert native_op() is not None
    gen = torch.Generator().manual_seed(4)
    out, lse = torch.randn(12, 64, generator=gen).to(dtype), torch.randn(12, generator=gen)
    dest = torch.randperm(20, generator=gen)[:12]
    got = torch.ops.tree_kernels_cpu.scatter_partials(out, lse, dest, 20)
    want = merge_all([(out, lse)], dest, 20)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.float32 and torch.equal(g, w)
    assert torch.equal(got[1].isinf(), torch.ones(20, dtype=torch.bool).index_fill_(0, dest, 0))
    strided = torch.randn(12, 128, generator=gen).to(dtype)[:, ::2]  # made contiguous first
    torch.testing.assert_close(
        torch.ops.tree_kernels_cpu.scatter_partials(strided, lse, dest, 20)[0],
        merge_all([(strided, lse)], dest, 20)[0], rtol=0, atol=0,
    )
    with pytest.raises(RuntimeError, match="destination row is out of range"):
        torch.ops.tree_kernels_cpu.scatter_partials(out, lse, dest + 20, 20)


@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("src_dtype", [torch.float32, torch.bfloat16])
def test_pool_writes_match_the_torch_copies(monkeypatch, pool_dtype, src_dtype):
    # The step's keys arrive as a transposed view [T, KVH, D] of the model's [1, KVH, T, D];
    # the native write rounds to the pool's dtype exactly as the torch copy does.
    from rollout.engine.block_pool import BlockPool

    # write_states takes the model's layout as it is; both must fill the same slots.
    gen = torch.Generator().manual_seed(3)
    pools = {}
    for flag, method in (("0", "write"), ("1", "write"), ("1", "write_states")):
        monkeypatch.setenv("TREE_ROLLOUTS_CPU_NATIVE", flag)
        pool = BlockPool(num_layers=3, num_blocks=6, block_size=4, kv_heads=2, head_dim=24,
                         dtype=pool_dtype)
        gen.manual_seed(3)
        for layer in (2, 0):
            k4 = torch.randn(1, 2, 7, 24, generator=gen).to(src_dtype)
            v4 = torch.randn(1, 2, 7, 24, generator=gen).to(src_dtype)
            k, v = (k4, v4) if method == "write_states" else (k4[0].transpose(0, 1),
                                                              v4[0].transpose(0, 1))
            getattr(pool, method)(layer, torch.tensor([5, 0, 23, 9, 10, 11, 2]), k, v)
        pools[flag, method] = pool
    torch_pool = pools["0", "write"]
    assert torch_pool.k.abs().sum() > 0
    for native in (pools["1", "write"], pools["1", "write_states"]):
        torch.testing.assert_close(native.k, torch_pool.k, rtol=0, atol=0)
        torch.testing.assert_close(native.v, torch_pool.v, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="outside the pools"):
        pools["1", "write_states"].write_states(0, torch.tensor([24]), k4[:, :, :1], v4[:, :, :1])
