"""Attention features the tree engine does not implement, refused by name before any work runs.

The engine swaps only the attention call (cascade attention over the block pool: plain causal
softmax(q k^T * scaling) v over each query's path) and keeps the rest of the model. Anything that
changes that math, or keeps state outside per-token keys/values, would make log-probs silently
wrong, so it is refused here with the family and the feature named: ALiBi (Bloom, MPT), MLA
variants other than DeepSeek's, recurrent or linear-attention layers whose state transformers
does not keep in its `LinearAttentionLayer` cache (MiniMax, RWKV-style), bidirectional attention
(BERT-style models without `is_decoder`), and attention code outside transformers'
AttentionInterface (Falcon, Bloom, BioGPT, ...). What a config cannot reveal is
caught at run time by the attention adapter (keys/values changed between the cache and the
attention call, a layer attended twice).

Computed, not refused: sliding windows (each sliding layer reads a plan whose segment paths are
clipped to its window: layout.py, kernels/plan.py), learned per-head attention sinks (s_aux=,
folded into the merged log-sum-exp: tree_kernels.cascade.add_sinks), attention logit
soft-capping (softcap=, applied to the scores in the reference and Triton kernels), DeepSeek's
MLA (mla.py), and hybrid models whose recurrent layers keep their conv and recurrent state in
transformers' `LinearAttentionLayer` (Jamba, Qwen3-Next, Falcon-H1, Nemotron-H, Granite 4,
Kimi Linear, ...): a state slot per KV node (state_store.py), each mixer run per path
(state_mixers.py).

ALiBi is in the kernels too (alibi= slopes, tests/test_alibi.py holds it against Bloom's own
attention), but every family in transformers that uses it (Bloom, MPT, Falcon's alibi variant)
computes its attention in code of its own, outside the interface, so the cascade never sees those
calls: the check stays, and these families run on the native path (native_run.py).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import PretrainedConfig

from .mla import caches_latent, latent_dims

# layer kinds cascade attention computes exactly (sliding layers through windowed plans)
ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})
_FIX = "use a model without it, or sample with transformers' own generate"


class UnsupportedModelError(TypeError):
    """The model uses something the tree engine does not implement (named in the message).

    `native_ok`: the native path (native_run.py: the model's own cache, copied at each fork) runs
    the model exactly, so only the cascade engine refuses it and `Engine(path="auto")` takes that
    path instead. False for what no path computes (bidirectional encoders, models with no cache)."""

    def __init__(self, message: str, native_ok: bool = False) -> None:
        super().__init__(message)
        self.native_ok = native_ok


def family(model: torch.nn.Module) -> str:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", None) or type(model).__name__


def refuse(
    model: torch.nn.Module, feature: str, native_ok: bool = False
) -> UnsupportedModelError:
    fix = "or sample it with path='native' (Engine, sample_tree)" if native_ok else _FIX
    return UnsupportedModelError(
        f"{family(model)}: {feature} not implemented by the tree engine; {fix}", native_ok
    )


def _truthy(cfg: Any, *names: str) -> str | None:
    """The first of `names` that `cfg` sets to something other than None/False/0/empty."""
    for name in names:
        if getattr(cfg, name, None) not in (None, False, 0, "", [], ()):
            return name
    return None


def check_features(model: torch.nn.Module) -> None:
    """Raise UnsupportedModelError for the first attention feature the cascade engine would get
    wrong; `native_ok` says whether the native path runs the model (what neither path runs is
    named first)."""
    check_native(model)
    text = model.config.get_text_config()
    # hybrid first: a tiny hybrid may hold only its recurrent layers, and that is the reason
    for check in (_hybrid, _interface, _positions, _no_attention, _sinks, _alibi, _mla):
        feature = check(model, text)
        if feature:
            raise refuse(model, feature, native_ok=True)


def check_native(model: torch.nn.Module) -> None:
    """Raise UnsupportedModelError for what the native path cannot run exactly either: a model
    that is not causal, or one whose forward keeps no cache to copy at a fork."""
    text: PretrainedConfig = model.config.get_text_config()
    for check in (_causality, _no_cache, _native_family):
        feature = check(model, text)
        if feature:
            raise refuse(model, feature)


def _interface(model: torch.nn.Module, text: PretrainedConfig) -> str | None:
    # transformers' own test (the model's source calls ALL_ATTENTION_FUNCTIONS.get_interface):
    # `_supports_attention_backend` is narrower (StableLM routes through the interface without it)
    if not type(model)._can_set_attn_implementation():
        return (
            "attention code outside transformers' AttentionInterface (its layers never call "
            "ALL_ATTENTION_FUNCTIONS) is"
        )
    return None


def _positions(model: torch.nn.Module, text: PretrainedConfig) -> str | None:
    # the engine packs rows of many trees into one and gives each token its position; a model
    # without `position_ids` numbers tokens from the cache length (BART-style decoders)
    if "position_ids" not in inspect.signature(model.forward).parameters:
        return "positions counted from the cache length (forward takes no position_ids) are"
    return None


def _causality(model: torch.nn.Module, text: PretrainedConfig) -> str | None:
    if _truthy(text, "add_cross_attention"):
        return "cross-attention (config.add_cross_attention) is"
    # BERT-style layers attend both ways unless config.is_decoder (BART-style decoders set it)
    if (name := next((n for n, m in model.named_modules() if getattr(m, "is_decoder", 1) is False),
                     None)) is not None:
        return (
            f"bidirectional attention ({name}.is_decoder is False; BERT-style models need "
            "config.is_decoder=True to be causal LMs) is"
        )
    if getattr(text, "causal", True) is False:  # XLM: a masked LM unless causal=True
        return "bidirectional attention (config.causal is False) is"
    attention = [(name, m) for name, m in model.named_modules() if "Attention" in type(m).__name__]
    for name, module in attention:
        cross = getattr(module, "is_cross_attention", False) or "encoder_attn" in name
        if not cross and getattr(module, "is_causal", True) is False:
            return (
                f"bidirectional attention ({name}.is_causal is False; BERT-style models need "
                "config.is_decoder=True to be causal LMs) is"
            )
    return None


def _no_attention(model: torch.nn.Module, text: PretrainedConfig) -> str | None:
    if not any("Attention" in type(m).__name__ for m in model.modules()):
        return "a model without attention layers (recurrent blocks only) is"
    return None


def _no_cache(model: torch.nn.Module, text: PretrainedConfig) -> str | None:
    if "cache" not in inspect.signature(model.forward).parameters:
        return "a forward that takes no cache (each token would see only itself) is"
    return None


# families whose own incremental forward does not equal their full forward (or fails) on one
# unpadded sequence; the native path cannot hold them to their teacher-forced log-probs
_NATIVE_REFUSED: dict[str, str] = {
    "cpmant": "position biases sized for the new tokens only, not the cached ones, are",
    "dory": "an attention mask sized for the new tokens only, not the cached ones, is",
    # their cached forward drifts from their full forward (tiny, fp32: 1.7e-3 and 0.12 nats)
    "bamba": "a cached forward that differs from the full forward is",
    "recurrent_gemma": "a cached forward that differs from the full forward is",
}


def _native_family(model: torch.nn.Module, text: PretrainedConfig) -> str | None:
    return _NATIVE_REFUSED.get(family(model))


def _sinks(model: torch.nn.Module, text: PretrainedConfig) -> str | None:
    # `sinks` (gpt-oss, GraniteSWA, MiMo-V2, Flint, ...) reach the attention call as s_aux= and
    # are computed there (attention_adapter.add_sinks); other names are not known to
    for name, _ in model.named_parameters():
        if name.rsplit(".", 1)[-1] in ("sink", "s_aux", "attention_sinks"):
            return f"learned attention sinks (module.{name.rsplit('.', 1)[-1]}) are"
    if field := _truthy(text, "use_attention_sinks", "attention_sinks", "num_sink_tokens"):
        return f"attention sinks (config.{field}) are"
    return None


def _alibi(model: torch.nn.Module, text: PretrainedConfig) -> str | None:
    if field := _truthy(text, "alibi", "use_alibi", "alibi_bias_max"):
        return f"ALiBi position biases (config.{field}) are"
    attn_config = getattr(text, "attn_config", None)  # MPT keeps it one level down
    if _truthy(attn_config, "alibi") or (
        isinstance(attn_config, dict) and attn_config.get("alibi")
    ):
        return "ALiBi position biases (config.attn_config.alibi) are"
    if getattr(text, "position_embedding_type", None) == "alibi":
        return "ALiBi position biases (config.position_embedding_type='alibi') are"
    return None


def _mla(model: torch.nn.Module, text: PretrainedConfig) -> str | None:
    # DeepSeek-style layers that cache the latent run on it (mla.py); other MLA variants do not
    field = _truthy(text, "kv_lora_rank", "q_lora_rank")
    if not field:
        return None
    layers = [m for m in model.modules() if hasattr(m, "kv_b_proj")]
    if latent_dims(model.config) is not None and layers and all(map(caches_latent, layers)):
        return None
    return f"multi-head latent attention of this form (config.{field}) is"


_RECURRENT_FIELDS = (
    "layers_block_type", "block_types", "hybrid_override_pattern", "attn_layer_indices",
    "attn_layer_period", "mamba_d_state", "mamba_expand", "mamba_d_conv", "ssm_state_size",
    "state_size", "linear_attn_config", "linear_num_key_heads", "full_attn_idxs",
    "mamba_n_heads", "conv_kernel", "lru_width",
)  # fmt: skip


# layer kinds beside attention whose state transformers keeps in LinearAttentionLayers (a conv
# window and a recurrent state per layer), run per path on state slots (state_store.py); "moe" and
# "mlp" layers hold nothing
STATE_LAYER_TYPES = frozenset(
    {"linear_attention", "conv", "hybrid", "hybrid_sliding", "moe", "mlp"}
)


def _hybrid(model: torch.nn.Module, text: PretrainedConfig) -> str | None:
    from .state_layout import find_mixers, linear_layers  # it imports this module

    kinds = set(getattr(text, "layer_types", None) or ()) - ATTENTION_LAYER_TYPES
    stateful = linear_layers(model)
    if stateful and kinds <= STATE_LAYER_TYPES:
        try:
            find_mixers(model, stateful)  # one module per stateful layer calls the state API
            return None
        except UnsupportedModelError:  # state kept some other way (MiniMax): refused below
            pass
    if kinds:
        return f"layers of type {sorted(kinds)} (config.layer_types; recurrent/linear state) are"
    if field := _truthy(text, *_RECURRENT_FIELDS):
        return f"recurrent or linear-attention layers (config.{field}) are"
    return None
