"""Families whose layers differ from Llama's, held to the model's own forward in depth-3 trees.

GPT-NeoX drops the attention kwargs its layers get (the step reaches our attention through a
context variable instead), Phi has partial rotary and parallel attention/MLP blocks, Gemma scales
its embeddings and norms differently. The coverage walk (test_arch_coverage.py) checks every family
at depth 2; these go one level deeper, with a prefill row and uneven widths.
"""

from __future__ import annotations

import pytest
import torch
from test_text_sampler import PROMPTS, assert_exact
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

import rollout

SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
             vocab_size=256)


@pytest.mark.parametrize(
    "family,extra",
    [("gpt_neox", {}), ("phi", {}), ("gemma", dict(num_key_value_heads=1, head_dim=16))],
)
def test_depth_three_trees_equal_the_models_forward(family, extra):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(CONFIG_MAPPING[family](**SMALL, **extra)).eval()
    engine = rollout.Engine(model, block_size=4)
    trees = engine.sample_tree(
        PROMPTS, 3, [2, 1, 2], segment_len=[3, 2], max_new_tokens=12, eos_token_id=[], seed=3
    )
    assert all(len(t.leaves()) == 4 for t in trees)
    assert_exact(model, trees)
    assert engine.pool.used_blocks == 0
