"""Llama-like decoder layers as two native calls around their attention while the engine steps them.

With the norms, MLPs and RoPE fused (fused_forwards.py) and the linear layers packed
(packed_linear.py), a decode step of a few rows still runs each layer as about sixty top-level
torch ops called from Python, and pays the interpreter between them (on this project's 2-core
benchmark machine, an op costs about twice as much inside a step as back to back). A layer is run
as `layer_attn_in` (norm, q/k/v products, RoPE), the pool write and the cascade attention, then
`layer_attn_out` (o product, residual, norm, MLP, residual): the same ops in the same order,
called from C++ (tree_kernels/layer_cpu.cpp). A layer is run that way when:

- its class's `forward` is Llama's decoder layer, statement for statement, and its attention's
  body is `LlamaAttention.forward`'s up to a `sliding_window=` keyword (`_attention_body`: Mistral
  and Qwen2 qualify; a family that changes anything else, such as Qwen3's q/k norms, keeps its
  own), neither replaced on the instance;
- its two norms and its MLP run on the fused ops this step (they passed fused_forwards' probes),
  and so does its modeling module's RoPE; its seven linear layers run on packed weights this step
  (so `prepack=False` turns this off too);
- the call is the engine's own (no mask, our pool cache, no extra keywords, eval mode, the
  model's dtype); any other call runs the layer's own forward;
- its class and dtype pass a probe on their first call in the process: the fused layer, then the
  layer's own forward, on that step's real input, bit for bit (`agree_bits`); the step goes on
  with the layer's own output, and a class that fails keeps its own forward, after a warning.

The pool write goes through the same checks as the pool cache's (attention_adapter.store), and
the attention through the same `cascade_attention` call as the attention interface.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from tree_kernels.cascade import cascade_attention

from .attention_adapter import ATTN_NAME, PoolCache, current_step, store
from .fused_forwards import FusedForwards, agree_bits, parsed, statements
from .packed_linear import PackedLinears

_PROBED: dict[tuple[type, torch.dtype], bool] = {}  # (layer class, dtype) -> it gave the bits
_ATTN_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")


def _attention_body(fn: Callable) -> str | None:
    """An attention forward's statements without its signature and without a `sliding_window=`
    keyword in its calls: Mistral's and Qwen2's attention differ from Llama's by that keyword
    alone (and by their signatures' defaults, which the decoder layer's call never uses). The
    keyword does not change what the engine computes: the attention interface reads each
    layer's window from the model's config (layout.py), not from the call, and so do we."""
    node = parsed(fn)
    if node is None:
        return None
    for call in (n for stmt in node.body for n in ast.walk(stmt) if isinstance(n, ast.Call)):
        call.keywords = [k for k in call.keywords if k.arg != "sliding_window"]
    return ast.dump(ast.Module(body=node.body, type_ignores=[]), annotate_fields=False)


@functools.cache
def _llama() -> tuple[str | None, str | None]:
    from transformers.models.llama import modeling_llama as llama

    layer, attn = llama.LlamaDecoderLayer.forward, llama.LlamaAttention.forward
    return statements(layer), _attention_body(attn)


@functools.cache
def _reads_as_llama(layer_cls: type, attn_cls: type) -> bool:
    layer, attn = _llama()
    return (
        layer is not None
        and attn is not None
        and statements(layer_cls.forward) == layer
        and _attention_body(attn_cls.forward) == attn
    )


def candidates(model: nn.Module) -> list[nn.Module]:
    """The model's layers whose code is Llama's (what else they need is checked per step)."""
    found = []
    for m in model.modules():
        attn = getattr(m, "self_attn", None)
        if (
            isinstance(attn, nn.Module)
            and "forward" not in m.__dict__
            and "forward" not in attn.__dict__
            and _reads_as_llama(type(m), type(attn))
            and all(isinstance(getattr(attn, n, None), nn.Linear) for n in _ATTN_LINEARS)
            and all(isinstance(getattr(m.mlp, n, None), nn.Linear) for n in _MLP_LINEARS)
        ):
            found.append(m)
    return found


def _weights(layer: nn.Module, linears: PackedLinears) -> tuple[torch.Tensor, ...] | None:
    """The layer's seven linear layers' weights for this step (q, k, v, o, gate, up, down), each as
    its packed copy and the module's own (the native products take both), or None."""
    mods = [getattr(layer.self_attn, n) for n in _ATTN_LINEARS]
    mods += [getattr(layer.mlp, n) for n in _MLP_LINEARS]
    if not all("forward" in m.__dict__ and m in linears.packed for m in mods):
        return None
    weights = tuple(w for m in mods for w in (linears.packed[m], m.weight))
    dtype = layer.input_layernorm.weight.dtype
    if layer.post_attention_layernorm.weight.dtype != dtype or any(
        w.dtype != dtype for w in weights
    ):
        return None
    return weights


def _fused(layer: nn.Module, weights: tuple[torch.Tensor, ...]) -> Callable:
    """The layer's forward as two native calls around the pool write and the attention."""
    own = type(layer).forward.__get__(layer)
    attn, mlp = layer.self_attn, layer.mlp
    norm_in, norm_out = layer.input_layernorm, layer.post_attention_layernorm
    pq, wq, pk, wk, pv, wv, po, wo, pg, wg, pu, wu, pd, wd = weights
    dtype, idx, family = norm_in.weight.dtype, attn.layer_idx, type(layer).__name__
    ops = torch.ops.tree_kernels_cpu

    def run(hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        step = current_step()
        q, k, v = ops.layer_attn_in(
            hidden_states, norm_in.weight, norm_in.variance_epsilon, pq, wq, attn.q_proj.bias,
            pk, wk, attn.k_proj.bias, pv, wv, attn.v_proj.bias, cos, sin, attn.head_dim,
        )
        store(step, idx, k, v, family)
        k_pool, v_pool = step.pool.layer(idx)
        plan = step.plans[step.windows[idx]]
        out = cascade_attention(q, k_pool, v_pool, plan, attn.scaling, step.impl)
        return ops.layer_attn_out(
            hidden_states, out, po, wo, attn.o_proj.bias, norm_out.weight,
            norm_out.variance_epsilon, pg, wg, mlp.gate_proj.bias, pu, wu, mlp.up_proj.bias, pd,
            wd, mlp.down_proj.bias,
        )

    def forward(hidden_states, attention_mask=None, position_ids=None, cache=None,
                use_cache=False, position_embeddings=None, **kwargs):
        cos, sin = position_embeddings if position_embeddings is not None else (None, None)
        key = (type(layer), dtype)
        if (
            _PROBED.get(key) is False
            or attention_mask is not None or kwargs or not isinstance(cache, PoolCache)
            or cos is None or attn.training or current_step().latent is not None
            or attn.config._attn_implementation != ATTN_NAME
            or hidden_states.dtype != dtype or hidden_states.dim() != 3
            or hidden_states.shape[0] != 1 or cos.dim() != 3
            or cos.dtype != dtype or sin.dtype != dtype
        ):
            return own(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                       cache=cache, use_cache=use_cache,
                       position_embeddings=position_embeddings, **kwargs)
        if key not in _PROBED:  # ours first, then the layer's own (its pool write stands)
            got = run(hidden_states, cos, sin)
            want = own(hidden_states, position_ids=position_ids, cache=cache,
                       use_cache=use_cache, position_embeddings=position_embeddings)
            _PROBED[key] = agree_bits(want, got, dtype, family + ".forward")
            return want
        out = run(hidden_states, cos, sin)
        current_step().attended.add(idx)
        return out

    return forward


class FusedLayers:
    """The model's Llama-like layers (found once), switched onto the native halves for a step
    when their norms, MLP, RoPE and linear layers are fused and packed for it."""

    def __init__(self, model: nn.Module, forwards: FusedForwards, linears: PackedLinears) -> None:
        self.layers = candidates(model) if len(forwards) and len(linears) else []
        self.forwards, self.linears = forwards, linears
        self._made: dict[nn.Module, tuple[tuple, Callable]] = {}  # layer -> (weights, forward)

    @contextmanager
    def enabled(self) -> Iterator[None]:
        """Inside the packed linears' and fused forwards' blocks, for one step."""
        installed = []
        fused = self.forwards.fused_now()
        rope = {mod.__name__ for mod in self.forwards.rope_now()}
        for layer in self.layers:
            parts = (layer.input_layernorm, layer.post_attention_layernorm, layer.mlp)
            if not all(p in fused for p in parts) or type(layer.self_attn).__module__ not in rope:
                continue  # its norms, MLP or RoPE run their own code this step
            weights = _weights(layer, self.linears)
            if weights is None:
                continue
            made = self._made.get(layer)
            if made is None or any(a is not b for a, b in zip(made[0], weights, strict=True)):
                made = self._made[layer] = (weights, _fused(layer, weights))
            layer.__dict__["forward"] = made[1]
            installed.append(layer)
        try:
            yield
        finally:
            for layer in installed:
                layer.__dict__.pop("forward", None)
