"""Hybrid models on the cascade engine: attention KV shared, recurrent state per KV node.

Oracles: each trajectory's log-probs against the model's own teacher-forced forward
(assert_exact), the native path's tokens from the same seed (the model's own cache, copied at
each fork), and, for the state slots, the bytes written into the pool read back unchanged.
"""

from __future__ import annotations

import logging

import pytest
import torch
from test_text_sampler import assert_exact
from transformers import AutoModelForCausalLM

import rollout
from rollout.engine.arch_probe import build_tiny, tiny_family_config
from rollout.engine.block_pool import BlockPool
from rollout.engine.state_layout import StateLayout, StateSpec, state_layout
from rollout.engine.state_store import StateStore, placement

PROMPTS = [[1, 5, 7, 9, 11, 13, 2, 8], [3, 4, 5], list(range(20, 57))]
DEPTH3 = dict(depth=3, width=[2, 1, 2], segment_len=[3, 2], max_new_tokens=10)
EOS = list(range(3, 256, 8))  # one token in 8 ends a branch


@pytest.fixture(autouse=True)
def quiet(one_thread):
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


def same_tokens(a: list, b: list) -> None:
    for x, y in zip(a, b, strict=True):
        assert [t.completion_ids for t in x.trajectories()] == [
            t.completion_ids for t in y.trajectories()
        ]


def build(family: str) -> torch.nn.Module:
    if family != "lfm2":
        return build_tiny(family)
    # LFM2's default config has attention layers only (released checkpoints mix in short convs)
    config = tiny_family_config("lfm2")
    config.layer_types = ["conv", "full_attention"]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


# Mamba (Jamba), gated DeltaNet (Qwen3-Next), attention and Mamba side by side in each layer
# (Falcon-H1), Mamba 2 with MoE and MLP-only layers (Nemotron-H), KDA with MLA (Kimi Linear),
# short convolutions (LFM2)
@pytest.mark.parametrize(
    "family", ["jamba", "qwen3_next", "falcon_h1", "nemotron_h", "kimi_linear", "lfm2"]
)
def test_hybrids_sample_exactly_on_the_cascade(family):
    model = build(family)
    engine = rollout.Engine(model)  # path="auto" picks the cascade for these
    kw = dict(DEPTH3, seed=3, eos_token_id=EOS)
    trees = engine.sample_tree(PROMPTS, **kw)
    assert engine.path == "cascade"
    assert any(n.finish_reason == "eos" for t in trees for n in t.nodes())
    assert_exact(model, trees)
    same_tokens(trees, rollout.Engine(model, path="native").sample_tree(PROMPTS, **kw))
    assert engine.pool.used_blocks == 0  # every state slot went back


@pytest.mark.parametrize("family", ["jamba", "qwen3_next"])
def test_bf16_hybrids_on_the_cascade_match_bf16_teacher_forcing(family):
    # the oracle is the model's own bf16 forward over each whole trajectory, which rounds
    # differently from a step-by-step recurrence; tolerance 2e-2 as on the native path
    model = build_tiny(family).to(torch.bfloat16)
    engine = rollout.Engine(model)
    trees = engine.sample_tree(PROMPTS, **DEPTH3, seed=4, eos_token_id=EOS)
    assert engine.path == "cascade"
    assert_exact(model, trees, atol=2e-2)


@pytest.mark.parametrize("family", ["jamba", "qwen3_next"])
def test_chunked_prompts_and_deferred_children_continue_their_state(family):
    # 4 tokens a step: the 37-token prompt is forwarded in chunks, and after a fork not every
    # child forwards in the next step, so a parent's state must outlive its first readers.
    # A chunk after the first continues the state token by token (Jamba: its multi-token scan
    # restarts from zero) or in one call (Qwen3-Next: the probe found it continues)
    model = build_tiny(family)
    layout = state_layout(model)
    continues = {id(m) in layout.continues for ms in layout.mixers.values() for m in ms}
    assert continues == {family == "qwen3_next"}
    kw = dict(depth=2, width=[4, 2], segment_len=[3], max_new_tokens=6, seed=6, eos_token_id=[])
    trees = rollout.Engine(model, max_step_tokens=4).sample_tree(PROMPTS, **kw)
    assert_exact(model, trees)
    same_tokens(trees, rollout.Engine(model).sample_tree(PROMPTS, **kw))


def test_early_entropy_forks_hand_their_state_over_mid_segment():
    # branch_entropy=0: every inner node forks at its minimum length, before its segment is full
    model = build_tiny("jamba")
    trees = rollout.sample_tree(
        PROMPTS, 3, 2, model=model, branch_entropy=0.0, min_segment_len=[2, 1],
        segment_len=[4, 3], max_new_tokens=10, eos_token_id=[], seed=3,
    )  # fmt: skip
    inner = [n for t in trees for n in t.nodes() if n.depth and not n.is_leaf]
    assert inner and all(len(n.tokens) == [2, 1][n.depth - 1] for n in inner)
    assert_exact(model, trees)


@pytest.mark.parametrize("family", ["jamba", "qwen3_next"])
def test_agent_trees_on_hybrids_are_exact(family):
    # observations join a node's path mid-segment: multi-token continuations of its state
    from test_agent_trees import History, assert_sampled_logprobs_exact

    model = build_tiny(family)
    trees = rollout.sample_tree(
        PROMPTS, 3, [2, 2, 1], model=model, env=History(), max_turns=3, max_turn_tokens=5,
        turn_stop=list(range(40, 52)), max_new_tokens=40, seed=11,
    )  # fmt: skip
    assert any(not s for t in trees for tr in t.trajectories() for s in tr.loss_mask)
    assert_sampled_logprobs_exact(model, trees)


def test_a_shared_prefix_hands_its_state_to_every_prompt_below_it():
    model = build_tiny("qwen3_next")
    system = list(range(40, 120))  # 80 tokens: worth sharing (min_saved_tokens=64)
    prompts = [system + [1, 2], system + [3, 4, 5], system + [6]]
    kw = dict(DEPTH3, seed=7, eos_token_id=[])
    trees = rollout.Engine(model).sample_tree(prompts, **kw)
    assert sum(t.stats.prefix_tokens_reused for t in trees) == 2 * len(system)
    assert_exact(model, trees)
    same_tokens(trees, rollout.Engine(model, path="native").sample_tree(prompts, **kw))


def test_kv_budget_counts_state_slots():
    # A budget that holds any one tree, KV and states, and any two trees' KV but no two trees'
    # KV and state slots: trees run one at a time. Every step the pool's used blocks are
    # exactly the live nodes' KV blocks plus one slot per node holding a state; at the end
    # nothing is left.
    model = build_tiny("jamba")
    kw = dict(DEPTH3, seed=5, eos_token_id=[])
    free_engine = rollout.Engine(model)
    free = free_engine.sample_tree(PROMPTS, **kw)
    jobs = free_engine.make_jobs(PROMPTS, **kw)
    bs, bpb = free_engine.block_size, free_engine.pool.bytes_per_block
    kv = sorted(j.program.worst_blocks(len(j.prompt_ids), bs) for j in jobs)
    full = sorted(free_engine._worst_blocks([j]) for j in jobs)
    blocks = max(full[-1], kv[-1] + kv[-2])
    assert blocks < full[0] + full[1]
    budget = blocks * bpb
    seen = {"trees": 0, "states": 0}

    def watch(run):
        nodes = {id(n): n for br in run.live + run.waiting for n in br.kv.path()}
        with_state = [n for n in nodes.values() if n.state is not None]
        slot = run.states.blocks_per_slot
        assert run.pool.used_blocks == sum(len(n.blocks) for n in nodes.values()) + slot * len(
            with_state
        )
        seen["states"] = max(seen["states"], len(with_state))
        seen["trees"] = max(seen["trees"], len({id(br.job) for br in run.live}))

    engine = rollout.Engine(model, kv_budget=budget)
    tight = engine.sample_tree(PROMPTS, **kw, on_step=watch)
    assert seen["trees"] == 1 and seen["states"] > 0
    assert engine.pool.used_blocks == 0
    same_tokens(free, tight)
    with pytest.raises(ValueError, match=r"tree 0 needs up to \d+ KV blocks"):
        engine.sample_tree(PROMPTS, **dict(kw, width=[4, 4, 4]))


@pytest.mark.parametrize("option", [dict(prefix_cache=True), dict(policy="fcfs-lru")])
def test_reusing_kv_across_requests_is_refused_for_hybrids(option):
    with pytest.raises(ValueError, match="recurrent layers .* state at the reused prefix"):
        rollout.Engine(build_tiny("jamba"), **option)


def test_state_slots_round_trip_through_the_pool_across_planes():
    # cells of 24 bytes, 4 planes (2 layers x keys/values): the third state spans planes
    pool = BlockPool(num_layers=2, num_blocks=40, block_size=2, kv_heads=1, head_dim=3)
    specs = (
        StateSpec(0, "conv", 0, (5, 3), torch.float32),  # 60 bytes: 3 cells
        StateSpec(0, "recurrent", 0, (7,), torch.bfloat16),  # 14 bytes: 1 cell
        StateSpec(1, "recurrent", 0, (40,), torch.float32),  # 160 bytes: 7 cells
    )
    layout = StateLayout(specs, mixers={})
    place, per_slot = placement(layout, cell=24, planes=4)
    assert per_slot == 3 and len(place[specs[2]]) == 3
    store = StateStore(pool, layout)
    slots = [pool.allocate(per_slot) for _ in range(3)]
    gen = torch.Generator().manual_seed(0)
    want = {s: torch.randn(3, *s.shape, generator=gen).to(s.dtype) for s in specs}
    for s in specs:
        store.scatter(s, store.index(slots), want[s])
    for s in specs:  # each slot alone, in another order
        for i in (2, 0, 1):
            torch.testing.assert_close(store.gather(s, store.index([slots[i]]))[0], want[s][i])
    fresh = pool.allocate(per_slot)
    store.copy([(slots[1], fresh)])
    for s in specs:
        torch.testing.assert_close(store.gather(s, store.index([fresh]))[0], want[s][1])
        torch.testing.assert_close(store.gather(s, store.index(slots)), want[s])


def test_the_service_serves_a_hybrid_without_its_default_prefix_cache(tmp_path):
    from rollout.service.settings import WorkerSettings

    build_tiny("jamba").save_pretrained(tmp_path)
    worker = WorkerSettings(model=str(tmp_path), kv_budget=64 << 20).build_worker()
    assert worker.engine.prefix_cache is False and worker.engine.path == "cascade"
    with pytest.raises(ValueError, match="prefix_cache=True with JambaForCausalLM"):
        WorkerSettings(model=str(tmp_path), prefix_cache=True).build_worker()
