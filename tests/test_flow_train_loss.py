"""Flow trainer pieces: recomputed step log-probs equal the recorded ones, each node's SDE steps
count once, LayerTuning-RL's weights, bounds and gate, the exact Gaussian KL."""

from __future__ import annotations

import pytest
import torch
from flow_cases import digits_pipe

from rollout.flow import as_flow_pipeline, recompute_logprobs, sample_flow_tree
from rollout.flow.classifier import DigitReward, leaf_image
from rollout.rewards import score_trees
from trainers.config import LossConfig, load_config
from trainers.flow.config import FlowConfig, LayerTuningConfig
from trainers.flow.layer_tuning import adaptive_clip, best_leaf, sft_term, sft_weights
from trainers.flow.losses import (
    FlowLossOptions,
    flow_loss_terms,
    gaussian_kl,
    pack_steps,
    step_gaussians,
    step_logprobs,
    step_velocity,
)
from trainers.flow.models import load_flow_policy
from trainers.flow.trainer import FlowTrainer
from trainers.policy import frozen_copy
from trainers.policy_losses import ClipRange
from trainers.update import assign_global_advantages

PROMPTS = ["a handwritten 3", "a handwritten 7"]


def digits_trees(guidance=1.0, sde="flow_grpo", width=(2, 3), seed=0):
    trees = sample_flow_tree(PROMPTS, len(width), list(width), digits_pipe(),
                             num_inference_steps=6, sde_window=(0, 4), noise_levels=[1.0, 0.7],
                             guidance_scale=guidance, sde=sde, seed=seed)
    score_trees(trees, DigitReward(), leaf_image)
    assign_global_advantages(trees, LossConfig(estimator="depth"), None)
    return trees


@pytest.mark.parametrize("guidance,sde,reduction", [
    (1.0, "flow_grpo", "sum"), (2.0, "flow_grpo", "mean"), (1.0, "dance_grpo", "sum")])
def test_recomputed_step_logprobs_equal_the_recorded_ones(guidance, sde, reduction):
    trees = digits_trees(guidance, sde)
    pipe = as_flow_pipeline(digits_pipe())
    (batch,) = pack_steps(trees, reduction, chunk=1000)
    with torch.no_grad():
        velocity = step_velocity(pipe, batch.steps)
        logp = step_logprobs(batch, step_gaussians(batch.steps, velocity))
        rollout_logp = recompute_logprobs(pipe, batch.steps) * batch.scale
    tol = 1e-5 * batch.old_logprobs.abs().max().item()
    torch.testing.assert_close(logp, batch.old_logprobs, atol=tol, rtol=0)
    torch.testing.assert_close(logp, rollout_logp, atol=tol, rtol=0)
    terms = flow_loss_terms(batch, velocity, FlowLossOptions(clip=ClipRange(1e-4, 1e-4)))
    assert terms.clip_sum.item() == 0  # on-policy: every ratio is 1 even under a tiny clip


def test_each_node_steps_count_once():
    trees = digits_trees(width=(2, 3))
    batches = pack_steps(trees, "sum", chunk=7)
    steps = [s for b in batches for s in b.steps]
    # level 1: 2 nodes x 2 steps; level 2: 6 nodes x 2 steps -- per tree, never per leaf
    assert len(steps) == len(PROMPTS) * (2 * 2 + 6 * 2)
    assert max(len(b.steps) for b in batches) == 7
    advs = torch.cat([b.advantages for b in batches]).tolist()
    want = [n.advantage for t in trees for n in t.nodes() for _ in n.steps]
    assert advs == pytest.approx(want)
    first = trees[0].root.children[0]
    assert torch.equal(batches[0].finals[0], best_leaf(first).meta["latents"])


def test_adaptive_bounds_widen_on_the_side_the_advantage_pushes():
    adv = torch.tensor([-3.0, 0.0, 3.0])
    base = ClipRange(0.2, 0.2)
    assert adaptive_clip(adv, base, 0.0) is base
    b = adaptive_clip(adv, base, 1.0)
    s = torch.tanh(torch.tensor(3.0)).item()
    torch.testing.assert_close(b.low, torch.tensor([0.2 * (1 + s), 0.2, 0.2]))
    torch.testing.assert_close(b.high, torch.tensor([0.2, 0.2, 0.2 * (1 + s)]))


def test_sft_term_weights_only_good_nodes_and_stops_outside_the_trust_region():
    adv = torch.tensor([-1.0, 0.5, 2.0, 2.0])
    w = sft_weights(adv, 0.5)
    torch.testing.assert_close(w, torch.tensor([0.0, 0.25, 1.0, 1.0]))
    velocity = torch.zeros(4, 1, 2, 2, requires_grad=True)
    target = torch.ones(4, 1, 2, 2)
    ratio = torch.tensor([1.0, 1.0, 1.1, 1.5])  # the last step left [0.8, 1.2]
    out = sft_term(velocity, target, w, ratio, ClipRange(0.2, 0.2))
    torch.testing.assert_close(out, torch.tensor([0.0, 0.25, 1.0, 0.0]))
    out.sum().backward()
    assert velocity.grad[3].abs().sum() == 0 and velocity.grad[2].abs().sum() > 0


def test_gaussian_kl_is_exact():
    trees = digits_trees()
    (batch,) = pack_steps(trees, "sum", chunk=1000)
    with torch.no_grad():
        v = step_velocity(as_flow_pipeline(digits_pipe()), batch.steps)
    g = step_gaussians(batch.steps, v)
    assert gaussian_kl(g, g.mean, 1.0).abs().max() == 0
    shifted = g.mean + 0.01
    want = (0.01**2 / (2 * g.std**2)).flatten(1).sum(1) * torch.ones(1, 1, 8, 8).numel()
    torch.testing.assert_close(gaussian_kl(g, shifted, 1.0), want.flatten(), rtol=1e-4, atol=0)


def test_one_flow_update_lowers_the_loss_on_its_batch():
    cfg = load_config("configs/digits_tree.yaml", ["checkpoint.dir="])
    pipe, transformer = load_flow_policy(cfg)
    opt = torch.optim.AdamW(transformer.parameters(), lr=3e-4)
    flow = FlowConfig(layer_tuning=LayerTuningConfig(sft_coef=0.5, adaptive_clip=1.0))
    loss = LossConfig(estimator="depth", aggregation="token", kl_beta=0.01)
    trainer = FlowTrainer(pipe, transformer, opt, loss, flow, ref_model=frozen_copy(transformer))
    trees = sample_flow_tree(PROMPTS * 2, 2, [2, 3], pipe, num_inference_steps=6,
                             sde_window=(0, 4), noise_levels=[1.0, 0.7], guidance_scale=1.0)
    score_trees(trees, DigitReward(), leaf_image)
    metrics = trainer.step(trees)
    assert metrics["clip_frac"] == 0.0 and metrics["kl"] < 1e-9  # same weights as the reference
    assert metrics["train_nfe"] == 4 * (2 * 2 + 6 * 2)
    assert trainer.loss_value(trees) < metrics["loss"] - 1e-4
    assert all(p.grad is None for p in pipe.text_encoder.parameters())
