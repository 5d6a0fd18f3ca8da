"""Two accelerate processes (gloo, CPU) give the same gradient as one process on all trees."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rollout
from trainers.config import LossConfig
from trainers.text.toy_task import build_toy_policy, make_prompts, sort_reward
from trainers.text.trainer import TreeTrainer

HERE = Path(__file__).resolve().parent


def make_trainer_parts():
    model, tok = build_toy_policy(20, 6)
    # TreeRL whitens over the whole batch and "sequence" divides by the global tree count: both
    # are wrong unless the processes share their trees' statistics.
    return model, tok, LossConfig(estimator="treerl", aggregation="sequence")


def make_trees(model, tok):
    prompts = make_prompts(random.Random(3), 5, 6)  # odd: the processes hold 3 and 2 trees
    trees = rollout.sample_tree(
        prompts, 2, [2, 3], model=model, tokenizer=tok, segment_len=3, max_new_tokens=7, seed=11
    )
    rollout.score_trees(trees, sort_reward, lambda t: tok.decode(t.completion_ids))
    return trees


@pytest.mark.slow
def test_two_processes_match_one_process_gradients(tmp_path):
    torch.set_num_threads(1)
    model, tok, loss_cfg = make_trainer_parts()
    trees = make_trees(model, tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    TreeTrainer(model, opt, loss_cfg, micro_batch_trees=2, grad_clip=0.0).step(trees)
    out = tmp_path / "two.pt"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(HERE / "train_dist_worker.py"),
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{HERE}:{HERE.parent}"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    two = torch.load(out)
    for k, w in model.state_dict().items():
        grad_one, grad_two = before[k] - w, before[k] - two[k]
        torch.testing.assert_close(grad_two, grad_one, atol=1e-6, rtol=1e-5)
    assert any((before[k] - w).abs().max() > 1e-4 for k, w in model.state_dict().items())
