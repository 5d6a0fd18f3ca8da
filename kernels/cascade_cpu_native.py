"""The CPU cascade path's native op for small groups: build on first use, validate, call.

cascade_cpu_native.cpp attends one plan group straight from the pool (fp32 or bf16, by slot)
and merges its partials into the step's accumulators in place: one call per group and layer,
where the torch path needs a gather, a dtype copy and a dozen small ops. It is compiled for
this machine on first use with torch's own extension builder (a C++ compiler and ninja; about
20 s, cached under torch's extensions folder, one build per CPU feature set), registered as
`torch.ops.tree_kernels_cpu.cascade_merge_group` (its AMX path for bf16 groups:
attention_amx.cpp). The same library holds `write_kv` (a step's new
keys and values into the pool, one op per layer), the fused forwards of fused_cpu.py, the packed
linear layers' products (linear_cpu.cpp, used by rollout/engine/packed_linear.py), a
Llama-like decoder layer's two halves around its attention (layer_cpu.cpp, used by
rollout/engine/fused_layers.py) and the sampler's inverse-CDF draw (sample_cpu.cpp, used by
rollout/engine/sampling.py). Where it cannot be built, the torch paths run instead, after one
warning that says why. TREE_ROLLOUTS_CPU_NATIVE=0 turns all of it off (A/B runs).
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

# the extension: this op, the fused forwards of fused_cpu.py, the linear products
# (linear_cpu.cpp), the decoder layer's halves (layer_cpu.cpp) and the sampler's draw (one
# build, one library)
SOURCES = [
    Path(__file__).with_name(n)
    for n in ("cascade_cpu_native.cpp", "attention_amx.cpp", "fused_cpu.cpp", "linear_cpu.cpp",
              "layer_cpu.cpp", "sample_cpu.cpp")
]
# what the library registers
OPS = ("cascade_merge_group", "amx_attention", "write_kv", "scatter_partials", "rms_norm",
       "silu_mul", "rope", "linear", "layer_attn_in", "layer_attn_out", "sample_rows")
NATIVE_DTYPES = (torch.float32, torch.bfloat16)  # what the library's ops take
NATIVE_LANES = 16  # the op takes head dims that are a multiple of this (whole vectors)
_op: Callable | None = None
_tried = False


def native_enabled() -> bool:
    """Whether the native op is wanted (TREE_ROLLOUTS_CPU_NATIVE, default on)."""
    flag = os.environ.get("TREE_ROLLOUTS_CPU_NATIVE", "1")
    if flag not in ("0", "1"):
        raise ValueError(f"TREE_ROLLOUTS_CPU_NATIVE={flag!r}: expected 0 or 1")
    return flag == "1"


def native_op() -> Callable | None:
    """The built op, or None where it is turned off or cannot be built (warned once)."""
    global _op, _tried
    if not native_enabled():
        return None
    if not _tried:
        _tried = True
        _op = _build()
    return _op


@functools.cache
def amx_attention(head_dim: int) -> bool:
    """Whether the op attends bf16 groups of this head dim on AMX tiles (attention_amx.cpp), so
    that it takes every decode group, not only small ones (cascade_cpu_schedule.group_layouts)."""
    return native_op() is not None and torch.ops.tree_kernels_cpu.amx_attention(head_dim)


def build_name() -> str:
    """The extension's name: one build per CPU feature set, since it is compiled with
    -march=native (a home folder shared by machines of different CPUs gets one build each)."""
    flags = platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            flags += next((line for line in info if line.startswith("flags")), "")
    except OSError:
        flags += platform.processor()
    return "tree_kernels_cpu_" + hashlib.sha1(flags.encode()).hexdigest()[:10]


def _registered() -> Callable | None:
    """The op if this process has loaded it already."""
    existing = getattr(torch.ops, "tree_kernels_cpu", None)
    if existing is not None and all(hasattr(existing, n) for n in OPS):
        return existing.cascade_merge_group
    return None


def _build() -> Callable | None:
    if (op := _registered()) is not None:
        return op
    try:
        from torch.utils import cpp_extension

        name = build_name()
        if not (Path(cpp_extension._get_build_directory(name, False)) / f"{name}.so").exists():
            print("tree-rollouts: building the CPU cascade kernel (once per machine, ~20 s)...",
                  file=sys.stderr, flush=True)
        cpp_extension.load(
            name=name,
            sources=[str(s) for s in SOURCES],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as err:  # no compiler, no ninja, a failed build: the torch path runs
        warnings.warn(
            f"tree-rollouts: the native CPU cascade kernel could not be built ({err}); the "
            "plain torch path runs instead (slower on decode steps). Install a C++ compiler and "
            "`pip install ninja`, or set TREE_ROLLOUTS_CPU_NATIVE=0 to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return torch.ops.tree_kernels_cpu.cascade_merge_group


def merge_group(
    acc_out: torch.Tensor,
    acc_lse: torch.Tensor,
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    slots: torch.Tensor,
    q_index: torch.Tensor,
    q_first: torch.Tensor,
    q_limit: torch.Tensor,
    scale: float,
    tiles: bool = False,
) -> None:
    """Attend one group and merge it into the accumulators, in place.

    acc_out: [(T + 1) * H, D] fp32, row t * H + h;  acc_lse: [(T + 1) * H] fp32, -inf where
             nothing is merged yet (row T * H + h is scratch)
    q:       [T, H, D] fp32 or bf16, unit stride in D, D % NATIVE_LANES == 0
    pools:   [slots, KVH, D] fp32 or bf16
    slots:   [S, L] int64 pool slot of each segment's key l
    q_index, q_first, q_limit: [S, N] int64; query q_index[s, n] (T: padding) sees keys
             [q_first, q_limit) of segment s
    tiles:   on AMX tiles (amx_attention(D), bf16 q and pools): softmax numerators rounded to
             bf16 before the values' product, as torch's flash kernel does in bf16; else fp32
    """
    op = native_op()
    if op is None:
        raise RuntimeError("the native CPU cascade kernel is not available (native_op())")
    op(acc_out, acc_lse, q, k_pool, v_pool, slots, q_index, q_first, q_limit, scale, tiles)
