"""Every causal-LM family in transformers' auto mapping is exact or refused by name, never wrong.

Each case builds the family tiny and holds a depth-2, width-2 tree against the model's own eager
forward (rollout/engine/arch_probe.py), on the cascade engine or, for what it refuses, the native
path. Families that cannot be built tiny are skipped with the
reason; WRONG (|d logp| > 1e-4) and error (any unrefused exception) fail.
"""

from __future__ import annotations

import logging

import pytest
import torch

import rollout
from rollout.engine.arch_probe import FAMILIES, build_tiny, probe_family
from rollout.engine.attention_adapter import (
    ATTN_NAME,
    PoolCache,
    cascade_attention_enabled,
)
from rollout.engine.features import UnsupportedModelError
from rollout.tiny import tiny_model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny models: intra-op threads only spin on a busy machine (100x slower)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)
    torch.set_num_threads(threads)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_is_exact_or_refused(family):
    result = probe_family(family)
    if result.outcome == "not buildable":
        pytest.skip(result.detail)
    assert result.outcome in ("exact", "refused"), f"{family}: {result.outcome}: {result.detail}"
    if result.outcome == "refused":
        assert "not implemented" in result.detail or "not supported" in result.detail


@pytest.mark.parametrize(
    "family,feature",
    [
        ("bloom", "AttentionInterface"),
        ("minimax", "linear_attention"),
        ("deepseek_v4", "heavily_compressed_attention"),
        ("bert", "bidirectional"),
        ("bart", "position_ids"),
    ],
)
def test_refusals_name_the_family_and_the_feature(family, feature):
    # path="cascade": the default ("auto") runs all but BERT on the native path instead
    model = build_tiny(family)
    with pytest.raises(UnsupportedModelError, match=feature) as err:
        rollout.Engine(model, path="cascade")
    assert str(err.value).startswith(f"{family}: ")
    assert err.value.native_ok == (family != "bert")


def test_attention_outside_the_engine_is_a_clear_error():
    model = tiny_model("llama")
    with cascade_attention_enabled(model), pytest.raises(RuntimeError, match=ATTN_NAME):
        model(torch.tensor([[1, 2, 3]]), cache=PoolCache("llama"), use_cache=True)


def test_pool_cache_answers_the_cache_api_and_refuses_the_rest():
    cache = PoolCache("llama")
    assert cache.get_seq_length() == 0 and cache.get_mask_sizes(5, 0) == (5, 0)
    assert not cache.is_compileable and not hasattr(cache, "layers")
    with pytest.raises(UnsupportedModelError, match="cache.get_conv_state"):
        cache.get_conv_state(0)
