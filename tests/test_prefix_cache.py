"""The radix prefix cache that outlives a request (rollout/engine/radix_cache.py)."""

from __future__ import annotations

import random

import pytest
import torch
from service_fixtures import running_service
from test_text_sampler import assert_exact

import rollout
from rollout.tiny import tiny_model

NEW = 6  # tokens each leaf samples (no EOS): it forwards NEW - 1 of them
WIDTH = 2


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=2)


def engine_for(model, blocks=400, cache=True):
    probe = rollout.Engine(model, kv_budget=1 << 30, block_size=4)
    probe._pool(1)
    per_block = probe.pool.bytes_per_block
    return rollout.Engine(model, kv_budget=blocks * per_block, block_size=4, prefix_cache=cache)


def turn(engine, prompts, seed, **kw):
    kw = dict(max_new_tokens=NEW, eos_token_id=[], seed=seed) | kw
    return engine.sample_tree(prompts, 1, WIDTH, **kw)


def test_each_turn_of_a_conversation_forwards_only_its_new_tokens(model):
    rng = random.Random(0)
    cached, plain = engine_for(model), engine_for(model, cache=False)
    prompt = [rng.randrange(3, 250) for _ in range(21)]
    previous = None
    for k in range(5):
        (tree,) = turn(cached, [prompt], seed=k)
        (same,) = turn(plain, [prompt], seed=k)
        assert [t.completion_ids for t in tree.trajectories()] == [
            t.completion_ids for t in same.trajectories()
        ]
        assert_exact(model, [tree])
        decode = WIDTH * (NEW - 1)
        if previous is None:
            assert tree.stats.prefix_tokens_reused == 0
        else:
            # turn k-1's prompt and its answer's keys are cached; the answer's last token was
            # sampled, never forwarded, so it is new here with the observation
            seen = len(previous[0]) + len(previous[1]) - 1
            assert tree.stats.prefix_tokens_reused == seen
            assert tree.stats.tokens_forwarded == len(prompt) - seen + decode
        assert same.stats.tokens_forwarded == len(prompt) + decode
        answer = tree.trajectories()[0].completion_ids
        observation = [rng.randrange(3, 250) for _ in range(rng.randrange(1, 9))]
        previous = (prompt, answer)
        prompt = prompt + answer + observation
    assert cached.pool.used_blocks > 0, "the finished turns stay cached"
    assert plain.pool.used_blocks == 0


def test_a_weight_update_empties_the_cache(model):
    engine = engine_for(model)
    prompt = list(range(10, 40))
    (tree,) = turn(engine, [prompt], seed=1)
    assert engine.pool.used_blocks > 0
    engine.policy_updated()
    assert engine.pool.used_blocks == 0
    (again,) = turn(engine, [prompt + tree.trajectories()[0].completion_ids], seed=2)
    assert again.stats.prefix_tokens_reused == 0
    assert again.policy_version == 1


def test_a_match_inside_a_cached_node_reuses_its_first_tokens(model):
    engine = engine_for(model)
    prompt = list(range(10, 40))
    (tree,) = turn(engine, [prompt], seed=1)
    answer = tree.trajectories()[0].completion_ids
    fork = prompt + answer[:3] + [7, 8, 9]  # leaves the cached answer after 3 tokens
    (a,) = turn(engine, [fork], seed=2)
    assert a.stats.prefix_tokens_reused == len(prompt) + 3
    middle = prompt[:17] + [5, 5, 5]  # leaves the cached prompt segment after 17 tokens
    (b,) = turn(engine, [middle], seed=3)
    assert b.stats.prefix_tokens_reused == 17
    full = prompt + answer + [6]  # the source node is still whole and reusable
    (c,) = turn(engine, [full], seed=4)
    assert c.stats.prefix_tokens_reused == len(prompt) + len(answer) - 1
    assert_exact(model, [a, b, c])


def check_live_kv(run):
    """Every block a running branch reads is held; the pool stays inside its budget."""
    pool = run.pool
    assert pool.used_blocks <= pool.num_blocks
    for br in run.live:
        for node in br.kv.path():
            assert len(node.blocks) >= pool.blocks_for(node.stored)
            assert all(pool.refcount[b] > 0 for b in node.blocks), "a read block was freed"
    cached = pool.cache.evictable.values()
    assert all(n.refs == 0 for n in cached)
    assert pool.cache.evictable_blocks == sum(len(n.blocks) for n in cached)


def test_random_conversations_evict_without_touching_live_kv(model):
    rng = random.Random(5)
    engine = engine_for(model, blocks=90)
    talks = [[rng.randrange(3, 250) for _ in range(rng.randrange(5, 30))] for _ in range(6)]
    reused = evictions = 0
    for step in range(14):
        picked = rng.sample(range(len(talks)), rng.randrange(1, 4))
        trees = turn(engine, [talks[i] for i in picked], seed=step, on_step=check_live_kv)
        assert_exact(model, trees)
        for i, tree in zip(picked, trees, strict=True):
            reused += tree.stats.prefix_tokens_reused
            answer = tree.trajectories()[rng.randrange(WIDTH)].completion_ids
            talks[i] = talks[i] + answer + [rng.randrange(3, 250) for _ in range(3)]
            if len(talks[i]) > 80:  # a conversation ends, a new one starts
                talks[i] = [rng.randrange(3, 250) for _ in range(rng.randrange(5, 30))]
        evictions = engine.pool.cache.stats.evicted_blocks
        assert engine.pool.used_blocks <= engine.pool.num_blocks
    assert reused > 0 and evictions > 0, "the stream should both hit and evict"
    engine.policy_updated()
    assert engine.pool.used_blocks == 0, "a block leaked"


def test_a_failed_step_flushes_the_cache(model, monkeypatch):
    engine = engine_for(model)
    (tree,) = turn(engine, [list(range(10, 40))], seed=1)
    assert engine.pool.used_blocks > 0
    forward, calls = model.forward, []

    def fails_on_the_second_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("step failed")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", fails_on_the_second_step)
    with pytest.raises(RuntimeError, match="step failed"):
        turn(engine, [list(range(10, 40)) + [3, 4, 5]], seed=2)
    assert engine.pool.used_blocks == 0, "KV the failed step was writing must not be reused"


def test_prefix_cache_needs_the_global_policy(model):
    with pytest.raises(ValueError, match="policy='global'"):
        rollout.Engine(model, prefix_cache=True, policy="fcfs-lru")


def test_shared_prefixes_and_the_cache_work_together(model):
    # a batch whose prompts share a system prompt, then a batch extending one of its leaves
    engine = engine_for(model)
    system = list(range(30, 100))
    batch = [system + [i, i + 1, i + 2] for i in range(3, 6)]
    first = turn(engine, batch, seed=1)
    answer = first[1].trajectories()[1].completion_ids
    second = turn(engine, [batch[1] + answer + [9], system + [200, 201]], seed=2)
    assert second[0].stats.prefix_tokens_reused == len(batch[1]) + len(answer) - 1
    assert second[1].stats.prefix_tokens_reused == len(system)
    assert_exact(model, first + second)
    torch.testing.assert_close(
        torch.tensor(engine.pool.cache.stats.tokens_reused, dtype=torch.float32),
        torch.tensor(float(sum(t.stats.prefix_tokens_reused for t in second))),
    )


def test_the_service_keeps_a_conversation_cached_between_requests():
    with running_service(prefix_cache=True) as svc:
        client = svc.client()
        prompt, reused, seen = list(range(40, 70)), [], 0
        for k in range(3):
            (tree,) = client.sample_tree([prompt], 1, WIDTH, max_new_tokens=NEW, seed=k)
            reused.append(tree.stats.prefix_tokens_reused)
            assert reused[-1] == seen
            answer = tree.trajectories()[0].completion_ids
            seen = len(prompt) + len(answer) - 1  # cached: all but the answer's last token
            prompt = prompt + answer + [11, 12]
        stats = svc.wait_idle()
        assert stats["cache_tokens_reused"] == sum(reused) > 0
        assert stats["cache_evictable_blocks"] > 0
        svc.worker.update_weights(svc.engine.model.state_dict()).result(timeout=20)
        assert svc.worker.snapshot()["kv_used_blocks"] == 0, "a weight update empties the cache"


def test_an_openai_conversation_reports_its_cached_prompt_tokens():
    import openai
    from openai_fixtures import NAME, assert_teacher_forced

    from rollout.tiny import tiny_tokenizer

    with running_service(
        seed=1, tokenizer=tiny_tokenizer(), served_model_name=NAME, prefix_cache=True
    ) as svc:
        client = openai.OpenAI(base_url=svc.url + "/v1", api_key="unused", max_retries=0)
        prompt, seen = list(range(40, 75)), 0
        for turn in range(3):
            answer = client.completions.create(
                model=NAME,
                prompt=prompt,
                max_tokens=NEW,
                seed=turn,
                logprobs=0,
                extra_body={"return_token_ids": True, "stop_token_ids": []},
            )
            choice = answer.choices[0]
            assert answer.usage.prompt_tokens_details.cached_tokens == seen
            ids = choice.token_ids
            assert_teacher_forced(svc.engine.model, prompt, ids, choice.logprobs.token_logprobs)
            seen = len(prompt) + len(ids) - 1  # cached: all but the answer's last token
            prompt = prompt + ids + [11, 12, 13]


def test_a_request_arriving_while_a_prompt_is_decoding_starts_from_it(model):
    from rollout.engine.attention_adapter import cascade_attention_enabled

    engine = engine_for(model)
    system = list(range(30, 90))
    run = engine.open_run()
    first = engine.make_jobs([system + [1, 2]], 1, WIDTH, max_new_tokens=NEW, eos_token_id=[])
    later = engine.make_jobs([system + [3, 4, 5]], 1, WIDTH, max_new_tokens=NEW, eos_token_id=[])
    with cascade_attention_enabled(model), torch.inference_mode():
        run.add(first)
        run.step()  # the first prompt is prefilled; its tree decodes on
        run.add(later)
        while run.step():
            pass
    run.close()
    (tree,) = [j.tree for j in later]

    assert tree.stats.prefix_tokens_reused == len(system)  # up to where the prompts part
    assert_exact(model, [first[0].tree, tree])
