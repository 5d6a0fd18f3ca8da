"""Bad input gets a clear error naming the problem, and the KV pool is left empty."""

from __future__ import annotations

import pytest
import torch

import rollout
from rollout.tiny import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=0, max_position_embeddings=64)


@pytest.mark.parametrize(
    "prompts,kwargs,error,match",
    [
        ([], {}, ValueError, "prompts is empty"),
        ([[1, 2], []], {}, ValueError, "prompt 1 is empty"),
        ("abc", {}, TypeError, "list of strings"),
        ([[1, 2.5]], {}, TypeError, "prompt 0 must be"),
        ([[1, 999]], {}, ValueError, "outside the vocabulary"),
        (["text"], {}, ValueError, "no tokenizer"),
        ([[1, 2]], {"depth": 0}, ValueError, "depth=0"),
        ([[1, 2]], {"width": 0}, ValueError, "width"),
        ([[1, 2]], {"depth": 2, "width": [2, 2, 2]}, ValueError, "expected 2"),
        ([[1, 2]], {"depth": 3, "segment_len": [4]}, ValueError, "segment_len"),
        (
            [[1, 2]],
            {"depth": 3, "segment_len": 8, "max_new_tokens": 16},
            ValueError,
            "leaves nothing",
        ),
        ([[1] * 60], {"max_new_tokens": 8}, ValueError, "context of 64"),
        ([[1, 2]], {"temperature": -1.0}, ValueError, "temperature"),
        ([[1, 2]], {"top_p": 0.0}, ValueError, "top_p"),
        ([[1, 2]], {"top_k": -2}, ValueError, "top_k"),
        (
            [[1, 2]],
            {"depth": 2, "segment_len": 2, "branch_entropy": -1.0},
            ValueError,
            "branch_entropy=-1.0",
        ),
        (
            [[1, 2]],
            {"depth": 2, "segment_len": 2, "branch_entropy": float("nan")},
            ValueError,
            "finite",
        ),
        (
            [[1, 2]],
            {"depth": 2, "segment_len": 2, "min_segment_len": 2},
            ValueError,
            "set branch_entropy",
        ),
        (
            [[1, 2]],
            {"depth": 2, "segment_len": 3, "branch_entropy": 1.0, "min_segment_len": 4},
            ValueError,
            "exceeds segment_len",
        ),
        ([[1, 2]], {"branch_entropy": 1.0}, ValueError, "depth=1: a depth-1 tree"),
    ],
)
def test_bad_input(model, prompts, kwargs, error, match):
    engine = rollout.Engine(model)
    kwargs = {"depth": 1, "width": 2, "max_new_tokens": 4, **kwargs}
    with pytest.raises(error, match=match):
        engine.sample_tree(prompts, **kwargs)
    assert engine.pool is None or engine.pool.used_blocks == 0


def test_not_a_causal_lm():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        rollout.sample_tree([[1]], model=torch.nn.Linear(2, 2))
    from transformers import BertConfig, BertModel

    bert = BertModel(
        BertConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            vocab_size=50,
        )
    )
    with pytest.raises(TypeError, match="causal LM"):
        rollout.sample_tree([[1]], model=bert)
    with pytest.raises(ValueError, match="pass model="):
        rollout.sample_tree([[1]])


def test_budget_too_small_for_one_tree(model):
    with pytest.raises(ValueError, match="raise kv_budget"):
        rollout.sample_tree(
            [[1, 2, 3]], 2, 4, model=model, segment_len=4, max_new_tokens=8, kv_budget=1000
        )


def test_non_finite_logits_leave_the_pool_empty():
    model = tiny_model("llama", seed=0)
    engine = rollout.Engine(model, block_size=2)
    engine.sample_tree([[1, 2, 3]], 2, 2, segment_len=2, max_new_tokens=4)  # fine
    with torch.no_grad():
        model.lm_head.weight[5, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite logits"):
        engine.sample_tree([[1, 2, 3], [4, 5]], 2, 2, segment_len=2, max_new_tokens=4)
    assert engine.pool.used_blocks == 0
    assert model.config._attn_implementation != "tree_cascade", (
        "attention implementation not restored"
    )


def test_sample_tree_checks_and_passes_the_policy(model):
    with pytest.raises(ValueError, match="policy='lru'"):
        rollout.sample_tree([[1, 2]], model=model, policy="lru")
    with pytest.raises(ValueError, match="attn_impl='flash'.*reference"):
        rollout.Engine(model, attn_impl="flash")
    trees = rollout.sample_tree([[1, 2]], 1, 2, model=model, policy="fcfs-lru", max_new_tokens=3)
    assert len(trees[0].leaves()) == 2
