"""The model's linear layers on oneDNN's prepacked weights while the cascade engine steps it (CPU).

`F.linear` on a CPU tensor runs MKL's GEMM on the weight as stored, every call. oneDNN (in every
x86 torch build, `torch.ops.mkldnn`) first reorders the weight into its own blocked layout, once,
and then runs its JIT kernels on it; on this CPU (AMD EPYC, AVX-512, 2 threads) that is 1.2-1.9x
faster in fp32 and 1.2-2.4x in bf16 at the engine's shapes (8 to 2048 rows, hidden 512, see
benchmarks/peers.py), and equal to `F.linear` up to the order of the sums (bf16 outputs match
bit for bit). The cascade engine's steps (text_engine.TreeRun) therefore run every plain
`nn.Linear` of the model that way. The native path does not: it runs the model exactly as
transformers does, the reference the cascade is held to (a different order of sums there moved a
sampled token at a near-tie of a Jamba tree, which the paths' token-for-token check caught).

- packed weights are kept per module (weakly: they go with the model) and repacked when the
  weight changes, in place (`load_state_dict`, an optimizer step: its version counter moves) or
  by replacement; the check costs one attribute read per module and step;
- a module whose forward is not nn.Linear's (a subclass that overrides it: LoRA, quantized
  layers) or already replaced on the instance (accelerate's offload hooks) is left as it is, and
  so are weights that are not 2-D CPU fp32/bf16 tensors, or that track no version (made under
  inference mode: a change could not be seen);
- only inside a step (`enabled()`), with autograd off; outside, the model is the user's own;
- where the native library is built, the products go through its `linear` op
  (tree_kernels/linear_cpu.cpp): oneDNN on the packed weight, except products of a few rows (at
  most 32 in bf16 on a CPU with AMX, 16 in fp32 with AVX-512), which run on the weight as stored,
  1.3-2.2x faster at those counts; the fused layers call the same op.

The cost is a second copy of those weights while the engine holds the model (`Engine(...,
prepack=False)` turns it off).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from tree_kernels.cascade_cpu_native import native_op

_ops = getattr(torch.ops, "mkldnn", None)
_PACK_ROWS = 128  # the row count oneDNN picks the weight's layout for (any count runs on it)

# module -> (the weight's identity when packed, the packed weight)
_PACKED: weakref.WeakKeyDictionary[nn.Linear, tuple[tuple, torch.Tensor]] = (
    weakref.WeakKeyDictionary()
)


def available(dtype: torch.dtype) -> bool:
    """Whether this torch build packs linear weights of `dtype` for the CPU."""
    if not torch.backends.mkldnn.is_available() or _ops is None:
        return False
    if not (hasattr(_ops, "_reorder_linear_weight") and hasattr(_ops, "_linear_pointwise")):
        return False
    if dtype == torch.bfloat16:
        return bool(_ops._is_mkldnn_bf16_supported())
    return dtype == torch.float32


def _identity(weight: torch.Tensor) -> tuple | None:
    """What must not change for a packed copy to stay valid; None if it cannot be tracked."""
    try:
        version = weight._version
    except RuntimeError:  # an inference tensor tracks no version
        return None
    return (id(weight), weight.data_ptr(), version)


def _eligible(module: nn.Module) -> bool:
    if not isinstance(module, nn.Linear) or type(module).forward is not nn.Linear.forward:
        return False
    if "forward" in module.__dict__:  # replaced on the instance (offload hooks, other wrappers)
        return False
    w = module.weight
    return (
        w.device.type == "cpu"
        and w.dim() == 2
        and w.layout == torch.strided
        and available(w.dtype)
        and (module.bias is None or module.bias.dtype == w.dtype)
        and _identity(w) is not None
    )


def _packed(module: nn.Linear, key: tuple) -> torch.Tensor:
    """The module's packed weight for the weight's identity `key`, packed now if it changed."""
    held = _PACKED.get(module)
    if held is not None and held[0] == key:
        return held[1]
    with torch.no_grad():
        packed = _ops._reorder_linear_weight(module.weight.detach(), _PACK_ROWS)
    _PACKED[module] = (key, packed)
    return packed


class PackedLinears:
    """The eligible linear layers of one model (listed once), switched on for a step.

    Each step checks every weight's identity (one version read) and installs the modules'
    forwards as instance attributes, written to `__dict__` directly (nn.Module's own
    `__setattr__` costs more than the check); the forwards are made again only for weights that
    changed."""

    def __init__(self, model: nn.Module, enabled: bool = True) -> None:
        self.modules = [m for m in model.modules() if _eligible(m)] if enabled else []
        self._keys: list[tuple | None] = [None] * len(self.modules)
        self._forwards: list = [None] * len(self.modules)
        # module -> its packed weight, for the step in progress (fused_layers.py reads it)
        self.packed: dict[nn.Linear, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.modules)

    @contextmanager
    def enabled(self) -> Iterator[None]:
        if not self.modules or torch.is_grad_enabled():
            yield
            return
        for i, m in enumerate(self.modules):
            weight = _identity(m.weight)
            if weight is None:  # its weight was replaced by one that tracks no version
                self.packed.pop(m, None)
                continue
            key = (*weight, id(m.bias))  # the forward holds the bias object (in-place changes show)
            if key != self._keys[i]:
                packed = _packed(m, weight)
                self._keys[i], self._forwards[i] = key, _forward(m, packed)
                self.packed[m] = packed
            m.__dict__["forward"] = self._forwards[i]
        try:
            yield
        finally:
            for m in self.modules:
                m.__dict__.pop("forward", None)


def _forward(module: nn.Linear, packed: torch.Tensor):
    weight, bias = module.weight, module.bias
    native = native_op() is not None  # tree_kernels/linear_cpu.cpp, which the fused layers call

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != weight.dtype or x.device.type != "cpu":  # not what it was packed for
            return nn.functional.linear(x, weight, bias)
        if native:
            return torch.ops.tree_kernels_cpu.linear(x, packed, weight, bias)
        return _ops._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")

    return forward
