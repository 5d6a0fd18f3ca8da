"""A hybrid model's recurrent mixers, run per path inside the cascade engine's packed row.

The engine forwards one packed row of many paths' tokens. Attention layers read each query's
path through the plan; a recurrent, convolution or linear-attention mixer (Mamba, GatedDeltaNet,
KDA, short convs) would carry its state across path boundaries in that row. So while the engine
runs, each mixer's forward is wrapped (`state_mixers_enabled`): it splits the row by path and
calls the model's own mixer on each piece with a `SlotCache` that holds the piece's state,
gathered from its KV node's slot (state_store.py) and written back after the call.

  decode rows (one token, a state before it)   one batched call, [n, 1, hidden]
  a first forward (no state yet: a prompt)     one call per node, its whole chunk
  a continuation of several tokens             one call, where the probe found the mixer's
  (a chunked prompt, an agent's observation)   multi-token path continues a state
                                               (state_layout.py), else one call per token:
                                               Jamba's multi-token scan restarts from zero,
                                               while every mixer's one-token path continues

`SlotCache` answers the state API transformers' mixers call (`get_conv_state`,
`update_conv_state`, `get_recurrent_state`, `update_recurrent_state`, `has_previous_state`,
`is_recording_past`) with `LinearAttentionLayer`'s semantics; any other cache call is refused by
name, never guessed.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from .attention_adapter import current_step, missing_cache_api
from .features import UnsupportedModelError
from .state_layout import CACHE_NAMES, StateLayout, StateSpec, cache_argument
from .state_store import StateStore


class SlotCache:
    """One mixer call's cache: the states of `slots` at one layer (LinearAttentionLayer's rules)."""

    def __init__(
        self, store: StateStore, layer: int, slots: torch.Tensor, fresh: bool, family: str
    ) -> None:
        self.store, self.layer, self.slots, self.family = store, layer, slots, family
        self.specs = {(s.kind, s.index): s for s in store.layout.at(layer)}
        self.states: dict[tuple[str, int], torch.Tensor] = {}
        # transformers marks a state index as having a past when its conv state is updated
        self.previous = {i: not fresh for kind, i in self.specs if kind == "conv"}
        if not fresh:
            for key, spec in self.specs.items():
                self.states[key] = store.gather(spec, slots)

    def __getattr__(self, name: str) -> Any:
        raise missing_cache_api(
            name,
            f"{self.family}: the recurrent mixer of layer {self.layer} uses cache.{name}, which "
            "the tree engine's state slots do not implement; sample it with path='native'",
        )

    def _check(self, layer_idx: int) -> None:
        if layer_idx != self.layer:
            raise UnsupportedModelError(
                f"{self.family}: the mixer of layer {self.layer} reads the state of layer "
                f"{layer_idx}: shared states are not implemented by the tree engine",
                native_ok=True,
            )

    def is_recording_past(self, layer_idx: int) -> bool:
        return False

    def has_previous_state(
        self, layer_idx: int | None = None, state_idx: int | None = None
    ) -> bool:
        return self.previous.get(state_idx or 0, False)

    def get_conv_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor | None:
        self._check(layer_idx)
        return self.states.get(("conv", state_idx)) if self.previous.get(state_idx) else None

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor | None:
        self._check(layer_idx)
        return self.states.get(("recurrent", state_idx)) if self.previous.get(state_idx) else None

    def update_conv_state(
        self, conv_states: torch.Tensor, layer_idx: int, state_idx: int = 0, **kwargs: Any
    ) -> torch.Tensor:
        """Returns the conv input with its left context; keeps the last kernel-size columns."""
        self._check(layer_idx)
        spec = self._spec("conv", state_idx)
        width = spec.shape[-1]
        if self.previous.get(state_idx):
            full = torch.cat([self.states[("conv", state_idx)], conv_states], dim=-1)
        else:
            full = conv_states
            self.previous[state_idx] = True
            if full.shape[-1] < width:
                full = F.pad(full, (width - full.shape[-1], 0))
        self._store(("conv", state_idx), full[..., -width:])
        return full

    def update_recurrent_state(
        self, recurrent_states: torch.Tensor, layer_idx: int, state_idx: int = 0, **kwargs: Any
    ) -> torch.Tensor:
        self._check(layer_idx)
        self._spec("recurrent", state_idx)
        return self._store(("recurrent", state_idx), recurrent_states)

    def _spec(self, kind: str, index: int) -> StateSpec:
        spec = self.specs.get((kind, index))
        if spec is None:
            raise UnsupportedModelError(
                f"{self.family}: layer {self.layer} updates a {kind} state {index} its probe did "
                "not show: a state layout that depends on the input, not implemented by the tree "
                "engine",
                native_ok=True,
            )
        return spec

    def _store(self, key: tuple[str, int], value: torch.Tensor) -> torch.Tensor:
        have = self.states.get(key)
        if have is not None and have.shape == value.shape:
            return have.copy_(value)  # in place, as transformers' static state tensors
        self.states[key] = value.clone()
        return self.states[key]

    def write_back(self) -> None:
        """Store the call's states into the slots (shapes checked against the probe's)."""
        n = self.slots.shape[0]
        for key, state in self.states.items():
            spec = self.specs[key]
            if tuple(state.shape) != (n, *spec.shape) or state.dtype != spec.dtype:
                raise UnsupportedModelError(
                    f"{self.family}: layer {self.layer}'s {key[0]} state is "
                    f"{tuple(state.shape)} {state.dtype}, the probe's was {spec.shape} "
                    f"{spec.dtype} per path: a state that changes shape is not implemented by "
                    "the tree engine",
                    native_ok=True,
                )
            self.store.scatter(spec, self.slots, state)


def _mixer_forward(module: torch.nn.Module, own: Any, family: str, continues: bool) -> Any:
    sig = inspect.signature(own)
    hidden_name = next(iter(sig.parameters))
    cache_name = cache_argument(module)
    if cache_name is None:
        raise UnsupportedModelError(
            f"{family}: {type(module).__name__}.forward takes no cache argument: not "
            "implemented by the tree engine",
            native_ok=True,
        )

    def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        for alias in CACHE_NAMES:  # deprecated spellings the layer may still pass
            if alias in kwargs and alias not in sig.parameters:
                kwargs[cache_name] = kwargs.pop(alias)
        bound = sig.bind(*args, **kwargs).arguments
        hidden = bound.pop(hidden_name)  # [1, T, hidden]
        bound.pop(cache_name, None)
        if "attention_mask" in bound:  # each piece is one unpadded path
            bound["attention_mask"] = None
        t = hidden.shape[1]
        for name, value in bound.items():  # per-token inputs would not follow the split
            if t > 1 and isinstance(value, torch.Tensor) and t in value.shape[:2]:
                raise UnsupportedModelError(
                    f"{family}: {type(module).__name__} takes a per-token input {name}= beside "
                    "its hidden states: not implemented by the tree engine",
                    native_ok=True,
                )
        st = current_step().states
        if st is None:
            raise RuntimeError("a hybrid model's mixer ran outside a state-aware engine step")
        layer = module.layer_idx

        def call(x: torch.Tensor, slots: torch.Tensor, fresh: bool) -> torch.Tensor:
            cache = SlotCache(st.store, layer, slots, fresh, family)
            out = own(x, **{cache_name: cache}, **bound)
            if not isinstance(out, torch.Tensor):
                raise UnsupportedModelError(
                    f"{family}: {type(module).__name__} returns {type(out).__name__}, not a "
                    "tensor: not implemented by the tree engine",
                    native_ok=True,
                )
            cache.write_back()
            return out

        out = None
        parts: list[tuple[torch.Tensor | slice, torch.Tensor]] = []
        if st.decode_rows is not None:
            y = call(hidden[0, st.decode_rows].unsqueeze(1), st.decode_slots, fresh=False)
            parts.append((st.decode_rows, y[:, 0]))
        for start, length, slot, fresh in st.pieces:
            if fresh or continues:
                y = call(hidden[:, start : start + length], slot, fresh)[0]
            else:
                y = torch.cat(
                    [
                        call(hidden[:, t : t + 1], slot, False)[0]
                        for t in range(start, start + length)
                    ]
                )
            parts.append((slice(start, start + length), y))
        for where, y in parts:
            if out is None:
                out = hidden.new_empty(1, t, y.shape[-1], dtype=y.dtype)
            out[0, where] = y
        return out

    return forward


MixerForwards = list[tuple[torch.nn.Module, Any]]  # (mixer, its per-path forward)


def mixer_forwards(layout: StateLayout, family: str) -> MixerForwards:
    """Each stateful layer's mixers with their per-path forwards, made once per run."""
    return [
        (m, _mixer_forward(m, m.forward, family, id(m) in layout.continues))
        for ms in layout.mixers.values()
        for m in ms
    ]


@contextmanager
def state_mixers_enabled(forwards: MixerForwards) -> Iterator[None]:
    """Put each mixer's per-path forward in place for the block (an instance attribute over the
    class's forward, or over one set before, as accelerate's hooks do), then restore them."""
    wrapped: list[tuple[torch.nn.Module, Any]] = []
    try:
        for module, forward in forwards:
            wrapped.append((module, module.__dict__.get("forward")))
            module.forward = forward
        yield
    finally:
        for module, before in wrapped:
            if before is None:
                del module.forward
            else:
                module.forward = before
