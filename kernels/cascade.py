"""Public cascade-attention op: validate inputs, then dispatch to the torch reference or Triton.

`impl="auto"` picks Triton for CUDA tensors when its kernels import, the torch reference otherwise;
"torch" or "triton" force one. "torch" runs cascade_cpu.py on CPU tensors (the fast path: one
fused attention call per group) and the plain reference elsewhere; "reference" forces the plain
specification (cascade_reference.py) on any device, as a baseline. The environment variable
TREE_ROLLOUTS_ATTN_IMPL sets the default that "auto" resolves to (tests and benchmarks force a
path with it).
"""

from __future__ import annotations

import os

import torch

from .cascade_cpu import cascade_attention_cpu, fused_available
from .cascade_reference import cascade_attention_torch
from .plan import CascadePlan

IMPLS = ("auto", "torch", "triton", "reference")


def resolve_impl(impl: str, device: torch.device) -> str:
    """The implementation `impl` means on `device`: "torch", "triton" or "reference"."""
    if impl not in IMPLS:
        raise ValueError(f"cascade attention impl={impl!r}: expected one of {IMPLS}")
    if impl == "auto":
        impl = os.environ.get("TREE_ROLLOUTS_ATTN_IMPL", "auto")
        if impl not in IMPLS:
            raise ValueError(f"TREE_ROLLOUTS_ATTN_IMPL={impl!r}: expected one of {IMPLS}")
    if impl == "auto":
        impl = "triton" if device.type == "cuda" and _triton_available() else "torch"
    return impl


def _triton_available() -> bool:
    try:
        from . import cascade_triton  # noqa: F401
    except ImportError:
        return False
    return True


def cascade_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    plan: CascadePlan,
    scale: float,
    impl: str = "auto",
    return_lse: bool = False,
    softcap: float | None = None,
    alibi: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query over its path of KV segments (see plan.py for the layout).

    q:       [T, H, D] queries, T = plan.num_queries
    k_pool:  [num_slots, KVH, D] one layer's keys, num_slots = num_blocks * plan.block_size
    v_pool:  [num_slots, KVH, D] one layer's values
    softcap: scores -> softcap * tanh(scores / softcap) before the softmax (Gemma 2). Nonlinear,
             so the CPU fast path (an additive mask) cannot take it: "torch" runs the reference
    alibi:   [H] slopes: scores + slope[h] * (absolute key position) after the scale and softcap
             (ALiBi as Bloom and MPT add it; Falcon's, added before the scale, is slope * scale).
             Per head, so the CPU fast path's shared mask cannot take it either
    returns  [T, H, D] in q's dtype (and lse [T, H] fp32, natural log, when `return_lse`)
    """
    if softcap is not None and not softcap > 0:
        raise ValueError(f"cascade_attention: softcap={softcap}; expected a number > 0 or None")
    if q.dim() != 3 or k_pool.dim() != 3 or k_pool.shape != v_pool.shape:
        raise ValueError(
            f"cascade_attention: expected q [T, H, D] and pools [slots, KVH, D], got "
            f"{tuple(q.shape)}, {tuple(k_pool.shape)}, {tuple(v_pool.shape)}"
        )
    if q.shape[1] % k_pool.shape[1] or q.shape[2] != k_pool.shape[2]:
        raise ValueError(
            f"cascade_attention: {q.shape[1]} query heads of dim {q.shape[2]} do not fit "
            f"{k_pool.shape[1]} KV heads of dim {k_pool.shape[2]}"
        )
    if alibi is not None and (alibi.shape != (q.shape[1],) or not alibi.is_floating_point()):
        raise ValueError(
            f"cascade_attention: alibi slopes {tuple(alibi.shape)} {alibi.dtype}; expected one "
            f"float per query head ({q.shape[1]})"
        )
    if q.shape[0] != plan.num_queries:
        raise ValueError(
            f"cascade_attention: plan is for {plan.num_queries} queries, got {q.shape[0]}"
        )
    resolved = resolve_impl(impl, q.device)
    if resolved == "triton":
        from .cascade_triton import cascade_attention_triton

        return cascade_attention_triton(
            q, k_pool, v_pool, plan, scale, return_lse=return_lse, softcap=softcap, alibi=alibi
        )
    if resolved == "torch" and fused_available(q.device) and softcap is None and alibi is None:
        return cascade_attention_cpu(q, k_pool, v_pool, plan, scale, return_lse=return_lse)
    return cascade_attention_torch(
        q, k_pool, v_pool, plan, scale, return_lse=return_lse, softcap=softcap, alibi=alibi
    )


def add_sinks(
    out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Learned attention sinks (gpt-oss; Xiao et al. 2023, arXiv 2309.17453): one logit per head
    in every softmax denominator and no value, out = sum_j softmax([s_1..s_n, sink])_j v_j.

    Exact after the cascade merge, as one more partial with lse = sink and output 0:
        lse' = logaddexp(lse, sink),   out' = exp(lse - lse') out.

    out: [T, H, D];  lse: [T, H] fp32;  sinks: [H]  ->  (out' [T, H, D] in out's dtype, lse')
    """
    total = torch.logaddexp(lse, sinks.float()[None, :])
    scaled = out.float() * torch.exp(lse - total)[..., None]
    return scaled.to(out.dtype), total
