"""The packed tree forward equals the per-leaf forward, and the packing's bookkeeping is right."""

from __future__ import annotations

import random

import pytest
import torch
from train_helpers import build_tree, random_tree, spec_node, tiny_llama

from trainers.text.forward import packed_logprobs
from trainers.text.packing import pack_trees


def per_leaf_logprobs(model, tree, temperature):
    """{(leaf id, node id): log-probs of that node's tokens} from one plain forward per leaf."""
    out = {}
    for traj in tree.trajectories():
        ids = torch.tensor([traj.prompt_ids + traj.completion_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].float()
        logp = torch.log_softmax(logits / temperature, -1)
        p = len(traj.prompt_ids)
        lp = logp[p - 1 : -1].gather(-1, torch.tensor(traj.completion_ids)[:, None])[:, 0]
        offset = 0
        for node in traj.nodes[1:]:
            out[(traj.leaf.id, node.id)] = lp[offset : offset + len(node.tokens)]
            offset += len(node.tokens)
    return out


def node_slices(tree):
    """Target offsets of each non-root node inside the packed tree (depth-first order)."""
    offsets, at = {}, 0
    for node in tree.nodes():
        if node is not tree.root:
            offsets[node.id] = (at, at + len(node.tokens))
            at += len(node.tokens)
    return offsets, at


SHAPES = [
    ([3], [4], 5),  # depth 1: flat GRPO group
    ([2, 3], [3, 4], 4),
    ([1, 1, 1], [2, 2, 3], 3),  # width 1 chain
    ([2, 2, 2], [1, 3, 2], 6),  # one-token segments
]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("widths,seg,prompt_len", SHAPES)
def test_packed_forward_equals_per_leaf(attn, widths, seg, prompt_len):
    rng = random.Random(hash((tuple(widths), tuple(seg))) % 1000)
    model = tiny_llama(attn=attn)
    trees = [random_tree(rng, 32, widths, seg, prompt_len + i) for i in range(3)]
    batch = pack_trees(trees, use_advantages=False)
    with torch.no_grad():
        packed = packed_logprobs(model, batch, temperature=0.7)
    base = 0
    for tree in trees:
        offsets, total = node_slices(tree)
        for (_, node_id), want in per_leaf_logprobs(model, tree, 0.7).items():
            lo, hi = offsets[node_id]
            torch.testing.assert_close(packed[base + lo : base + hi], want, atol=1e-4, rtol=0)
        base += total
    assert base == packed.numel()


def test_counts_positions_and_weights():
    # prompt [1,2]; a [3,4] -> a1 [5], a2 [6,7]; b [8] (leaf)
    tree = build_tree(
        [1, 2],
        spec_node([3, 4], spec_node([5], reward=1.0), spec_node([6, 7], reward=0.0)),
        spec_node([8], reward=1.0),
        logprobs=True,
    )
    batch = pack_trees([tree], use_advantages=False)
    # inputs: prompt, a, a2 without its last token; leaves a1 and b forward nothing
    assert batch.input_ids[0].tolist() == [1, 2, 3, 4, 6]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4]
    assert batch.num_input_tokens == tree.kv_tokens() == 5
    assert batch.target_ids.tolist() == [3, 4, 5, 6, 7, 8]
    assert batch.target_src.tolist() == [1, 2, 3, 3, 4, 1]
    # a is in two leaves of 3 tokens and 4 tokens; 3 leaves in the tree
    w = batch.seq_weights.tolist()
    assert w[0] == pytest.approx(1 / 9 + 1 / 12)
    assert w[2] == pytest.approx(1 / 9) and w[3] == pytest.approx(1 / 12)
    assert w[5] == pytest.approx(1 / 3)
    assert sum(w) == pytest.approx(1.0)
    allowed = batch.allowed[0]
    assert allowed[4].tolist() == [True] * 5  # a2 sees prompt, a, itself
    assert allowed[2].tolist() == [True, True, True, False, False]


def test_pack_rejects_missing_advantages():
    tree = build_tree([1], spec_node([2], reward=1.0), logprobs=True)
    with pytest.raises(ValueError, match="no advantage"):
        pack_trees([tree])
