"""The recurrent state of a hybrid model: which layers hold it, its tensors, and its mixers.

transformers 5.x keeps every hybrid's state (Jamba, Qwen3-Next, Falcon-H1, Nemotron-H, Granite 4,
Kimi Linear, OLMo hybrid, LFM2, ...) in `LinearAttentionLayer`s of its `DynamicCache`: per layer,
a convolution window and a recurrent state, behind one API (`get_conv_state`,
`update_conv_state`, `get_recurrent_state`, `update_recurrent_state`). So nothing here is per
family: `state_layout` reads the stateful layers from the model's own cache layout, finds the
modules that call that API, and probes once per model and dtype:
  - the state tensors' shapes and dtypes, from a 5-token forward of the model's own cache;
  - per mixer, whether its multi-token forward continues a state as its one-token forward does
    (Qwen3-Next's does; Jamba's restarts its scan from zero), on a float copy of the module.
"""

from __future__ import annotations

import copy
import inspect
import weakref
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import LinearAttentionCacheLayerMixin

from .features import UnsupportedModelError, family

_PROBE_IDS = [1, 2, 3, 4, 5]
CACHE_NAMES = ("cache", "cache_params", "past_key_values")
_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class StateSpec:
    """One state tensor of one layer, as transformers' cache holds it for a batch of one."""

    layer: int
    kind: str  # "conv" or "recurrent" (LinearAttentionLayer.conv_states / .recurrent_states)
    index: int  # state_idx
    shape: tuple[int, ...]  # without the batch dim
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return int(torch.Size(self.shape).numel()) * itemsize


@dataclass(frozen=True)
class StateLayout:
    """The stateful layers of a hybrid model: their state tensors and their mixer modules."""

    specs: tuple[StateSpec, ...]
    mixers: dict[int, list[torch.nn.Module]]  # layer -> the modules that read and write its state
    # ids of the mixers whose multi-token forward continues a state exactly (else: token by token)
    continues: frozenset[int] = field(default_factory=frozenset)

    def at(self, layer: int) -> list[StateSpec]:
        return [s for s in self.specs if s.layer == layer]


def linear_layers(model: torch.nn.Module) -> list[int]:
    """Layers whose cache transformers keeps as conv / recurrent state (LinearAttentionLayer)."""
    try:
        cache = DynamicCache(config=model.config.get_text_config())
    except Exception:  # noqa: BLE001 - no cache layout: the config checks (features.py) decide
        return []
    stateful = LinearAttentionCacheLayerMixin
    return [i for i, layer in enumerate(cache.layers) if isinstance(layer, stateful)]


def _touches_state(module: torch.nn.Module) -> bool:
    try:
        src = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False
    return any(api in src for api in ("conv_state", "recurrent_state"))


def find_mixers(model: torch.nn.Module, layers: list[int]) -> dict[int, list[torch.nn.Module]]:
    """The modules of each stateful layer that call the cache's state API (by `layer_idx`):
    one mixer (Mamba, DeltaNet), or several short convolutions on their own state indices."""
    found: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        if isinstance(getattr(module, "layer_idx", None), int) and _touches_state(module):
            found.setdefault(module.layer_idx, []).append(module)
    if sorted(found) != layers:
        seen = {i: [type(m).__name__ for m in ms] for i, ms in sorted(found.items())}
        raise UnsupportedModelError(
            f"{family(model)}: recurrent layers {layers} (from its cache layout) but state-API "
            f"modules per layer {seen}: a state layout the tree engine does not implement; "
            "sample it with path='native'",
            native_ok=True,
        )
    return found


def state_layout(model: torch.nn.Module) -> StateLayout | None:
    """The model's state layout (None: no stateful layers); probed once per model and dtype."""
    param = next(model.parameters())
    key = (param.dtype, param.device)
    cached = _LAYOUTS.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    layers = linear_layers(model)
    layout = None
    if layers:
        mixers = find_mixers(model, layers)
        specs, widths = _probe_specs(model, layers, mixers)
        config = model.config.get_text_config()
        continues = frozenset(
            id(m) for ms in mixers.values() for m in ms if _continues(m, widths[id(m)], config)
        )
        layout = StateLayout(specs, mixers, continues)
    _LAYOUTS[model] = (key, layout)
    return layout


def cache_argument(module: torch.nn.Module) -> str | None:
    """The name a mixer's forward takes its cache by."""
    params = inspect.signature(module.forward).parameters
    return next((n for n in CACHE_NAMES if n in params), None)


def _probe_specs(
    model: torch.nn.Module, layers: list[int], mixers: dict[int, list[torch.nn.Module]]
) -> tuple[tuple[StateSpec, ...], dict[int, int]]:
    """The state tensors after a 5-token forward, and each mixer's input width."""
    from .attention_adapter import ATTN_NAME  # the probe runs the model's own attention

    cache = DynamicCache(config=model.config.get_text_config())
    widths: dict[int, int] = {}

    def record(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else next(iter(kwargs.values()))
        widths[id(module)] = hidden.shape[-1]

    hooks = [
        m.register_forward_pre_hook(record, with_kwargs=True) for ms in mixers.values() for m in ms
    ]
    previous = model.config._attn_implementation
    if previous == ATTN_NAME:
        model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            ids = torch.tensor([_PROBE_IDS], device=next(model.parameters()).device)
            model(input_ids=ids, cache=cache, use_cache=True)
    finally:
        for hook in hooks:
            hook.remove()
        if previous == ATTN_NAME:
            model.set_attn_implementation(ATTN_NAME)
    specs = []
    for i in layers:
        layer = cache.layers[i]
        for kind, states in (("conv", layer.conv_states), ("recurrent", layer.recurrent_states)):
            for idx, t in states.items():
                if t is not None:
                    specs.append(StateSpec(i, kind, idx, tuple(t.shape[1:]), t.dtype))
    return tuple(specs), widths


def _continues(module: torch.nn.Module, width: int, config: object) -> bool:
    """Whether 4 tokens then 4 more in one call give what 4 then 4 single tokens give (outputs
    and final state), on an fp32 copy of the mixer with its own transformers cache. Any failure
    means no: the engine then feeds continuations token by token, which every mixer supports."""
    name = cache_argument(module)
    mixer = copy.deepcopy(module).float()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 8, width, generator=gen).to(next(mixer.parameters()).device)

    def run(split: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        cache = DynamicCache(config=config)
        pieces = [x[:, :4]] + ([x[:, t : t + 1] for t in range(4, 8)] if split else [x[:, 4:]])
        out = torch.cat([mixer(p, **{name: cache}) for p in pieces], dim=1)
        layer = cache.layers[module.layer_idx]
        states = [t for t in (*layer.conv_states.values(), *layer.recurrent_states.values())]
        return out, [t for t in states if t is not None]

    try:
        with torch.inference_mode():
            (a, sa), (b, sb) = run(split=True), run(split=False)
        same = len(sa) == len(sb) and all(
            u.shape == v.shape and torch.allclose(u, v, rtol=1e-4, atol=1e-5)
            for u, v in zip([a, *sa], [b, *sb], strict=True)
        )
    except Exception:  # noqa: BLE001 - a mixer that cannot run alone: token by token
        return False
    return bool(same)
