"""The run loop on the toy task: it learns, resumes bit-identically after a kill, and never
samples from KV computed under old weights."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from train_helpers import kill_run_after_step_3

import rollout
from trainers.config import LossConfig, load_config
from trainers.text.forward import packed_logprobs
from trainers.text.packing import pack_trees
from trainers.text.toy_task import build_toy_policy, make_prompts, sort_reward
from trainers.text.trainer import TreeTrainer
from trainers.train import train

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def toy_cfg(tmp_path, preset="toy_tree_grpo", *extra):
    return load_config(
        f"{ROOT}/configs/{preset}.yaml",
        [
            "checkpoint.dir=",
            f"output_dir={tmp_path}",
            "log.progress=false",
            *extra,
        ],
    )


def eval_reward(model, tok, n_prompts=48, width=8):
    prompts = make_prompts(random.Random(12345), n_prompts, 8)
    trees = rollout.sample_tree(
        prompts, 1, width, model=model, tokenizer=tok, segment_len=9, max_new_tokens=9, seed=777
    )
    rewards = rollout.score_trees(trees, sort_reward, lambda t: tok.decode(t.completion_ids))
    return sum(rewards) / len(rewards)


def test_one_update_lowers_the_loss_on_its_batch():
    model, tok = build_toy_policy(60, 8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    trainer = TreeTrainer(model, opt, LossConfig(estimator="sibling", aggregation="token"))
    prompts = make_prompts(random.Random(0), 8, 8)
    trees = rollout.sample_tree(
        prompts, 2, [2, 4], model=model, tokenizer=tok, segment_len=4, max_new_tokens=9, seed=0
    )
    rollout.score_trees(trees, sort_reward, lambda t: tok.decode(t.completion_ids))
    metrics = trainer.step(trees)
    assert metrics["clip_frac"] == 0.0  # on-policy: every ratio is 1 before the update
    assert trainer.loss_value(trees) < metrics["loss"] - 1e-3


@pytest.mark.parametrize("preset", ["toy_grpo", "toy_tree_grpo"])
def test_training_raises_the_reward(tmp_path, preset):
    cfg = toy_cfg(tmp_path, preset, "train.steps=60", "log.wandb=false")
    start, tok = build_toy_policy(cfg.model.pretrain_steps, 8)
    before = eval_reward(start, tok)
    state = train(cfg, use_wandb=False)
    after = eval_reward(state.accelerator.unwrap_model(state.model), tok)
    assert after > before + 0.04, (before, after)
    assert state.history[-1]["forward_tokens_total"] > 0


def test_resume_after_kill_is_bit_identical(tmp_path):
    steps = 14
    common = [
        "log.wandb=false",
        "model.pretrain_steps=20",
        "checkpoint.every=1",
        "train.updates_per_batch=2",
    ]
    full = train(toy_cfg(tmp_path / "a", "toy_tree_grpo", f"train.steps={steps}", *common))
    ckpt = tmp_path / "b" / "ckpt"
    killed_at = kill_run_after_step_3("toy_tree_grpo", ckpt, tmp_path / "b", common)
    assert 3 <= killed_at < steps, killed_at
    resumed = train(
        toy_cfg(
            tmp_path / "b",
            "toy_tree_grpo",
            f"train.steps={steps}",
            f"checkpoint.dir={ckpt}",
            *common,
        )
    )
    assert len(resumed.history) == steps - killed_at
    for got, want in zip(resumed.history, full.history[killed_at:], strict=True):
        for key in ("reward_mean", "loss", "clip_frac", "adv_std"):
            assert got[key] == want[key], (key, got[key], want[key])
    a = full.accelerator.unwrap_model(full.model).state_dict()
    b = resumed.accelerator.unwrap_model(resumed.model).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_no_stale_kv_after_an_optimizer_step():
    """Sampling log-probs after each update equal a fresh forward of the updated weights, even
    with a system prompt shared by every tree (the prefix an engine would like to keep)."""
    model, tok = build_toy_policy(20, 8)
    engine = rollout.Engine(model, tok)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    trainer = TreeTrainer(
        model, opt, LossConfig(), updates_per_batch=2, on_optimizer_step=engine.policy_updated
    )
    system = "0123456789>"  # the same prefix on every prompt, every step
    prompts = [system + p for p in make_prompts(random.Random(0), 4, 8)]
    for step in range(3):
        trees = engine.sample_tree(prompts, 2, [2, 2], segment_len=4, max_new_tokens=9, seed=step)
        assert all(t.policy_version == 2 * step for t in trees)
        batch = pack_trees(trees, use_advantages=False)
        with torch.no_grad():
            fresh = packed_logprobs(model, batch)
        torch.testing.assert_close(batch.old_logprobs, fresh, atol=1e-4, rtol=0)
        rollout.score_trees(trees, sort_reward, lambda t: tok.decode(t.completion_ids))
        trainer.step(trees)
        assert engine.policy_version == 2 * (step + 1)
        with torch.no_grad():  # the update moves log-probs enough that stale KV would show
            updated = packed_logprobs(model, batch)
        assert (updated - fresh).abs().max() > 1e-2
