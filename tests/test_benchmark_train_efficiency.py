"""The train-efficiency benchmark runs end to end on a tiny budget and reports consistent curves."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "train_efficiency.py"


def test_train_efficiency_smoke_averages_seeds(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_train_efficiency", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "eff"
    argv = ["x", "--steps", "3", "--prompts", "2", "--window", "2", "--seeds", "2",
            "--flat", "model.pretrain_steps=5", "--tree", "model.pretrain_steps=5",
            # fixed-length branching: a tree step then costs less than a flat one for certain
            "--tree", "rollout.branch_entropy=null", "--tree", "rollout.segment_len=4",
            "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    report = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    assert report["settings"]["seeds"] == 2
    for key in ("flat", "tree"):
        seeds = report["per_seed"][key]
        assert len(seeds) == 2
        mean = [(a + b) / 2 for a, b in zip(seeds[0]["reward"], seeds[1]["reward"], strict=False)]
        assert report["runs"][key]["reward"] == mean
        costs = report["runs"][key]["cost"]
        assert all(b > a for a, b in zip(costs, costs[1:], strict=False))  # cumulative
    for flat, tree in zip(report["per_seed"]["flat"], report["per_seed"]["tree"], strict=True):
        assert len(flat["reward"]) == 3
        # cost-matched: a tree step is cheaper, so the tree runs on until it has spent as much
        assert len(tree["reward"]) > 3
        assert tree["cost"][-2] < flat["cost"][-1] <= tree["cost"][-1]
    assert report["summary"]["flat_final_reward"] == report["runs"]["flat"]["reward_smoothed"][-1]
