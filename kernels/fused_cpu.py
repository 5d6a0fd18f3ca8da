"""Fused CPU forwards: RMSNorm, a gated MLP's `silu(gate) * up` and RoPE, one native op each.

A decode step of a few rows runs each of a decoder layer's elementwise forwards as several
torch ops, and on a CPU each op costs more host time than its arithmetic (after the layer's
linear products have pushed the dispatcher out of cache, 5-15 us each on the 2-core machine the
peer benchmark runs on). fused_cpu.cpp does each forward in one call, rounding where the torch
ops round, and gives their bits: a reduction's sum order and an exp's last bit come from torch's
own kernels, called from C++. The torch functions below are the specification, written as
transformers' Llama writes them (tests/test_fused_cpu.py holds the ops to them bit for bit). They
are built with the cascade kernel (cascade_cpu_native.py: same library, same switch); where it is
not built, the specs run.
"""

from __future__ import annotations

import torch

from .cascade_cpu_native import NATIVE_DTYPES, native_op

__all__ = [
    "fused_available",
    "rms_norm",
    "rms_norm_torch",
    "rope",
    "rope_torch",
    "silu_mul",
    "silu_mul_torch",
]


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., n] (fp32 or bf16), weight [n] of x's dtype -> [..., n]: Llama's RMSNorm."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def silu_mul_torch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up [...] of one shape and dtype -> silu(gate) * up, each op rounding to the dtype."""
    return torch.nn.functional.silu(gate) * up


def rope_torch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, H, T, D], k [B, KVH, T, D], cos/sin [B, T, D] -> rotated (q, k): Llama's RoPE,
    x * cos + rotate_half(x) * sin with rotate_half(x) = [-x2, x1], each op rounding."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def fused_available() -> bool:
    """Whether the native ops are built and switched on (TREE_ROLLOUTS_CPU_NATIVE)."""
    return native_op() is not None


def _native(x: torch.Tensor, *others: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype in NATIVE_DTYPES
        and all(t.dtype == x.dtype and t.device.type == "cpu" for t in others)
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, *others)))
        and fused_available()
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rms_norm_torch, on the native op where it applies (CPU, fp32/bf16, no autograd)."""
    if x.dim() < 1 or weight.shape != x.shape[-1:]:
        raise ValueError(
            f"rms_norm: weight {tuple(weight.shape)} for x {tuple(x.shape)}; expected [n] for "
            "x [..., n]"
        )
    if _native(x, weight):
        return torch.ops.tree_kernels_cpu.rms_norm(x, weight, float(eps))
    return rms_norm_torch(x, weight, eps)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu_mul_torch, on the native op where it applies (CPU, fp32/bf16, no autograd)."""
    if gate.shape != up.shape:
        raise ValueError(
            f"silu_mul: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have one shape"
        )
    if _native(gate, up):
        return torch.ops.tree_kernels_cpu.silu_mul(gate, up)
    return silu_mul_torch(gate, up)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
         sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rope_torch, on the native op where it applies (CPU, fp32/bf16, unit stride in D, no
    autograd)."""
    shapes_ok = (
        q.dim() == 4 and k.dim() == 4 and cos.dim() == 3 and cos.shape == sin.shape
        and q.shape[0] == k.shape[0] == cos.shape[0] and q.shape[2] == k.shape[2] == cos.shape[1]
        and q.shape[3] == k.shape[3] == cos.shape[2] and q.shape[3] % 2 == 0
    )
    if not shapes_ok:
        raise ValueError(
            f"rope: q {tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)}, sin "
            f"{tuple(sin.shape)}; expected [B, H, T, D], [B, KVH, T, D] and [B, T, D], D even"
        )
    unit = all(t.stride(-1) == 1 for t in (q, k, cos, sin))
    if unit and _native(q, k, cos, sin):
        return torch.ops.tree_kernels_cpu.rope(q, k, cos, sin)
    return rope_torch(q, k, cos, sin)
