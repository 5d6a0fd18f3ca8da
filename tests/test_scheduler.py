"""The global prefix scheduler (BatchLLM) and the FCFS + LRU baseline, under KV budgets."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_text_sampler import assert_exact

import rollout
from rollout.engine.prefix_trie import build_trie, plan_prefixes
from rollout.tiny import tiny_model


def lcp(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def chain_of(plan, i):
    out, idx = [], plan.prompt_prefix[i]
    while idx is not None:
        out.append(idx)
        idx = plan.shared[idx].parent
    return out[::-1]


prompt_sets = st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=9), min_size=1, max_size=12)


@settings(max_examples=150, deadline=None)
@given(prompt_sets)
def test_trie_keeps_every_shared_prefix_when_any_saving_counts(prompts):
    plan = plan_prefixes(prompts, min_saved_tokens=1)
    for i, p in enumerate(prompts):
        chain = chain_of(plan, i)
        covered = [t for idx in chain for t in plan.shared[idx].tokens]
        assert covered == p[: len(covered)] and len(covered) <= len(p) - 1
        for idx in chain:
            assert i in plan.shared[idx].prompts
    pairs = [(i, j) for i in range(len(prompts)) for j in range(i + 1, len(prompts))]
    for i, j in pairs:
        common = set(chain_of(plan, i)) & set(chain_of(plan, j))
        depth = max((plan.shared[k].start + len(plan.shared[k].tokens) for k in common), default=0)
        assert depth == lcp(prompts[i][:-1], prompts[j][:-1])


@settings(max_examples=150, deadline=None)
@given(prompt_sets, st.integers(1, 12))
def test_kept_prefixes_save_enough_and_list_exactly_their_readers(prompts, threshold):
    plan = plan_prefixes(prompts, min_saved_tokens=threshold)
    for k, sp in enumerate(plan.shared):
        assert (len(sp.prompts) - 1) * len(sp.tokens) >= threshold
        readers = {i for i in range(len(prompts)) if k in chain_of(plan, i)}
        assert readers == set(sp.prompts)
        for i in sp.prompts:
            assert tuple(prompts[i][sp.start : sp.start + len(sp.tokens)]) == sp.tokens
    trie = build_trie(prompts)
    assert sorted(trie.prompts) == list(range(len(prompts)))


def shared_workload(seed, n_systems=3, per_system=4, sys_len=20, q_range=(2, 9), vocab=256):
    rng = random.Random(seed)
    systems = [[rng.randrange(vocab) for _ in range(sys_len)] for _ in range(n_systems)]
    prompts = [
        s + [rng.randrange(vocab) for _ in range(rng.randint(*q_range))]
        for s in systems
        for _ in range(per_system)
    ]
    rng.shuffle(prompts)
    return prompts


def run(model, prompts, policy, budget, check_steps=True, **kw):
    engine = rollout.Engine(
        model,
        block_size=4,
        kv_budget=budget,
        policy=policy,
        max_step_tokens=kw.pop("max_step_tokens", 64),
    )
    steps = []

    def on_step(r):
        sched = r.scheduler
        assert r.pool.used_blocks + sched.budget.growth() <= r.pool.num_blocks
        if budget is not None:
            assert r.pool.used_blocks * r.pool.bytes_per_block <= budget
        steps.append(r.pool.used_blocks)

    trees = engine.sample_tree(prompts, on_step=on_step if check_steps else None, **kw)
    assert engine.pool.used_blocks == 0, "blocks leaked"
    return trees, engine, steps


KW = dict(depth=2, width=[3, 2], segment_len=3, max_new_tokens=7, seed=5)


@pytest.mark.parametrize("policy", ["global", "fcfs-lru"])
def test_shared_prefix_trees_are_exact_and_identical_across_policies_and_budgets(policy):
    model = tiny_model("llama", seed=3)
    prompts = shared_workload(0)
    eos = list(range(0, 256, 11))
    reference, _, _ = run(model, prompts, "global", None, eos_token_id=eos, **KW)
    assert_exact(model, reference)
    block = 2 * 2 * 4 * 2 * 16 * 4  # K and V, 2 layers, block 4, 2 KV heads, head dim 16, fp32
    for budget in (None, 60 * block, 20 * block):
        trees, _, steps = run(model, prompts, policy, budget, eos_token_id=eos, **KW)
        for a, b in zip(trees, reference, strict=True):
            assert a.prompt_ids == b.prompt_ids  # caller order
            for na, nb in zip(a.nodes(), b.nodes(), strict=True):  # same shape, same tokens
                assert (na.depth, na.tokens, na.finish_reason) == (
                    nb.depth,
                    nb.tokens,
                    nb.finish_reason,
                )
                # log-probs agree to float noise (batches of other shapes round differently)
                torch.testing.assert_close(na.logprobs, nb.logprobs, atol=1e-5, rtol=0)
        for t in trees:
            s = t.stats
            assert s.tokens_forwarded + s.prefix_tokens_reused == s.kv_tokens


def test_global_policy_computes_each_shared_prefix_once_under_a_tight_budget():
    model = tiny_model("llama", seed=4)
    prompts = shared_workload(1, n_systems=4, per_system=5, sys_len=24)
    block = 2 * 2 * 4 * 2 * 16 * 4
    budget = 24 * block
    trees, engine, _ = run(model, prompts, "global", budget, eos_token_id=[], **KW)
    fcfs, _, _ = run(model, prompts, "fcfs-lru", budget, eos_token_id=[], **KW)
    prompt_tokens = sum(len(p) for p in prompts)
    unique_prompt = prompt_tokens - sum(t.stats.prefix_tokens_reused for t in trees)
    # 4 system prompts of 24 tokens, computed once each, plus every question's own tokens.
    assert unique_prompt == 4 * 24 + sum(len(p) - 24 for p in prompts)
    fcfs_prompt = prompt_tokens - sum(t.stats.prefix_tokens_reused for t in fcfs)
    assert fcfs_prompt > unique_prompt, "the LRU baseline should recompute evicted prefixes"


def test_a_tree_too_big_for_the_budget_fails_before_any_work():
    model = tiny_model("llama", seed=0)
    calls = []
    with pytest.raises(ValueError, match="raise kv_budget"):
        rollout.Engine(model, kv_budget=4096, block_size=4).sample_tree(
            [list(range(30))], 2, 2, segment_len=4, max_new_tokens=8, on_step=calls.append
        )
    assert not calls


@pytest.mark.parametrize("policy", ["global", "fcfs-lru"])
def test_random_workloads_never_exceed_the_budget(policy):
    model = tiny_model("qwen2", seed=5)
    rng = random.Random(7)
    block = 2 * 2 * 4 * 2 * 16 * 4
    for trial in range(3):
        prompts = shared_workload(
            trial + 10, n_systems=rng.randint(1, 3), per_system=3, sys_len=rng.randint(4, 30)
        )
        budget = rng.randint(25, 60) * block
        depth = rng.randint(1, 3)
        trees, _, steps = run(
            model,
            prompts,
            policy,
            budget,
            depth=depth,
            width=2,
            segment_len=2,
            max_new_tokens=2 * depth + 2,
            eos_token_id=list(range(0, 256, 17)),
            seed=trial,
            max_step_tokens=rng.choice([3, 16, 64]),
        )
        assert max(steps) * block <= budget
        assert len(trees) == len(prompts)


def test_cancel_frees_the_kv_at_once():
    model = tiny_model("llama", seed=6)
    engine = rollout.Engine(model, block_size=4)
    jobs = engine.make_jobs(shared_workload(2), 2, 2, segment_len=3, max_new_tokens=6)
    from rollout.engine.attention_adapter import cascade_attention_enabled
    from rollout.engine.scheduler import make_scheduler
    from rollout.engine.text_engine import TreeRun

    pool = engine._pool(400)
    r = TreeRun(model, pool, make_scheduler("global", pool), max_step_tokens=32)
    r.add(jobs)
    with cascade_attention_enabled(model), torch.inference_mode():
        for _ in range(3):
            r.step()
        assert pool.used_blocks > 0
        r.cancel(jobs[: len(jobs) // 2])
        while r.step():
            pass
    r.close()
    assert pool.used_blocks == 0
    done = [j for j in jobs if j.meta.get("done")]
    assert len(done) >= len(jobs) - len(jobs) // 2
    r.forget(jobs)  # a long-lived caller keeps no records of finished or cancelled trees
    assert not r.jobs and not r.next_id


def test_cancelling_waiting_trees_releases_their_shared_prefix():
    model = tiny_model("llama", seed=7)
    engine = rollout.Engine(model, block_size=4)
    prompts = shared_workload(3, n_systems=1, per_system=6, sys_len=40)
    jobs = engine.make_jobs(prompts, 1, 2, max_new_tokens=3, eos_token_id=[])
    from rollout.engine.attention_adapter import cascade_attention_enabled

    # 10 blocks of shared prefix (40 tokens) and room for about two trees of <= 5 blocks
    r = engine.open_run(num_blocks=20)
    pool = r.pool
    r.add(jobs)
    with cascade_attention_enabled(model), torch.inference_mode():
        r.step()
        started = [j for j in jobs if j.root_kv is not None]
        assert 0 < len(started) < len(jobs)
        r.cancel(jobs)  # the running ones and every tree still waiting
        assert pool.used_blocks == 0, "the shared prefix outlived every tree that reads it"
    r.close()


@pytest.mark.parametrize("steps_before", [1, 4])  # while the prefix prefills / while trees decode
def test_a_later_arrival_starts_from_the_live_shared_prefix(steps_before):
    from rollout.engine.attention_adapter import cascade_attention_enabled

    model = tiny_model("llama", seed=8)
    engine = rollout.Engine(model, block_size=4, max_step_tokens=16)
    first = shared_workload(4, n_systems=1, per_system=4, sys_len=32, q_range=(3, 5))
    system = first[0][: lcp(first[0], first[1])]
    assert len(system) >= 32 and all(p[: len(system)] == system for p in first)
    late = [system + [7, 8, 9], system[:10] + [1, 2, 3]]  # all of the live prefix / a part only
    kw = dict(segment_len=2, max_new_tokens=6, eos_token_id=[], seed=5)
    jobs, later = engine.make_jobs(first, 2, 2, **kw), engine.make_jobs(late, 2, 2, **kw)
    r = engine.open_run(num_blocks=200)
    r.add(jobs)
    with cascade_attention_enabled(model), torch.inference_mode():
        for _ in range(steps_before):
            r.step()
        assert all(j.root_kv is not None and not j.meta.get("done") for j in jobs)
        r.add(later)
        while r.step():
            pass
    r.close()
    assert r.pool.used_blocks == 0, "blocks leaked"
    whole, part = (j.tree for j in later)
    assert whole.stats.prefix_tokens_reused == len(system)  # none of the system prompt recomputed
    assert whole.stats.tokens_forwarded + whole.stats.prefix_tokens_reused == whole.kv_tokens()
    assert part.stats.prefix_tokens_reused == 0  # a live prefix is reused whole or not at all
    assert_exact(model, [j.tree for j in jobs + later])
    alone = engine.sample_tree(late, 2, 2, **kw)  # per-branch seeding: the same trees
    for a, b in zip((j.tree for j in later), alone, strict=True):
        assert [n.tokens for n in a.nodes()] == [n.tokens for n in b.nodes()]


def test_staggered_arrivals_under_tight_budgets_stay_exact_and_inside_the_budget():
    """Waves of trees added between steps (as the service does) under budgets of a few trees: the
    budget holds at every step, nothing leaks, every tree equals the same tree sampled alone, and
    lone trees that arrive while the system prompt is alive compute none of it."""
    from rollout.engine.attention_adapter import cascade_attention_enabled

    model = tiny_model("llama", seed=9)
    rng = random.Random(11)
    kw = dict(segment_len=2, max_new_tokens=5, eos_token_id=list(range(0, 256, 13)), seed=2)
    for trial in range(3):
        sys_len = rng.randint(32, 40)
        prompts = shared_workload(20 + trial, n_systems=1, per_system=12, sys_len=sys_len)
        # a first wave that plans the shared system prompt, then lone arrivals (too few to plan
        # a prefix of their own)
        waves = [prompts[:3]] + [[p] for p in prompts[3:]]
        engine = rollout.Engine(model, block_size=4, max_step_tokens=rng.choice([8, 32]))
        r = engine.open_run(num_blocks=rng.randint(40, 70))
        jobs = []
        with cascade_attention_enabled(model), torch.inference_mode():
            for wave in waves:
                jobs.append(engine.make_jobs(wave, 2, 2, **kw))
                r.add(jobs[-1])
                for _ in range(rng.randint(1, 4)):
                    r.step()
                    assert r.pool.used_blocks + r.scheduler.budget.growth() <= r.pool.num_blocks
            while r.step():
                assert r.pool.used_blocks + r.scheduler.budget.growth() <= r.pool.num_blocks
        r.close()
        assert r.pool.used_blocks == 0, "blocks leaked"
        free_waves = sum(
            all(j.tree.stats.prefix_tokens_reused >= sys_len for j in wave) for wave in jobs
        )
        assert free_waves >= len(waves) // 2, "lone arrivals recomputed the live system prompt"
        for wave, wave_jobs in zip(waves, jobs, strict=True):
            alone = engine.sample_tree(wave, 2, 2, **kw)
            for job, tree in zip(wave_jobs, alone, strict=True):
                assert [n.tokens for n in job.tree.nodes()] == [n.tokens for n in tree.nodes()]
                s = job.tree.stats
                assert s.tokens_forwarded + s.prefix_tokens_reused == job.tree.kv_tokens()


def random_arrivals(seed, vocab=256):
    """A random service-like workload: system prompts (some nested, some cut short), waves of
    1-5 trees, a pool a little larger than the biggest tree, and a prefix-sharing threshold."""
    rng = random.Random(seed)
    systems = [[rng.randrange(vocab) for _ in range(rng.randint(3, 80))]
               for _ in range(rng.randint(1, 3))]
    if len(systems) > 1 and rng.random() < 0.5:
        systems[1] = systems[0] + systems[1][: rng.randint(1, 12)]

    def prompt():
        s = rng.choice(systems)
        if rng.random() < 0.15:
            s = s[: rng.randint(1, len(s))]
        return s + [rng.randrange(vocab) for _ in range(rng.randint(1, 8))]

    tree = (rng.randint(1, 2), rng.randint(1, 3))
    kw = dict(segment_len=2, max_new_tokens=rng.randint(3, 7), seed=rng.randint(0, 9),
              eos_token_id=list(range(0, vocab, rng.choice([7, 13, 256]))))
    waves = [[prompt() for _ in range(rng.choice([1, 1, 1, 2, 3, 5]))]
             for _ in range(rng.randint(4, 12))]
    return rng, tree, kw, waves


@pytest.mark.parametrize("cache", [False, True], ids=["no-cache", "radix-cache"])
def test_random_arrivals_and_cancels_never_stall_leak_or_change_a_tree(cache):
    """Prefixes held for several waiting groups can fill a tight pool between them; when nothing
    runs, the run lets them go instead of failing with 'none can start'. Every surviving tree still
    equals the same tree sampled alone, and nothing is left in the pool or the scheduler. With the
    radix cache, later waves start from the KV of finished and cancelled trees of the same run,
    and evicting it for room never disturbs a running tree."""
    from rollout.engine.attention_adapter import cascade_attention_enabled
    from rollout.engine.radix_cache import RadixCache
    from rollout.engine.scheduler import GlobalPrefixScheduler, tree_blocks
    from rollout.engine.text_engine import TreeRun

    model = tiny_model("llama", seed=0)
    hits = 0
    for seed in range(48 if not cache else 16):
        rng, (depth, width), kw, waves = random_arrivals(seed)
        step_tokens = rng.choice([3, 8, 32, 64])
        engine = rollout.Engine(model, block_size=4, max_step_tokens=step_tokens)
        jobs = [engine.make_jobs(w, depth, width, **kw) for w in waves]
        biggest = max(tree_blocks(j.spec, len(j.prompt_ids), 4) for js in jobs for j in js)
        pool = engine._pool(biggest + rng.randint(0, 30))
        pool.cache = RadixCache(pool) if cache else None
        sched = GlobalPrefixScheduler(pool, min_saved_tokens=rng.choice([1, 4, 16, 64]))
        r = TreeRun(model, pool, sched, max_step_tokens=step_tokens)
        cancelled, added = set(), []
        with cascade_attention_enabled(model), torch.inference_mode():
            for wave_jobs in jobs:
                try:
                    r.add(wave_jobs)
                except ValueError:  # its prefix chain, rounded to blocks, outgrows the pool
                    cancelled |= {id(j) for j in wave_jobs}
                    continue
                added += wave_jobs
                for _ in range(rng.randint(0, 4)):
                    if rng.random() < 0.3:
                        victims = [v for v in rng.sample(added, min(2, len(added)))
                                   if not v.meta.get("done") and id(v) not in cancelled]
                        r.cancel(victims)
                        cancelled |= {id(v) for v in victims}
                    r.step()
                    assert pool.used_blocks + sched.budget.growth() <= pool.num_blocks
            while r.step():
                assert pool.used_blocks + sched.budget.growth() <= pool.num_blocks
        r.close()
        if cache:
            hits += pool.cache.stats.hits
            pool.cache.flush()
            pool.cache = None
        # (prefixes emptied by a cache eviction leave `live` at the scheduler's next admission)
        alive = [n for n in sched.live.values() if n.refs]
        assert pool.used_blocks == 0 and not alive and not sched.held, seed
        for wave, wave_jobs in zip(waves, jobs, strict=True):
            alone = engine.sample_tree(wave, depth, width, **kw)
            for job, tree in zip(wave_jobs, alone, strict=True):
                if id(job) not in cancelled:
                    assert [n.tokens for n in job.tree.nodes()] == [
                        n.tokens for n in tree.nodes()], seed
    assert not cache or hits > 0, "later waves should start from cached KV"
