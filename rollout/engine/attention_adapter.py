"""Plugs cascade attention into any transformers model through its own attention interface.

The model keeps its embeddings, RoPE, norms and MLPs; only the attention call changes. The engine
forwards one packed row of all the step's tokens with explicit `position_ids` inside
`with step_context(ctx):`, a context variable that our cache object (`PoolCache.update` stores
the new keys/values in the block pool) and our attention function (which runs `cascade_attention`
over the step's plan) read. A context, not a keyword: not every model forwards `**kwargs` from its
layers to the attention call (GPT-NeoX, Nemotron). No attention mask is built: the plan is the
mask (our implementation is not a mask interface, so transformers skips building one).

The attention reads keys/values from the pool, not its arguments, so it checks that they are the
very tensors `PoolCache.update` returned for the layer, once per layer per step; a model that
changes them in between (JetMoE's head repeat, DiffLlama's split values) or attends twice would
otherwise be silently wrong, and is refused by name instead.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from transformers import AttentionInterface
from tree_kernels.cascade import add_sinks, cascade_attention
from tree_kernels.plan import CascadePlan

from .block_pool import BlockPool
from .features import UnsupportedModelError, refuse
from .mla import LatentDims, absorb_query, caches_latent, expand_output

if TYPE_CHECKING:
    from .state_store import StateStep

ATTN_NAME = "tree_cascade"
# keyword arguments of the attention call that change its math and the engine does not compute
# (`s_aux`, one learned sink logit per head, and `softcap` it does: see `add_sinks`, and
# cascade_attention's softcap)
_MATH_KWARGS = {
    "sinks": "per-token attention sinks (sinks=) are",
    "alibi_slopes": "ALiBi position biases are",
}
# ... and with latent attention (mla.py), which folds neither in
_LATENT_KWARGS = {
    "s_aux": "learned attention sinks with latent attention are",
    "softcap": "attention logit soft-capping with latent attention is",
}


@dataclass
class StepContext:
    """What the attention layers need for one engine step."""

    pool: BlockPool
    plans: dict[int | None, CascadePlan]  # window (None: full attention) -> the step's plan
    windows: Sequence[int | None]  # per layer: its window, the key of its plan (KVLayout)
    slots: torch.Tensor  # [T] int64 flat pool slot of each new token
    impl: str = "auto"
    latent: LatentDims | None = None  # MLA: the pool holds latents (mla.py)
    # layer -> (keys, values) PoolCache.update returned and no attention call has consumed yet
    stored: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    attended: set[int] = field(default_factory=set)
    states: StateStep | None = None  # hybrid models: the step's state slots (state_store.py)


_STEP: ContextVar[StepContext | None] = ContextVar("tree_step", default=None)


@contextmanager
def step_context(ctx: StepContext) -> Iterator[StepContext]:
    """Make `ctx` the step the cache and attention calls read, for the model forward inside."""
    token = _STEP.set(ctx)
    try:
        yield ctx
    finally:
        _STEP.reset(token)


def current_step() -> StepContext:
    step = _STEP.get()
    if step is None:
        raise RuntimeError(
            f"attn_implementation={ATTN_NAME!r} runs only inside the rollout engine (the model "
            "was called outside `step_context`); restore the model's own attention with "
            "cascade_attention_enabled, or call it through rollout.sample_tree"
        )
    return step


def check_step_done(model: torch.nn.Module, step: StepContext) -> None:
    """After the forward: every layer that stored keys/values attended over them."""
    if step.stored:
        raise refuse(
            model,
            f"attention outside the AttentionInterface (layers {sorted(step.stored)} stored "
            "keys/values but never called the interface) is",
        )


class PoolCache:
    """A transformers cache that stores each layer's new keys/values in the block pool.

    It returns the new keys/values unchanged: the attention function reads the whole path from the
    pool through the plan, so nothing is concatenated. A step's rows sit at different positions
    of different trees, so there is no one "past length": positions always come from the
    engine's `position_ids`, and `get_seq_length` is 0, which keeps whatever a model sizes from
    it (OPT's and CTRL's fallback position masks) to the step's own tokens.
    """

    is_compileable = False
    is_initialized = False  # no layer holds a transformers-style past (HRM, first-call checks)

    def __init__(self, family: str = "model") -> None:
        self.family = family

    def __getattr__(self, name: str) -> Any:
        # Any other cache API (cache.layers, conv/recurrent state, ...) means the model reads or
        # loops over a past the pool does not keep in that form: refuse by name, never guess.
        raise missing_cache_api(
            name,
            f"{self.family}: the model uses cache.{name}, which the tree engine's pool cache does "
            "not implement (it keeps no transformers-style per-layer past); not supported",
        )

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        step = current_step()
        if step.latent is not None:  # MLA: (latent c [1, 1, T, rank], k_rot [1, 1, T, rope])
            return self._update_latent(key_states, value_states, layer_idx, step)
        store(step, layer_idx, key_states, value_states, self.family)
        step.stored[layer_idx] = (key_states, value_states)
        return key_states, value_states

    def _update_latent(
        self, c: torch.Tensor, k_rot: torch.Tensor, layer_idx: int, step: StepContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dims, t = step.latent, step.slots.shape[0]
        if tuple(c.shape) != (1, 1, t, dims.rank) or tuple(k_rot.shape) != (1, 1, t, dims.rope):
            raise UnsupportedModelError(
                f"{self.family}: layer {layer_idx} caches {tuple(c.shape)} and "
                f"{tuple(k_rot.shape)}, not the latent [1, 1, T, {dims.rank}] and RoPE key "
                f"[1, 1, T, {dims.rope}] of multi-head latent attention; this MLA variant is not "
                "implemented by the tree engine"
            )
        latent = torch.cat([c, k_rot], dim=-1)[0].transpose(0, 1)  # [T, 1, rank + rope]
        step.pool.write(layer_idx, step.slots, latent, latent)
        step.stored[layer_idx] = (c, k_rot)
        return c, k_rot

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        """(kv_length, kv_offset) as a mask builder would read them: the step's own tokens."""
        return query_length, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return 0


def store(step: StepContext, layer_idx: int, key_states: torch.Tensor,
          value_states: torch.Tensor, family: str) -> None:
    """Write one layer's new keys/values [1, KVH, T, D] into the pool, once per step and layer
    and in the shape the pool was sized for (else refused by name)."""
    pool = step.pool
    want = (1, pool.k.shape[-2], step.slots.shape[0], pool.k.shape[-1])
    if (
        not 0 <= layer_idx < pool.k.shape[0]
        or layer_idx in step.attended
        or layer_idx in step.stored
    ):
        raise UnsupportedModelError(
            f"{family}: layer {layer_idx} stored keys/values twice in one step or past "
            f"the {pool.k.shape[0]} layers of config.num_hidden_layers (layers run in loops or "
            "share cache slots): not implemented by the tree engine"
        )
    if tuple(key_states.shape) != want or tuple(value_states.shape) != want:
        raise UnsupportedModelError(
            f"{family}: layer {layer_idx} stores keys {tuple(key_states.shape)} and "
            f"values {tuple(value_states.shape)}, but the pool was sized [1, KVH, T, D] = "
            f"{want} from the config (num_key_value_heads, head_dim): this KV layout (MLA "
            "latents, separate K/V dims) is not implemented by the tree engine"
        )
    pool.write_states(layer_idx, step.slots, key_states, value_states)


class UnsupportedCacheAttribute(UnsupportedModelError, AttributeError):
    """A cache method or attribute the pool cache does not provide."""


def missing_cache_api(name: str, message: str) -> AttributeError:
    """What a cache object's `__getattr__` raises for `name`: a refusal, and an AttributeError
    too, so `hasattr(cache, name)` probes still answer False (dunders: a plain one)."""
    if name.startswith("__"):
        return AttributeError(name)
    return UnsupportedCacheAttribute(message)


def tree_cascade_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query [1, H, T, D] -> output [1, T, H, D], attending over the pool via the step's plan."""
    step = current_step()
    if step.latent is not None:
        return _latent_attention(module, query, dropout, scaling, kwargs, step)
    _check_call(module, key, value, dropout, kwargs, step)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    k_pool, v_pool = step.pool.layer(module.layer_idx)
    plan = step.plans[step.windows[module.layer_idx]]
    q = query[0].transpose(0, 1)  # [T, H, D]
    sinks, softcap = kwargs.get("s_aux"), kwargs.get("softcap")
    if sinks is None:
        out = cascade_attention(q, k_pool, v_pool, plan, scaling, step.impl, softcap=softcap)
    else:
        if tuple(sinks.shape) != (q.shape[1],):
            raise UnsupportedModelError(
                f"{type(module).__name__}: attention sinks of shape {tuple(sinks.shape)} for "
                f"{q.shape[1]} heads (s_aux=; one logit per query head is what the engine "
                "computes) are not implemented by the tree engine"
            )
        out, lse = cascade_attention(
            q, k_pool, v_pool, plan, scaling, step.impl, return_lse=True, softcap=softcap
        )
        out, _ = add_sinks(out, lse, sinks)
    return out.unsqueeze(0), None


def _latent_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    dropout: float,
    scaling: float | None,
    kwargs: dict[str, Any],
    step: StepContext,
) -> tuple[torch.Tensor, None]:
    """MLA over the cached latents (mla.py): absorb W_UK into the queries, a multi-query
    cascade over [c, k_rot], W_UV on the output. query [1, H, T, nope + rope] -> [1, T, H, v]."""
    layer = module.layer_idx
    if not caches_latent(module) or step.stored.pop(layer, None) is None:
        raise UnsupportedModelError(
            f"{type(module).__name__} (layer {layer}): multi-head latent attention without a "
            "cached latent and a bias-free kv_b_proj is not implemented by the tree engine"
        )
    _check_call_terms(type(module).__name__, dropout, kwargs, latent=True)
    step.attended.add(layer)
    dims = step.latent
    q = absorb_query(module, query[0].transpose(0, 1), dims)  # [T, H, rank + rope]
    k_pool, v_pool = step.pool.layer(layer)
    plan = step.plans[step.windows[layer]]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = cascade_attention(q, k_pool, v_pool, plan, scale, step.impl)
    return expand_output(module, out, dims).unsqueeze(0), None


def _check_call_terms(name: str, dropout: float, kwargs: dict[str, Any], latent: bool) -> None:
    """Refuse math the call asks for that the engine does not compute; eval mode only."""
    terms = {**_MATH_KWARGS, **_LATENT_KWARGS} if latent else _MATH_KWARGS
    for kw, feature in terms.items():
        if kwargs.get(kw) is not None:
            raise UnsupportedModelError(
                f"{name}: {feature} passed to the attention call ({kw}=); not implemented by "
                "the tree engine"
            )
    if dropout:
        raise ValueError(
            f"{name} calls attention with dropout={dropout}: the model is in training mode; "
            "call model.eval() before sampling"
        )


def _check_call(
    module: torch.nn.Module,
    key: torch.Tensor,
    value: torch.Tensor,
    dropout: float,
    kwargs: dict[str, Any],
    step: StepContext,
) -> None:
    """The call attends exactly what the pool holds for its layer, with plain softmax math."""
    layer = getattr(module, "layer_idx", None)
    name = type(module).__name__
    _check_call_terms(name, dropout, kwargs, latent=False)
    stored = step.stored.pop(layer, None) if layer is not None else None
    if stored is None or key is not stored[0] or value is not stored[1]:
        raise UnsupportedModelError(
            f"{name} (layer {layer}) attends keys/values other than those it stored in the cache "
            "this step (changed between cache.update and the attention call, shared from "
            "another layer, or attended twice); the tree engine reads them from the pool, so "
            "this attention is not implemented by it"
        )
    step.attended.add(layer)


AttentionInterface.register(ATTN_NAME, tree_cascade_attention)


@contextmanager
def cascade_attention_enabled(model: torch.nn.Module) -> Iterator[None]:
    """Switch `model` to cascade attention for the block, then restore its own implementation."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTN_NAME)
    if model.config._attn_implementation != ATTN_NAME:
        raise refuse(model, "switching its attention implementation (set_attn_implementation) is")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
