"""Triton cascade attention: validate inputs, plan the step's tiles once, launch two kernels.

`cascade_attention_triton` is what `cascade.cascade_attention(impl="triton")` calls. It takes the
same `CascadePlan` as the torch reference; the first call with a plan derives the Triton work list
(cascade_triton_plan.py) and caches it in `plan.derived`, so every later layer of the step only
launches the partial kernel and the merge kernel (cascade_triton_kernels.py).

Inputs the kernels cannot take raise ValueError here rather than computing a wrong answer. Under
TRITON_INTERPRET=1 the kernels run on CPU tensors (tests); otherwise they need CUDA tensors.
"""

from __future__ import annotations

import math
import os

import torch

from .cascade_triton_kernels import cascade_merge_kernel, cascade_partial_kernel
from .cascade_triton_plan import TritonWork, plan_triton_work, tile_layout, triton_next_pow2
from .plan import CascadePlan

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HEAD_DIMS = (16, 32, 64, 128, 256)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_inputs(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, plan: CascadePlan):
    """Raise ValueError, naming the argument and the fix, for anything the kernels cannot take."""
    name = "cascade_attention_triton"
    if q.dim() != 3 or k_pool.dim() != 3 or k_pool.shape != v_pool.shape:
        raise ValueError(
            f"{name}: expected q [T, H, D] and pools [slots, KVH, D] of one shape, got "
            f"{tuple(q.shape)}, {tuple(k_pool.shape)}, {tuple(v_pool.shape)}"
        )
    (T, h, d), kvh = q.shape, k_pool.shape[1]
    if h % kvh or d != k_pool.shape[2]:
        raise ValueError(f"{name}: {h} query heads of dim {d} do not fit {kvh} KV heads of dim "
                         f"{k_pool.shape[2]}")
    if d not in HEAD_DIMS:
        raise ValueError(f"{name}: head dim {d} unsupported; expected one of {HEAD_DIMS} "
                         f"(use impl='torch' for others)")
    if q.dtype not in DTYPES or k_pool.dtype != q.dtype or v_pool.dtype != q.dtype:
        raise ValueError(f"{name}: dtypes q={q.dtype}, k={k_pool.dtype}, v={v_pool.dtype}; "
                         f"expected all equal and one of {DTYPES}")
    if not (q.device == k_pool.device == v_pool.device):
        raise ValueError(f"{name}: q, k_pool, v_pool on {q.device}, {k_pool.device}, "
                         f"{v_pool.device}; move them to one device")
    if q.device.type != "cuda" and not _interpreting():
        raise ValueError(f"{name}: tensors on {q.device}; the Triton path needs CUDA tensors "
                         f"(or TRITON_INTERPRET=1); use impl='torch' on the CPU")
    if not (k_pool.is_contiguous() and v_pool.is_contiguous()):
        raise ValueError(f"{name}: k_pool and v_pool must be contiguous [slots, KVH, D] tensors")
    # Any block size works (the kernel divides by a constant); it must tile the pool exactly.
    bs = plan.block_size
    if bs < 1 or k_pool.shape[0] % bs:
        raise ValueError(f"{name}: block size {bs} must divide the pool's {k_pool.shape[0]} "
                         f"slots ([num_blocks * block_size, KVH, D])")
    if T != plan.num_queries:
        raise ValueError(f"{name}: plan is for {plan.num_queries} queries, got {T}")
    if plan.groups and plan.groups[0].q_index.device != q.device:
        raise ValueError(f"{name}: plan built on {plan.groups[0].q_index.device}, q on "
                         f"{q.device}; pass device= to plan_cascade")


def _default_programs(device: torch.device) -> int:
    # Enough programs to fill every SM a few times over; the interpreter wants as few as possible.
    if device.type != "cuda":
        return 1
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def _work_for(plan: CascadePlan, heads: int, kv_heads: int, split_len: int | None) -> TritonWork:
    """The plan's Triton work list for this head layout, derived on first use and cached."""
    block_m = 16 if _interpreting() else 64
    key = ("triton", heads, kv_heads, block_m, split_len)
    work = plan.derived.get(key)
    if work is None:
        device = plan.groups[0].q_index.device
        layout = tile_layout(heads // kv_heads, block_m)
        if split_len is None:
            work = plan_triton_work(plan, layout, kv_heads, _default_programs(device), 256)
        else:
            work = plan_triton_work(plan, layout, kv_heads, 1 << 30, split_len)
        plan.derived[key] = work
    assert isinstance(work, TritonWork), f"plan.derived[{key}] holds {type(work)}"
    return work


def cascade_attention_triton(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    plan: CascadePlan,
    scale: float,
    return_lse: bool = False,
    split_len: int | None = None,
    softcap: float | None = None,
    alibi: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of every query over its path of segments, on the GPU.

    q:         [T, H, D] fp32/fp16/bf16, D in HEAD_DIMS, T = plan.num_queries
    k_pool:    [num_slots, KVH, D] contiguous, same dtype and device;  v_pool: same
    split_len: force key splits of this many keys (a multiple of 16; tests use it to exercise
               the split path); None sizes splits to fill the device
    softcap:   scores -> softcap * tanh(scores / softcap) before the softmax; None: plain
    alibi:     [H] slopes: + slope[h] * (absolute key position) after that; None: none
    returns    out [T, H, D] in q's dtype (and lse [T, H] fp32, natural log, when `return_lse`)

    >>> out = cascade_attention_triton(q, k_pool, v_pool, plan, scale=head_dim ** -0.5)
    """
    check_inputs(q, k_pool, v_pool, plan)
    if split_len is not None and (split_len < 16 or split_len % 16):
        raise ValueError(f"cascade_attention_triton: split_len={split_len}; expected a positive "
                         f"multiple of 16 or None")
    q = q.contiguous()
    (T, h, d), kvh = q.shape, k_pool.shape[1]
    out = torch.empty_like(q)
    lse = torch.empty(T, h, dtype=torch.float32, device=q.device)
    if T == 0 or not plan.groups:
        return (out, lse) if return_lse else out
    work = _work_for(plan, h, kvh, split_len)
    # The interpreter computes bf16 wrongly: there, bf16 inputs are loaded as bf16 and converted.
    upcast = _interpreting() and q.dtype == torch.bfloat16
    lay = work.layout
    # ALiBi slopes in the kernel's base-2 units; without ALiBi the kernel never reads the pointer
    slopes = lse if alibi is None else alibi.to(q.device, torch.float32) * math.log2(math.e)
    part_out = torch.empty(work.num_tiles, kvh, lay.block_m, d, dtype=torch.float32,
                           device=q.device)
    part_lse = torch.empty(work.num_tiles, kvh, lay.block_m, dtype=torch.float32, device=q.device)
    cascade_partial_kernel[(work.num_tiles, kvh)](
        q, k_pool, v_pool, work.block_table,
        work.tile_q, work.tile_limit, work.tile_first, work.tile_table,
        work.tile_kv_start, work.tile_kv_end, work.tile_pos,
        slopes, part_out, part_lse,
        T, kvh, scale * math.log2(math.e), float(softcap or 1.0),
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1),
        v_pool.stride(0), v_pool.stride(1),
        HEAD_DIM=d, REP=lay.rep, BLOCK_Q=lay.block_q, BLOCK_M=lay.block_m,
        BLOCK_SIZE=plan.block_size, DOT_FP32=q.dtype == torch.float32 or upcast, UPCAST=upcast,
        SOFTCAP=softcap is not None, ALIBI=alibi is not None,
    )  # fmt: skip
    cascade_merge_kernel[(T,)](
        part_out, part_lse, work.merge_ptr, work.merge_src, out, lse,
        h, kvh, out.stride(0), out.stride(1),
        HEAD_DIM=d, REP=lay.rep, BLOCK_Q=lay.block_q, BLOCK_M=lay.block_m,
        BLOCK_H=triton_next_pow2(h),
    )  # fmt: skip
    return (out, lse) if return_lse else out
