"""The flow run loop on the digits task: it raises the classifier reward, resumes exactly after a
kill, rejects bad flow configs at the door."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_helpers import kill_run_after_step_3

from rollout.flow import sample_flow_tree
from rollout.flow.classifier import DigitReward, leaf_image
from rollout.flow.digits import digit_prompts
from rollout.rewards import score_trees
from trainers import train as train_mod
from trainers.config import load_config
from trainers.flow.models import load_flow_policy
from trainers.preflight import check_before_work

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ["digits_tree", "digits_flow_grpo", "sd3_medium_pickscore_tree"]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def flow_cfg(tmp_path, preset, *extra):
    return load_config(f"{ROOT}/configs/{preset}.yaml", [
        "checkpoint.dir=", f"output_dir={tmp_path}", "log.progress=false", "log.wandb=false",
        *extra])


def eval_reward(pipe) -> float:
    """Mean classifier reward of 40 fixed prompts x 4 SDE samples (the training sampler)."""
    prompts = digit_prompts([i % 10 for i in range(40)])
    trees = sample_flow_tree(prompts, 1, 4, pipe, num_inference_steps=8, sde_window=(0, 4),
                             noise_levels=[0.7], guidance_scale=1.0, seed=999)
    rewards = score_trees(trees, DigitReward(), leaf_image)
    return sum(rewards) / len(rewards)


@pytest.mark.parametrize("preset", PRESETS)
def test_flow_presets_load(preset, tmp_path):
    cfg = load_config(f"configs/{preset}.yaml", ["train.steps=3", f"output_dir={tmp_path}"])
    assert cfg.kind == "flow" and cfg.train.steps == 3
    if cfg.model.name == "digits":
        check_before_work(cfg)
    else:  # a GPU preset: its prompt file is the user's to provide, checked before any load
        with pytest.raises(ValueError, match="task.data_path"):
            check_before_work(cfg)


@pytest.mark.parametrize("override,match", [
    ("flow.sde=ito", "flow.sde='ito'"),
    ("task.name=toy_sort", "not a flow task"),
    ("loss.aggregation=sequence", "use token"),
    ("flow.window_size=99", "flow.window_size=99"),
    ("flow.noise_levels=[1.0]", "noise_levels"),
    ("flow.logprob_reduction=max", "flow.logprob_reduction"),
    ("flow.layer_tuning.sft_coef=-1", "flow.layer_tuning.sft_coef"),
    ("model.prompt_strength=2", "model.prompt_strength"),
    ("kind=audio", "kind='audio'"),
    ("rollout.branch_entropy=1.0", "entropy-guided branching is for text trees"),
])
def test_bad_flow_configs_raise_clear_errors(override, match):
    with pytest.raises(ValueError, match=match):
        check_before_work(load_config("configs/digits_tree.yaml", [override]))


def test_a_few_steps_raise_the_classifier_reward(tmp_path):
    cfg = flow_cfg(tmp_path, "digits_tree", "train.steps=25", "train.prompts_per_step=16")
    before = eval_reward(load_flow_policy(cfg)[0])
    state = train_mod.train(cfg, use_wandb=False)
    after = eval_reward(state.sampler.pipe)
    assert after > before + 0.2, (before, after)
    assert state.history[-1]["nfe_total"] == 25 * 16 * (2 * 2 + 8 * 6 + 2 * 2 + 8 * 2)


def test_resume_after_kill_equals_the_uninterrupted_run(tmp_path):
    steps = 8
    common = ["checkpoint.every=1", "train.updates_per_batch=2", "train.prompts_per_step=4"]
    full = train_mod.train(flow_cfg(tmp_path / "a", "digits_tree", f"train.steps={steps}",
                                    *common), use_wandb=False)
    ckpt = tmp_path / "b" / "ckpt"
    killed_at = kill_run_after_step_3("digits_tree", ckpt, tmp_path / "b", common)
    assert 3 <= killed_at < steps, killed_at
    resumed = train_mod.train(flow_cfg(tmp_path / "b", "digits_tree", f"train.steps={steps}",
                                       f"checkpoint.dir={ckpt}", *common), use_wandb=False)
    assert len(resumed.history) == steps - killed_at
    for got, want in zip(resumed.history, full.history[killed_at:], strict=True):
        for key in ("reward_mean", "loss", "sft_loss", "clip_frac", "adv_std", "nfe_total"):
            assert got[key] == want[key], (key, got[key], want[key])
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
