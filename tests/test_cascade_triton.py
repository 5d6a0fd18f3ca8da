"""The Triton cascade kernels, run by the interpreter on the CPU, against the naive oracle.

Shapes stay tiny: the interpreter costs milliseconds per block operation. The interpreter computes
bf16 arithmetic wrongly (NaN sums, large dot errors; see FIELD-NOTES), so under it the launcher
converts bf16 inputs to fp32 right after loading: bf16 loads and stores are tested here, bf16
products only on a GPU. fp32 and fp16 run exactly as on a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from kernel_cases import naive_attention, random_case
from tree_kernels.cascade import cascade_attention
from tree_kernels.cascade_reference import cascade_attention_torch
from tree_kernels.cascade_triton import cascade_attention_triton
from tree_kernels.plan import Row, Segment, plan_cascade

if not torch.cuda.is_available():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def run(case, scale: float, **kwargs) -> torch.Tensor:
    plan = plan_cascade(case.segments, case.rows, case.block_size)
    return cascade_attention_triton(case.q, case.k_pool, case.v_pool, plan, scale, **kwargs)


def check(case, scale: float, **kwargs) -> None:
    out = run(case, scale, **kwargs)
    assert out.dtype == case.q.dtype and out.shape == case.q.shape
    tol = TOL[case.q.dtype]
    torch.testing.assert_close(out.double(), naive_attention(case, scale), atol=tol, rtol=tol)


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("prefill_rows", [0, 2])
def test_tree_depths_gqa_fp32(depth, heads, kv_heads, prefill_rows):
    # Ragged segments of 1-9 keys in blocks of 4, decode rows and causal prefill chunks.
    case = random_case(depth, width=2, heads=heads, kv_heads=kv_heads, head_dim=16,
                       prefill_rows=prefill_rows, seed=10 * depth + kv_heads + prefill_rows)
    check(case, 0.3)


@pytest.mark.parametrize("depth", [1, 3])
def test_causal_prefill_chunks_with_key_splits(depth):
    # Segments up to 40 keys, cut into 16-key splits: several partials per query and segment, and
    # causal rows whose later splits are empty.
    case = random_case(depth, width=2, heads=2, kv_heads=2, head_dim=16, max_len=40,
                       block_size=8, prefill_rows=2, seed=depth)
    check(case, 0.25, split_len=16)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_larger_head_dims(head_dim):
    case = random_case(2, width=2, heads=2, kv_heads=1, head_dim=head_dim, seed=head_dim)
    check(case, head_dim**-0.5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("depth", [2, 4])
def test_half_precision_within_tolerance(depth, dtype):
    # bf16 runs its loads, pointer math and bf16 stores here; its products run in fp32 (see the
    # module doc), so the bf16 matrix product itself is only exercised on a GPU.
    case = random_case(depth, width=2, heads=4, kv_heads=2, head_dim=16, prefill_rows=1,
                       seed=depth, dtype=dtype)
    check(case, 0.3)


def test_mqa_rep_wider_than_tile_and_odd_heads():
    # 24 query heads on one KV head: the tile widens past 16 rows; 6 heads of 2 KV heads: rep 3
    # does not divide the tile, whose trailing rows stay idle.
    for heads, kv_heads in [(24, 1), (6, 2)]:
        case = random_case(2, width=2, heads=heads, kv_heads=kv_heads, head_dim=16, seed=heads)
        check(case, 0.3)


@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_block_sizes_and_lse_matches_reference(block_size):
    case = random_case(2, width=3, heads=4, kv_heads=2, head_dim=16, block_size=block_size,
                       max_len=20, seed=5)
    plan = plan_cascade(case.segments, case.rows, case.block_size)
    out, lse = cascade_attention_triton(case.q, case.k_pool, case.v_pool, plan, 0.3,
                                        return_lse=True)
    ref_out, ref_lse = cascade_attention_torch(case.q, case.k_pool, case.v_pool, plan, 0.3,
                                               return_lse=True)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_public_op_dispatches_to_triton_and_reuses_the_plan():
    case = random_case(3, width=2, heads=4, kv_heads=2, head_dim=16, seed=3)
    plan = plan_cascade(case.segments, case.rows, case.block_size)
    first = cascade_attention(case.q, case.k_pool, case.v_pool, plan, 0.3, impl="triton")
    assert len(plan.derived) == 1  # the work list is derived once per plan ...
    second = cascade_attention(case.q, case.k_pool, case.v_pool, plan, 0.3, impl="triton")
    assert len(plan.derived) == 1  # ... and reused by the next layer
    torch.testing.assert_close(first, second, atol=0, rtol=0)


def test_bad_inputs_raise_clear_errors():
    plan = plan_cascade([Segment(blocks=[0], length=3)], [Row(0, 1, [0])], block_size=4)
    q, pool = torch.zeros(1, 2, 16), torch.zeros(4, 2, 16)
    cases = [
        ((torch.zeros(1, 2, 24), torch.zeros(4, 2, 24)), "head dim 24"),
        ((q.double(), pool.double()), "dtypes"),
        ((q, pool.half()), "dtypes"),
        ((q, torch.zeros(4, 16, 2).transpose(1, 2)), "contiguous"),
        ((torch.zeros(2, 2, 16), pool), "plan is for 1 queries"),
        ((torch.zeros(1, 3, 16), pool), "do not fit"),
    ]
    for (qq, kk), message in cases:
        with pytest.raises(ValueError, match=message):
            cascade_attention_triton(qq, kk, kk, plan, 1.0)
    odd = plan_cascade([Segment(blocks=[0], length=3)], [Row(0, 1, [0])], block_size=3)
    with pytest.raises(ValueError, match="must divide"):
        cascade_attention_triton(q, pool, pool, odd, 1.0)
    with pytest.raises(ValueError, match="split_len"):
        cascade_attention_triton(q, pool, pool, plan, 1.0, split_len=10)


COMPILE_FOR_H100 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tree_kernels.cascade_triton_kernels import cascade_merge_kernel, cascade_partial_kernel

def compile_for_h100(fn, consts, types):
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
    triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": 4, "num_stages": 2})

ints = ["block_table_ptr", "tile_q_ptr", "tile_limit_ptr", "tile_first_ptr", "tile_table_ptr",
        "tile_kv_start_ptr", "tile_kv_end_ptr", "tile_pos_ptr", "merge_ptr", "merge_src_ptr"]
types = {**{n: "*i32" for n in ints}, "scale_log2": "fp32", "softcap": "fp32", "q_ptr": "*bf16",
         "k_ptr": "*bf16", "v_ptr": "*bf16", "out_ptr": "*bf16", "part_out_ptr": "*fp32",
         "part_lse_ptr": "*fp32", "alibi_ptr": "*fp32",
         "lse_ptr": "*fp32"}
shape = dict(HEAD_DIM=64, REP=4, BLOCK_Q=16, BLOCK_M=64)
for softcap, alibi in ((False, False), (True, False), (False, True)):
    compile_for_h100(cascade_partial_kernel.fn, dict(shape, BLOCK_SIZE=16, DOT_FP32=False,
                                                     UPCAST=False, SOFTCAP=softcap, ALIBI=alibi,
                                                     BLOCK_N=32),
                     types)
compile_for_h100(cascade_merge_kernel, dict(shape, BLOCK_H=8), types)
print("compiled")
"""


def test_kernels_compile_for_a_gpu():
    # The interpreter runs the kernels as Python, so it cannot catch what only the GPU compiler
    # rejects (a non-constexpr global, a bad dot shape): compile both to H100 machine code, in a
    # process without TRITON_INTERPRET. Needs no GPU, only the ptxas shipped with triton.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_H100], env=env, capture_output=True,
                          text=True, timeout=300)
    if "No module named 'triton.backends" in done.stderr:
        pytest.skip("this triton build has no NVIDIA backend")
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


@pytest.mark.parametrize("window,split_len", [(1, None), (5, 16), (12, None)])
def test_sliding_window_fp32(window, split_len):
    # Long ragged paths (max_len 20), prefill chunks, forced key splits: tiles start at their
    # queries' lowest first key and splits before every window are empty.
    case = random_case(3, width=2, heads=4, kv_heads=2, max_len=20, prefill_rows=1,
                       seed=window)
    plan = plan_cascade(case.segments, case.rows, case.block_size, window=window)
    out = cascade_attention_triton(case.q, case.k_pool, case.v_pool, plan, 0.3,
                                   split_len=split_len)
    expected = naive_attention(case, 0.3, window=window)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 5])
def test_softcap_fp32(window):
    case = random_case(2, width=2, heads=4, kv_heads=2, max_len=12, prefill_rows=1, seed=3)
    case.q = case.q * 4
    plan = plan_cascade(case.segments, case.rows, case.block_size, window=window)
    out = cascade_attention_triton(case.q, case.k_pool, case.v_pool, plan, 0.3, softcap=2.0)
    expected = naive_attention(case, 0.3, window=window, softcap=2.0)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window,split_len", [(None, None), (5, 16)])
def test_alibi_fp32(window, split_len):
    # slopes per query head, added at each key's absolute position (segments start past 0)
    case = random_case(2, width=2, heads=4, kv_heads=2, max_len=20, prefill_rows=1, seed=8)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    plan = plan_cascade(case.segments, case.rows, case.block_size, window=window)
    out = cascade_attention_triton(case.q, case.k_pool, case.v_pool, plan, 0.3, alibi=slopes,
                                   split_len=split_len)
    expected = naive_attention(case, 0.3, window=window, alibi=slopes)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
