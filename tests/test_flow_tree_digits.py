"""Flow trees on the tiny digits model: equivalence with the plain loop, log-probs, NFE, records."""

from __future__ import annotations

import math

import pytest
import torch
from flow_cases import digits_pipe, plain_digits_loop

from rollout.flow import (
    SlidingWindow,
    as_flow_pipeline,
    build_spec,
    recompute_logprobs,
    sample_flow_tree,
)
from rollout.flow.classifier import DigitReward, leaf_image
from rollout.flow.digits import digit_prompts
from rollout.rewards import score_trees

PROMPTS = ["a handwritten 3", "a handwritten 7"]


@pytest.mark.parametrize("depth,width,window,guidance", [
    (1, 1, (0, 4), 1.0), (2, 1, (1, 5), 2.5), (3, [1, 1, 1], (2, 8), 2.0)])
def test_zero_noise_leaves_equal_the_plain_loop(depth, width, window, guidance):
    pipe = digits_pipe()
    latents = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    trees = sample_flow_tree(PROMPTS, depth, width, pipe, num_inference_steps=8,
                             sde_window=window, noise_levels=[0.0] * depth,
                             guidance_scale=guidance, latents=latents)
    expected = plain_digits_loop(pipe, PROMPTS, latents, 8, guidance)
    for p, tree in enumerate(trees):
        for leaf in tree.leaves():
            torch.testing.assert_close(leaf.meta["latents"], expected[p], atol=1e-5, rtol=1e-5)
        assert all(not node.steps for node in tree.nodes())  # zero noise: no log-probs


def test_a_zero_noise_level_forks_identical_children():
    """A noise-free level among noisy ones: its children are copies of their parent (no steps
    recorded), told apart only by the next level's noise."""
    tree = sample_flow_tree(PROMPTS[:1], 2, 2, digits_pipe(), num_inference_steps=6,
                            sde_window=(0, 4), noise_levels=[0.0, 0.8], seed=4)[0]
    copies = tree.root.children
    assert len(copies) == 2 and not copies[0].steps and not copies[1].steps
    firsts = [child.steps[0].latents for node in copies for child in node.children]
    assert all(torch.equal(x, firsts[0]) for x in firsts)
    leaves = [leaf.meta["latents"] for leaf in tree.leaves()]
    assert not torch.allclose(leaves[0], leaves[1]) and not torch.allclose(leaves[0], leaves[2])


@pytest.mark.parametrize("sde,guidance",
                         [("flow_grpo", 2.0), ("flow_grpo", 1.0), ("dance_grpo", 2.0)])
def test_recomputed_logprobs_equal_the_recorded_ones(sde, guidance):
    pipe = digits_pipe()
    trees = sample_flow_tree(PROMPTS, 2, 3, pipe, num_inference_steps=6, sde_window=(0, 4),
                             noise_levels=[1.0, 0.5], guidance_scale=guidance, sde=sde, seed=3)
    steps = [s for tree in trees for node in tree.nodes() for s in node.steps]
    assert len(steps) == 2 * (3 * 2 + 9 * 2)
    recorded = torch.tensor([s.logprob for s in steps])
    with torch.no_grad():
        again = recompute_logprobs(as_flow_pipeline(pipe), steps)
    assert torch.isfinite(recorded).all()
    torch.testing.assert_close(again, recorded, atol=1e-5 * recorded.abs().max().item(), rtol=0)


@pytest.mark.parametrize("depth,width,window,steps", [
    (1, 4, (0, 1), 5), (1, 4, (4, 5), 5), (2, 2, (0, 4), 8), (2, [3, 2], (3, 6), 8),
    (3, 2, (1, 7), 10), (2, 1, (0, 2), 3)])
def test_nfe_equals_the_analytic_count(depth, width, window, steps):
    trees = sample_flow_tree(PROMPTS, depth, width, digits_pipe(), num_inference_steps=steps,
                             sde_window=window, guidance_scale=1.0)
    spec = build_spec(depth, width, steps, window, None, 1.0)
    widths = [width] * depth if isinstance(width, int) else width
    starts = spec.level_starts
    by_hand = starts[0] + sum(  # root steps, then each level's nodes times its steps
        math.prod(widths[: k + 1]) * ((starts[k + 1] if k + 1 < depth else steps) - starts[k])
        for k in range(depth))
    for tree in trees:
        assert tree.stats.nfe == spec.nfe_per_tree() == by_hand
        assert tree.stats.forward_passes == steps
        assert len(tree.leaves()) == spec.num_leaves


def test_records_on_nodes_and_trajectories():
    trees = sample_flow_tree(PROMPTS, 2, 2, digits_pipe(), num_inference_steps=8,
                             sde_window=(1, 6), noise_levels=[0.8, 0.4], seed=1)
    tree = trees[0]
    assert tree.prompt == PROMPTS[0] and tree.depth == 2
    for node in tree.nodes():
        if node.depth == 1:
            assert [s.index for s in node.steps] == [1, 2, 3]
            assert all(s.noise_level == 0.8 for s in node.steps)
        if node.depth == 2:
            assert [s.index for s in node.steps] == [4, 5]
            torch.testing.assert_close(node.steps[0].latents, node.parent.steps[-1].next_latents)
        assert node.logprobs == [s.logprob for s in node.steps]
    for traj in tree.trajectories():
        assert len(traj.logprobs) == 5
        image = traj.leaf.meta["image"]
        assert image.shape == (1, 8, 8) and 0 <= image.min() and image.max() <= 1
    leaves = [leaf.meta["latents"] for leaf in tree.leaves()]
    assert not torch.allclose(leaves[0], leaves[1])  # independent noise per branch


def test_a_tree_does_not_depend_on_the_rest_of_the_batch():
    alone = sample_flow_tree(PROMPTS[:1], 2, 2, digits_pipe(), num_inference_steps=6, seed=9)
    batched = sample_flow_tree(PROMPTS, 2, 2, digits_pipe(), num_inference_steps=6, seed=9)
    for a, b in zip(alone[0].leaves(), batched[0].leaves(), strict=True):
        torch.testing.assert_close(a.meta["latents"], b.meta["latents"], atol=1e-5, rtol=1e-5)


def test_sampled_children_follow_the_step_gaussian():
    """Many children of one node take one SDE step from the same latents: their empirical mean
    and variance match the Flow-GRPO formula's mean and std."""
    pipe = digits_pipe()
    n = 3000
    trees = sample_flow_tree(PROMPTS[:1], 1, n, pipe, num_inference_steps=4, sde_window=(2, 3),
                             noise_levels=[0.9], guidance_scale=1.0)
    steps = [leaf.steps[0] for leaf in trees[0].leaves()]
    first = steps[0]
    flow = as_flow_pipeline(pipe)
    with torch.no_grad():
        v = flow.predict_velocity(first.latents[None], torch.tensor([first.timestep]), first.cond)
    from rollout.flow.sde import flow_grpo_gaussian

    gaussian = flow_grpo_gaussian(first.latents[None], v, first.sigma, first.sigma_next, 0.9,
                                  first.sigma_max)
    samples = torch.stack([s.next_latents for s in steps])  # [n, 1, 8, 8]
    std = float(gaussian.std)
    torch.testing.assert_close(samples.mean(0), gaussian.mean[0], atol=5 * std / math.sqrt(n),
                               rtol=0)
    torch.testing.assert_close(samples.var(0), torch.full_like(samples[0], std**2),
                               atol=5 * std**2 * math.sqrt(2 / n), rtol=0)


def test_sliding_window_moves_with_the_training_step():
    indices = []
    for step in range(3):
        tree = sample_flow_tree(PROMPTS[:1], 1, 2, digits_pipe(), num_inference_steps=8,
                                sde_window=SlidingWindow(size=2, stride=2), train_step=step)[0]
        indices.append([s.index for s in tree.leaves()[0].steps])
    assert indices == [[0, 1], [2, 3], [4, 5]]


def test_digit_reward_scores_the_trees():
    pipe = digits_pipe()
    trees = sample_flow_tree(digit_prompts(range(10)), 1, 4, pipe, num_inference_steps=12,
                             sde_window=(0, 6), noise_levels=[0.5], seed=2)
    rewards = score_trees(trees, DigitReward(), decode=leaf_image)
    assert len(rewards) == 40 and all(0.0 <= r <= 1.0 for r in rewards)
    assert all(leaf.reward is not None for tree in trees for leaf in tree.leaves())
    # The trained model draws the asked-for digit most of the time.
    assert sum(rewards) / len(rewards) > 0.6


def test_save_and_load_keep_steps_and_recomputation(tmp_path):
    from rollout.flow import load_flow_trees, save_flow_trees

    pipe = digits_pipe()
    trees = sample_flow_tree(PROMPTS, 2, 2, pipe, num_inference_steps=5, sde_window=(0, 3),
                             guidance_scale=2.0, seed=6)
    save_flow_trees(trees, tmp_path / "trees.pt")
    loaded = load_flow_trees(tmp_path / "trees.pt")
    for a, b in zip(trees, loaded, strict=True):
        assert b.prompt == a.prompt and b.stats == a.stats
        assert [n.logprobs for n in a.nodes()] == [n.logprobs for n in b.nodes()]
        for la, lb in zip(a.leaves(), b.leaves(), strict=True):
            torch.testing.assert_close(lb.meta["image"], la.meta["image"])
    steps = [s for tree in loaded for node in tree.nodes() for s in node.steps]
    with torch.no_grad():
        again = recompute_logprobs(as_flow_pipeline(pipe), steps)
    recorded = torch.tensor([s.logprob for s in steps])
    torch.testing.assert_close(again, recorded, atol=1e-5 * recorded.abs().max().item(), rtol=0)


def test_rollout_sample_tree_dispatches_to_flow():
    import rollout

    trees = rollout.sample_tree(PROMPTS, depth=2, width=2, pipeline=digits_pipe(),
                                num_inference_steps=4, sde_window=(0, 2), noise_levels=[1.0, 0.5])
    assert len(trees) == 2 and all(len(t.leaves()) == 4 for t in trees)
    assert trees[0].stats.nfe == build_spec(2, 2, 4, (0, 2), None, 1.0).nfe_per_tree()
