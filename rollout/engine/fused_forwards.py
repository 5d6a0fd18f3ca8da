"""Known elementwise forwards of the model on fused native ops while the cascade engine steps it.

On a CPU, a decode step of a few rows pays per torch op, not per flop: Llama's RMSNorm is eight
ops, its gated MLP's `act_fn(gate) * up` two and its RoPE sixteen (tree_kernels/fused_cpu.py).
Most families in transformers copy those forwards from Llama word for word. A module is fused
when:

- its class's `forward` is Llama's, statement for statement (the parsed source, without
  docstrings, type annotations and decorators, equals `LlamaRMSNorm.forward`'s or
  `LlamaMLP.forward`'s in the installed transformers: a family that changes anything, such as
  Gemma's `1 + weight`, is left as it is), and its forward is not replaced on the instance
  (accelerate's offload hooks and other wrappers);
- for the MLP, `act_fn` is exactly SiLU (transformers' SiLUActivation or torch's nn.SiLU);
- RoPE is a function, not a module: a modeling module (modeling_qwen2, ...) whose
  `apply_rotary_pos_emb` and `rotate_half` are Llama's has its `apply_rotary_pos_emb` global
  swapped for the step (installed by the first step that needs it, restored by the last one
  out, under a lock); the swap runs the native op only for calls inside a fused step of this
  thread (a ContextVar) and Llama's calling convention, and the original for any other call;
- its class and dtype pass a probe once per process: the native op against the module's own
  forward on a random input, bit for bit (so a transformers release that changed Llama's own
  arithmetic is caught, not silently replaced, and the model's bits are checked, not assumed).

Only inside a step (`enabled()`), with autograd off and the native ops built; a call whose
inputs are not what the op takes (dtype, device) runs the module's own forward. Outputs are the
model's own bits (the native ops round where torch's ops round, and call torch's kernels for
sums and exps); the native path runs the model exactly as transformers does.
TREE_ROLLOUTS_CPU_NATIVE=0 turns these off with the cascade kernel.
"""

from __future__ import annotations

import ast
import functools
import inspect
import sys
import textwrap
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from types import ModuleType

import torch
from torch import nn
from tree_kernels.cascade_cpu_native import NATIVE_DTYPES
from tree_kernels.fused_cpu import fused_available

_PROBED: dict[tuple[object, torch.dtype], bool] = {}  # (class or module, dtype) -> it passed
_FUSING: ContextVar[bool] = ContextVar("tree_fused_forwards", default=False)
_SWAP_LOCK = threading.Lock()
_SWAPPED: dict[ModuleType, tuple[Callable, int]] = {}  # module -> (its own RoPE, steps in it)


def parsed(fn: Callable) -> ast.FunctionDef | None:
    """The function's parsed source without its docstring (None where it has none to read)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return None
    node = tree.body[0] if tree.body else None
    if not isinstance(node, ast.FunctionDef):
        return None
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        node.body = body[1:] or [ast.Pass()]
    return node


def statements(fn: Callable) -> str | None:
    """The function's parsed source without docstring, annotations and decorators."""
    node = parsed(fn)
    if node is None:
        return None
    node.decorator_list, node.returns = [], None
    for arg in [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]:
        arg.annotation = None
    return ast.dump(node, annotate_fields=False)


@functools.cache
def _llama() -> dict[str, str | None]:
    from transformers.models.llama import modeling_llama as llama

    return {
        "rms_norm": statements(llama.LlamaRMSNorm.forward),
        "mlp": statements(llama.LlamaMLP.forward),
        "rope": statements(llama.apply_rotary_pos_emb),
        "rotate_half": statements(llama.rotate_half),
    }


@functools.cache
def _kind_of_class(cls: type) -> str | None:
    shape = statements(cls.forward)
    if shape is None:
        return None
    refs = _llama()
    return next((kind for kind in ("rms_norm", "mlp") if refs[kind] == shape), None)


def _silu(act: object) -> bool:
    from transformers.activations import SiLUActivation

    return type(act) in (SiLUActivation, nn.SiLU)


def kind_of(module: nn.Module) -> str | None:
    """'rms_norm', 'mlp' or None: which known forward the module runs, if it can be fused."""
    if "forward" in module.__dict__:
        return None
    kind = _kind_of_class(type(module))
    if kind == "rms_norm":
        w = getattr(module, "weight", None)
        ok = isinstance(w, torch.Tensor) and w.dim() == 1 and w.device.type == "cpu"
        return kind if ok and isinstance(getattr(module, "variance_epsilon", None), float) else None
    if kind == "mlp":
        return kind if _silu(getattr(module, "act_fn", None)) else None
    return None


def _fused(module: nn.Module, kind: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The module's forward on the native op; its own for inputs the op does not take. It
    reads the module's weight and layers at each call (a replaced weight is seen)."""
    own = type(module).forward.__get__(module)
    if kind == "rms_norm":
        op = torch.ops.tree_kernels_cpu.rms_norm

        def norm(hidden_states: torch.Tensor) -> torch.Tensor:
            weight = module.weight
            if not _native(hidden_states) or weight.dtype != hidden_states.dtype:
                return own(hidden_states)
            return op(hidden_states, weight, module.variance_epsilon)

        return norm
    op = torch.ops.tree_kernels_cpu.silu_mul

    def mlp(x: torch.Tensor) -> torch.Tensor:
        if not _native(x):
            return own(x)
        g, u = module.gate_proj(x), module.up_proj(x)
        if not _native(g) or u.dtype != g.dtype:  # the module's own arithmetic, as it is
            return module.down_proj(module.act_fn(g) * u)
        return module.down_proj(op(g, u))

    return mlp


def _native(x: torch.Tensor) -> bool:
    return x.dtype in NATIVE_DTYPES and x.device.type == "cpu"


def _probe(module: nn.Module, kind: str) -> bool:
    """The native op against the module's own forward on a random input, once per class and
    dtype (a changed forward differs everywhere, far beyond rounding)."""
    dtype = next(module.parameters(), torch.empty(0)).dtype
    key = (type(module), dtype)
    if key not in _PROBED:
        gen = torch.Generator().manual_seed(0)
        width = module.weight.shape[0] if kind == "rms_norm" else module.gate_proj.in_features
        x = torch.randn(3, width, generator=gen).to(dtype)
        want, got = type(module).forward(module, x), _fused(module, kind)(x)
        ok = agree_bits(want, got, dtype, type(module).__name__ + ".forward")
        _PROBED[key] = ok
    return _PROBED[key]


def rope_modules(model: nn.Module) -> list[ModuleType]:
    """The modeling modules of the model's classes whose RoPE functions are Llama's."""
    found = {sys.modules.get(type(m).__module__) for m in model.modules()}
    refs = _llama()
    return [
        mod for mod in found
        if mod is not None
        and callable(getattr(mod, "apply_rotary_pos_emb", None))
        and statements(mod.apply_rotary_pos_emb) == refs["rope"]
        and callable(getattr(mod, "rotate_half", None))
        and statements(mod.rotate_half) == refs["rotate_half"]
    ]


def _fused_rope(own: Callable) -> Callable:
    op = torch.ops.tree_kernels_cpu.rope

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if (
            _FUSING.get() and not args and not kwargs and q.dtype in NATIVE_DTYPES
            and k.dtype == cos.dtype == sin.dtype == q.dtype and q.device.type == "cpu"
            and q.dim() == 4 and cos.dim() == 3 and q.stride(-1) == 1 and k.stride(-1) == 1
        ):
            return op(q, k, cos.contiguous(), sin.contiguous())
        return own(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb.own = own  # type: ignore[attr-defined]
    return apply_rotary_pos_emb


def _probe_rope(mod: ModuleType, dtype: torch.dtype) -> bool:
    """As _probe, for a modeling module's RoPE: q [1, 4, 5, 32], k [1, 2, 5, 32]."""
    key = (mod, dtype)
    if key not in _PROBED:
        gen = torch.Generator().manual_seed(0)
        q, k = (torch.randn(1, n, 5, 32, generator=gen).to(dtype) for n in (4, 2))
        angle = torch.randn(1, 5, 16, generator=gen).repeat(1, 1, 2)
        cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
        token = _FUSING.set(True)
        try:
            got = _fused_rope(mod.apply_rotary_pos_emb)(q, k, cos, sin)
        finally:
            _FUSING.reset(token)
        want = mod.apply_rotary_pos_emb(q, k, cos, sin)
        _PROBED[key] = agree_bits(want, got, dtype, mod.__name__ + ".apply_rotary_pos_emb")
    return _PROBED[key]


@contextmanager
def _rope_swapped(mod: ModuleType) -> Iterator[None]:
    with _SWAP_LOCK:
        own, steps = _SWAPPED.get(mod, (mod.apply_rotary_pos_emb, 0))
        if steps == 0:
            mod.apply_rotary_pos_emb = _fused_rope(own)
        _SWAPPED[mod] = (own, steps + 1)
    try:
        yield
    finally:
        with _SWAP_LOCK:
            own, steps = _SWAPPED.pop(mod)
            if steps == 1:
                mod.apply_rotary_pos_emb = own
            else:
                _SWAPPED[mod] = (own, steps - 1)


def agree_bits(want, got, dtype: torch.dtype, name: str) -> bool:
    """Bit for bit equal (the ops round where torch's round); else warned, and not fused."""
    want, got = (want, got) if isinstance(want, tuple) else ((want,), (got,))
    ok = len(want) == len(got) and all(
        w.shape == g.shape and w.dtype == g.dtype and bool(torch.equal(w, g))
        for w, g in zip(want, got, strict=True)
    )
    if not ok:
        warnings.warn(
            f"tree-rollouts: {name} reads as Llama's but the fused CPU op does not give its "
            f"bits in {dtype} (a changed forward, or this CPU rounds it apart); it runs as it "
            "is (slower on the CPU)",
            RuntimeWarning,
            stacklevel=5,
        )
    return ok


class FusedForwards:
    """The model's fusable modules and RoPE functions (found once), switched onto the native
    ops for a step."""

    def __init__(self, model: nn.Module, enabled: bool = True) -> None:
        found = [(m, kind_of(m)) for m in model.modules()] if enabled else []
        self.modules = [(m, k) for m, k in found if k is not None]
        self.rope = rope_modules(model) if enabled else []
        self.dtype = next(model.parameters(), torch.empty(0)).dtype
        self._forwards: list[Callable] | None = None
        self._fused: frozenset[nn.Module] = frozenset()  # after the probes
        self._inside = False  # a step's block is open with the forwards installed

    def fused_now(self) -> frozenset[nn.Module]:
        """The modules running on the native ops in the step in progress (none outside one)."""
        return self._fused if self._inside else frozenset()

    def rope_now(self) -> list[ModuleType]:
        """The modeling modules whose RoPE is swapped in the step in progress."""
        return self.rope if self._inside else []

    def __len__(self) -> int:
        return len(self.modules) + len(self.rope)

    @contextmanager
    def enabled(self) -> Iterator[None]:
        if not len(self) or torch.is_grad_enabled() or not fused_available():
            yield
            return
        if self._forwards is None:  # the probes run once, on the first step
            with torch.no_grad():
                self.modules = [(m, k) for m, k in self.modules if _probe(m, k)]
                self.rope = [mod for mod in self.rope if _probe_rope(mod, self.dtype)]
                self._forwards = [_fused(m, k) for m, k in self.modules]
                self._fused = frozenset(m for m, _ in self.modules)
        for (m, _), fwd in zip(self.modules, self._forwards, strict=True):
            m.__dict__["forward"] = fwd
        token = _FUSING.set(True)
        try:
            with ExitStack() as swaps:
                for mod in self.rope:
                    swaps.enter_context(_rope_swapped(mod))
                self._inside = True
                yield
        finally:
            self._inside = False
            _FUSING.reset(token)
            for m, _ in self.modules:
                m.__dict__.pop("forward", None)
