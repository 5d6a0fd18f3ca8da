"""Tiny causal LMs built from configs (random weights, seeded) for demos, tests and benchmarks.

Nothing is downloaded: users with weights load their own model with `from_pretrained`.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

# One small config per family; the benchmark's model is `tiny_model("llama", **BENCH_LLAMA)`.
_FAMILIES = {
    "llama": dict(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2
    ),
    "qwen2": dict(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2
    ),
    "qwen3": dict(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
    ),
    "mistral": dict(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=None,
    ),
}
FAMILIES = tuple(_FAMILIES)

BENCH_LLAMA = dict(
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    vocab_size=4096,
    max_position_embeddings=2048,
)


def tiny_config(family: str = "llama", **overrides: object) -> PretrainedConfig:
    if family not in _FAMILIES:
        raise ValueError(f"family={family!r}: expected one of {FAMILIES}")
    fields = dict(
        vocab_size=256,
        num_hidden_layers=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        **_FAMILIES[family],
    )
    fields.update(overrides)
    return CONFIG_MAPPING[family](**fields)


def tiny_model(
    family: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: object
) -> PreTrainedModel:
    """A randomly initialized causal LM of `family`, in eval mode, reproducible from `seed`."""
    config = tiny_config(family, **overrides)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()
