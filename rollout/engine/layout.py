"""The attention layout of a model, per layer, derived once from its config.

Cascade attention is the same product in every layer except for per-layer attention terms; the
engine builds one `CascadePlan` per distinct term and each layer picks its own (by `layer_idx`).
Today the term is the sliding window: transformers' configs give `sliding_window` plus
`layer_types` ("sliding_attention" / "full_attention", per layer: Gemma 2/3, Cohere 2, gpt-oss,
Qwen2 with `use_sliding_window` and `max_window_layers`); a config with a window and no
`layer_types` (Mistral, Mixtral, Phi-3, Starcoder2) windows every layer. A model without windows
has one plan per step, as before.

NOTE: blocks are not freed when they fall out of every window: a model with a full layer still
reads them, and even an all-sliding model (Mistral) keeps a node's blocks while any branch below
it lives (freeing them early would be a per-node clip of `KVNode.blocks`, not done).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig

from .mla import LatentDims, latent_dims


@dataclass(frozen=True)
class KVLayout:
    """Per layer: its sliding window in tokens (None: full attention).

    windows: [num_hidden_layers]; a query at position p of a layer with window W sees keys at
    p - W < k <= p (transformers' `sliding_window_overlay`).
    """

    windows: tuple[int | None, ...]
    latent: LatentDims | None = None  # MLA: the pool holds each token's latent (mla.py)

    @property
    def distinct_windows(self) -> tuple[int | None, ...]:
        """The windows one step needs a plan for, in first-layer order."""
        return tuple(dict.fromkeys(self.windows))


def layer_windows(config: PretrainedConfig) -> tuple[int | None, ...]:
    """Each layer's sliding window (None for full layers), from the text config."""
    text = config.get_text_config()
    n_layers = int(text.num_hidden_layers)
    window = getattr(text, "sliding_window", None)
    if not window or getattr(text, "use_sliding_window", True) is False:
        return (None,) * n_layers
    layer_types = getattr(text, "layer_types", None)
    if layer_types is None:
        return (int(window),) * n_layers
    sliding = ("sliding_attention", "hybrid_sliding")  # hybrid_sliding: a window and a state
    return tuple(int(window) if kind in sliding else None for kind in layer_types)


def kv_layout(config: PretrainedConfig) -> KVLayout:
    return KVLayout(windows=layer_windows(config), latent=latent_dims(config))
