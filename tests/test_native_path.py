"""The native path (rollout/engine/native_run.py): the model's own cache, copied at each fork.

Where both paths run a family they sample the same trees from one seed; where only the native
path runs one (recurrent hybrids, attention outside the interface, BART-style positions) its
log-probs equal the model's own teacher-forced forward; what it cannot run is refused at the door.
"""

from __future__ import annotations

import logging

import pytest
import torch
from test_text_sampler import assert_exact

import rollout
from rollout.engine.arch_probe import build_tiny
from rollout.engine.features import UnsupportedModelError
from rollout.engine.native_run import NativeRun, cache_bytes
from rollout.tiny import tiny_model

PROMPTS = [[1, 5, 7, 9, 11, 13, 2, 8], [3, 4, 5], list(range(20, 57))]
DEPTH3 = dict(depth=3, width=[2, 1, 2], segment_len=[3, 2], max_new_tokens=10)


@pytest.fixture(autouse=True)
def quiet(one_thread):
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


def test_llama_native_equals_cascade_token_for_token():
    model = tiny_model("llama", seed=1)
    kw = dict(DEPTH3, seed=3, eos_token_id=[7, 9, 11])  # a few branches end early at EOS
    cascade = rollout.Engine(model, path="cascade").sample_tree(PROMPTS, **kw)
    engine = rollout.Engine(model, path="native")
    native = engine.sample_tree(PROMPTS, **kw)
    assert engine.path == "native"
    assert any(n.finish_reason == "eos" for t in native for n in t.nodes())
    for a, b in zip(cascade, native, strict=True):
        ta, tb = a.trajectories(), b.trajectories()
        assert [t.completion_ids for t in ta] == [t.completion_ids for t in tb]
        for x, y in zip(ta, tb, strict=True):
            torch.testing.assert_close(
                torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-5, rtol=0
            )
        assert b.stats.tokens_forwarded == b.stats.kv_tokens == a.stats.kv_tokens
        assert b.stats.tokens_saved == a.stats.tokens_saved > 0
        assert b.stats.peak_kv_bytes > 0
    assert_exact(model, native)


@pytest.mark.parametrize("family", ["mamba", "lfm2", "falcon", "bloom", "bart"])
def test_families_the_cascade_refuses_are_exact_on_the_native_path(family):
    model = build_tiny(family)
    engine = rollout.Engine(model)  # path="auto"
    trees = engine.sample_tree(PROMPTS[:2], **DEPTH3, seed=1, eos_token_id=[])
    assert engine.path == "native"
    assert_exact(model, trees)


def test_a_refusal_at_the_first_forward_falls_back_to_the_native_path():
    # DiffLlama passes the door and is refused by the attention adapter at run time
    model = build_tiny("diffllama")
    engine = rollout.Engine(model)
    assert engine.path == "cascade"
    trees = engine.sample_tree(PROMPTS[:2], **DEPTH3, seed=2, eos_token_id=[])
    assert engine.path == "native"
    assert_exact(model, trees)
    with pytest.raises(UnsupportedModelError, match="DiffLlamaAttention"):
        rollout.Engine(model, path="cascade").sample_tree(PROMPTS[:1], max_new_tokens=2)


def test_bad_paths_and_options_are_refused_at_the_door():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="path='nope'.*'auto', 'cascade', 'native'"):
        rollout.Engine(model, path="nope")
    with pytest.raises(ValueError, match="prefix_cache=True with path='native'"):
        rollout.Engine(model, path="native", prefix_cache=True)
    with pytest.raises(ValueError, match="policy='fcfs-lru' with path='native'"):
        rollout.Engine(model, path="native", policy="fcfs-lru")
    with pytest.raises(ValueError, match="prefix_cache=True with BloomForCausalLM runs on the"):
        rollout.Engine(build_tiny("bloom"), prefix_cache=True)
    with pytest.raises(ValueError, match="open_run"):
        rollout.Engine(model, path="native").open_run(num_blocks=4)


@pytest.mark.parametrize("path", ["auto", "native"])
def test_bidirectional_models_are_refused_on_every_path(path):
    with pytest.raises(UnsupportedModelError, match="bert: bidirectional") as err:
        rollout.sample_tree([[1, 2]], model=build_tiny("bert"), path=path)
    assert not err.value.native_ok


def test_agent_trees_are_refused_on_the_native_path():
    engine = rollout.Engine(tiny_model("llama"), path="native")
    with pytest.raises(ValueError, match="env= .*cascade engine only"):
        engine.sample_tree([[1, 2, 3]], 2, 2, env=rollout.Env(), max_turns=2, max_new_tokens=8)


@pytest.mark.parametrize(
    "family,path", [("jamba", "native"), ("bloom", "native"), ("gpt_neox", "cascade")]
)
def test_bf16_trees_match_bf16_teacher_forcing(family, path):
    # a hybrid and ALiBi (Bloom) on the native path, a family whose layers drop **kwargs
    # (GPT-NeoX) on the cascade (hybrids on the cascade: test_hybrid_states.py); depth 3, EOS
    # (one token in 8), ragged prompts. The oracle is the model's own bf16 forward over each
    # whole trajectory, which rounds differently from a cached decode (up to 4e-3 seen, Jamba's
    # scan against its step), tolerance 2e-2.
    model = build_tiny(family).to(torch.bfloat16)
    engine = rollout.Engine(model, path=path)
    trees = engine.sample_tree(PROMPTS, **DEPTH3, seed=4, eos_token_id=list(range(3, 256, 8)))
    assert engine.path == path
    assert any(n.finish_reason == "eos" for t in trees for n in t.nodes())
    assert_exact(model, trees, atol=2e-2)


@pytest.mark.parametrize("family", ["jamba", "mamba"])
def test_kv_budget_counts_recurrent_state_and_trees_wait_for_room(family):
    # Jamba: attention KV plus Mamba conv/SSM states; Mamba: fixed-size states only. A budget for
    # about one tree at a time: the trees queue, the caches' bytes (all tensors they hold,
    # counted independently by cache_bytes) never exceed it, and the tokens are the unbudgeted
    # run's (each branch draws from its own key, whatever runs beside it).
    model = build_tiny(family)
    kw = dict(DEPTH3, seed=5, eos_token_id=[])
    free = rollout.Engine(model, path="native").sample_tree(PROMPTS, **kw)
    probe = NativeRun(model)
    jobs = rollout.Engine(model).make_jobs(PROMPTS, **kw)
    worst = [probe.worst_bytes(j) for j in jobs]
    fixed, per_token = probe.growth
    assert fixed > 0 and (per_token > 0) == (family == "jamba")
    budget = max(worst) + min(worst) // 2
    seen = {"held": 0, "trees": 0}

    def watch(run):
        held = sum(cache_bytes(br.cache) for br in run.live if br.cache is not None)
        seen["held"] = max(seen["held"], held)
        seen["trees"] = max(seen["trees"], len({id(br.job) for br in run.live}))

    tight = rollout.Engine(model, kv_budget=budget, path="native").sample_tree(
        PROMPTS, **kw, on_step=watch
    )
    assert 0 < seen["held"] <= budget and seen["trees"] < len(PROMPTS)
    for a, b in zip(free, tight, strict=True):
        assert [t.completion_ids for t in a.trajectories()] == [
            t.completion_ids for t in b.trajectories()
        ]
    with pytest.raises(ValueError, match=r"tree 0 needs up to \d+ bytes of cache.*kv_budget is"):
        rollout.Engine(model, kv_budget=budget, path="native").sample_tree(
            PROMPTS, **dict(kw, width=[4, 4, 4])
        )
