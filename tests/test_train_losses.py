"""Losses against hand values, and the packed loss against a per-leaf GRPO loss."""

from __future__ import annotations

import math

import pytest
import torch
from train_helpers import build_tree, spec_node, tiny_llama

from trainers.policy_losses import ClipRange, clipped_surrogate
from trainers.text.forward import packed_logprobs
from trainers.text.losses import AGGREGATIONS, k3_kl, loss_terms
from trainers.text.packing import pack_trees
from trees.advantages import assign_advantages, compute_advantages


def test_clipped_surrogate_hand_values():
    logp = torch.log(torch.tensor([1.5, 0.5, 1.1, 0.7]))
    old = torch.zeros(4)
    adv = torch.tensor([1.0, -1.0, 2.0, 1.0])
    loss, active = clipped_surrogate(logp, old, adv, ClipRange(0.2, 0.3))
    # rho=1.5,A=1 -> clip 1.3; rho=.5,A=-1 -> clip .8 -> +.8; rho=1.1 -> 2.2; rho=.7,A=1 -> .7
    torch.testing.assert_close(loss, torch.tensor([-1.3, 0.8, -2.2, -0.7]))
    assert active.tolist() == [True, True, False, False]


def test_k3_hand_values():
    logp, ref = torch.tensor([0.0, -1.0]), torch.tensor([0.0, 0.0])
    torch.testing.assert_close(k3_kl(logp, ref), torch.tensor([0.0, math.e - 2.0]))


def scored_tree():
    return build_tree(
        [1, 2, 3],
        spec_node([4, 5], spec_node([6], reward=1.0), spec_node([7, 8], reward=0.0)),
        spec_node([9], spec_node([10, 11, 12], reward=0.5), spec_node([13], reward=1.0)),
        logprobs=True,
    )


def per_leaf_grpo_loss(model, trees):
    """The textbook form: forward each leaf, mean of -rho*A over its tokens, mean over leaves
    of a tree, mean over trees."""
    per_tree = []
    for tree in trees:
        leaf_means = []
        for traj in tree.trajectories():
            ids = torch.tensor([traj.prompt_ids + traj.completion_ids])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            p = len(traj.prompt_ids)
            lp = logp[p - 1 : -1].gather(-1, torch.tensor(traj.completion_ids)[:, None])[:, 0]
            adv = torch.tensor([n.advantage for n in traj.nodes[1:] for _ in n.tokens])
            tok = -torch.exp(lp - torch.tensor(traj.logprobs)) * adv
            leaf_means.append(tok.mean())
        per_tree.append(torch.stack(leaf_means).mean())
    return torch.stack(per_tree).mean()


def test_sequence_aggregation_equals_per_leaf_grpo_loss():
    torch.manual_seed(0)
    model = tiny_llama()
    trees = [scored_tree(), scored_tree()]
    trees[1].leaves()[0].reward = 0.25
    for tree in trees:
        assign_advantages([tree], compute_advantages([tree], "sibling"))
    batch = pack_trees(trees)
    logp = packed_logprobs(model, batch)
    weights, norm = AGGREGATIONS["sequence"](batch)
    terms = loss_terms(logp, batch, weights, policy_loss="pg")
    want = per_leaf_grpo_loss(model, trees)
    torch.testing.assert_close(terms.loss_sum / norm, want, atol=1e-6, rtol=1e-5)


def test_token_aggregation_counts_unique_tokens_once():
    trees = [scored_tree()]
    assign_advantages(trees, compute_advantages(trees, "grpo"))
    batch = pack_trees(trees)
    weights, norm = AGGREGATIONS["token"](batch)
    assert norm == sum(len(n.tokens) for n in trees[0].nodes()) - 3 == 10
    logp = batch.old_logprobs.clone()  # on-policy: rho = 1, loss = -mean(A) over tokens
    terms = loss_terms(logp, batch, weights)
    want = -sum(n.advantage * len(n.tokens) for n in trees[0].nodes() if n.advantage is not None)
    assert (terms.loss_sum / norm).item() == pytest.approx(want / 10, abs=1e-6)
    assert terms.clip_sum.item() == 0.0
