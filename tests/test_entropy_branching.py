"""Entropy-guided branching: nodes fork exactly where the model's own next-token entropy crosses
the threshold, the trees stay exact, and the KV budget holds although leaves grow longer."""

from __future__ import annotations

import pytest
import torch

import rollout
from rollout.engine.scheduler import tree_blocks
from rollout.tiny import tiny_model
from trees.spec import TreeSpec

PROMPTS = [[1, 5, 7, 9, 11, 13, 2, 8], [3, 4, 5], list(range(20, 47))]
BAND = 2e-4  # entropies this close to the threshold may fall either side of it in float


@pytest.fixture(scope="module")
def model():
    """A tiny Llama with a sharpened output layer: its entropies spread over 0.1-3 nats."""
    m = tiny_model("llama", seed=1)
    with torch.no_grad():
        m.lm_head.weight.mul_(25)
    return m


def entropies(model, ids, temperature=1.0):
    """H of the model's tempered next-token distribution after each prefix ids[:k], k = 1..n."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    return (-(logp.exp() * logp).sum(-1)).tolist()


def completion_above(node):
    """Completion tokens on the path down to and including `node`."""
    return [tok for n in node.path()[1:] for tok in n.tokens]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_nodes_fork_where_the_models_entropy_crosses_the_threshold(model, temperature):
    depth, width, seg, min_len, max_new = 3, [2, 2, 2], [6, 5], [2, 1], 16
    kw = dict(segment_len=seg, max_new_tokens=max_new, eos_token_id=[], temperature=temperature)
    engine = rollout.Engine(model, block_size=4)
    # threshold: a high quantile of the entropies along sampled completions, so that some nodes
    # reach an uncertain token within their segment and others do not
    sampled = [
        h
        for tree in engine.sample_tree(PROMPTS, depth, width, seed=1, **kw)
        for t in tree.trajectories()
        for h in entropies(model, t.prompt_ids + t.completion_ids, temperature)[len(t.prompt_ids) :]
    ]
    tau = torch.tensor(sampled).quantile(0.85).item()
    trees = engine.sample_tree(
        PROMPTS, depth, width, seed=7, branch_entropy=tau, min_segment_len=min_len, **kw
    )
    early = full = 0
    for tree in trees:
        for node in tree.nodes():
            if node is tree.root:
                continue
            path = tree.prompt_ids + completion_above(node)
            if node.is_leaf:  # leaves fill their path to max_new_tokens (EOS is off)
                assert len(completion_above(node)) == max_new
                continue
            n = len(node.tokens)
            assert min_len[node.depth - 1] <= n <= seg[node.depth - 1]
            h = entropies(model, path, temperature)  # h[i]: next-token entropy after path[:i+1]
            first = len(path) - n  # index in `path` of the node's first token
            for k in range(min_len[node.depth - 1], n):  # held k tokens and did not fork
                hk = h[first + k - 1]
                assert hk < tau + BAND, f"node {node.id} should have forked after {k} tokens"
            if n < seg[node.depth - 1]:
                assert h[-1] >= tau - BAND, f"node {node.id} forked early below the threshold"
                early += 1
            else:
                full += 1
    assert early and full, f"the threshold should give both kinds ({early}, {full})"
    assert engine.pool.used_blocks == 0
    for tree in trees:
        assert tree.stats.tokens_forwarded == tree.stats.kv_tokens
        for traj in tree.trajectories():  # recorded log-probs are the model's own
            ids = torch.tensor([traj.prompt_ids + traj.completion_ids])
            with torch.no_grad():
                logits = model(ids).logits[0].float() / temperature
            logp = torch.log_softmax(logits, -1)[len(traj.prompt_ids) - 1 : -1]
            want = logp.gather(-1, torch.tensor(traj.completion_ids)[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(traj.logprobs), want, atol=1e-4, rtol=0)


def test_threshold_extremes(model):
    kw = dict(segment_len=[4, 3], max_new_tokens=10, eos_token_id=[], seed=3)
    fixed = rollout.sample_tree(PROMPTS, 3, 2, model=model, **kw)
    never = rollout.sample_tree(PROMPTS, 3, 2, model=model, branch_entropy=1e4, **kw)
    for a, b in zip(fixed, never, strict=True):  # a threshold never met: the fixed schedule
        assert [t.completion_ids for t in a.trajectories()] == [
            t.completion_ids for t in b.trajectories()
        ]
    always = rollout.sample_tree(
        PROMPTS, 3, 2, model=model, branch_entropy=0.0, min_segment_len=[2, 1], **kw
    )
    for tree in always:  # every entropy is >= 0: each node forks at its minimum length
        for node in tree.nodes():
            if node is not tree.root and not node.is_leaf:
                assert len(node.tokens) == [2, 1][node.depth - 1]
        assert all(len(t.completion_ids) == 10 for t in tree.trajectories())


def test_kv_budget_covers_leaves_that_grow_after_early_forks(model):
    spec = TreeSpec.make(3, [2, 2, 2], [6, 6], 16, branch_entropy=0.0, min_segment_len=1)
    assert spec.leaf_len == 14 and spec.target(3) == 14
    prompt = PROMPTS[2]
    blocks = tree_blocks(spec, len(prompt), 4)
    probe = rollout.Engine(model, block_size=4)
    probe.sample_tree([prompt], 1, 1, max_new_tokens=1)
    budget = blocks * probe.pool.bytes_per_block  # room for exactly one tree's worst case
    engine = rollout.Engine(model, block_size=4, kv_budget=budget)
    peaks = []
    trees = engine.sample_tree(
        [prompt] * 3,
        3,
        [2, 2, 2],
        segment_len=[6, 6],
        max_new_tokens=16,
        eos_token_id=[],
        branch_entropy=0.0,
        min_segment_len=1,
        on_step=lambda run: peaks.append(run.pool.used_blocks),
    )
    assert max(peaks) <= blocks
    assert all(len(t.completion_ids) == 16 for tree in trees for t in tree.trajectories())
    assert engine.pool.used_blocks == 0
