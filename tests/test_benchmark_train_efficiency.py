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
    assert set(report["per_seed"]) == {"flat", "tree", "small"}  # groups of 4 by default
    for key in ("flat", "tree", "small"):
        seeds = report["per_seed"][key]
        assert len(seeds) == 2
        mean = [(a + b) / 2 for a, b in zip(seeds[0]["reward"], seeds[1]["reward"], strict=False)]
        assert report["runs"][key]["reward"] == mean
        costs = report["runs"][key]["cost"]
        assert all(b > a for a, b in zip(costs, costs[1:], strict=False))  # cumulative
    for key in ("tree", "small"):
        for flat, other in zip(report["per_seed"]["flat"], report["per_seed"][key], strict=True):
            assert len(flat["reward"]) == 3
            # cost-matched: a step of either is cheaper, so it runs on until it has spent as much
            assert len(other["reward"]) > 3
            assert other["cost"][-2] < flat["cost"][-1] <= other["cost"][-1]
    # groups of 4 sample half the completion tokens of groups of 8 on the same prompts
    first_step = {key: report["per_seed"][key][0]["cost"][0] for key in ("flat", "small")}
    assert first_step["small"] < 0.75 * first_step["flat"]
    summary = report["summary"]
    assert summary["flat_final_reward"] == report["runs"]["flat"]["reward_smoothed"][-1]
    for key in ("tree", "small"):
        mine = summary[key]
        if mine["cost_ratio"] is not None:
            assert mine["cost_ratio"] == mine["cost_to_reach"] / summary["flat_cost"]
        spread = mine["per_seed_cost_ratio"]
        reached = 2 - spread["not_reached"]
        assert 0 <= reached <= 2
        if reached:
            assert spread["min"] <= spread["median"] <= spread["max"]
    assert summary["goal_met"] == (
        summary["tree"]["cost_ratio"] is not None and summary["tree"]["cost_ratio"] <= 0.6
    )


def test_spread_and_reach_against_hand_values():
    spec = importlib.util.spec_from_file_location("bench_train_efficiency", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.spread([0.5, None, 0.9, 0.7]) == {
        "median": 0.7, "min": 0.5, "max": 0.9, "not_reached": 1}
    assert bench.spread([0.4, 0.6])["median"] == 0.5
    assert bench.spread([None])["median"] is None
    flat = {"reward": [0.0, 0.5, 1.0], "cost": [10.0, 20.0, 30.0], "seconds": [1.0, 2.0, 3.0]}
    other = {"reward": [0.0, 1.0, 1.0], "cost": [5.0, 10.0, 15.0], "seconds": [1.0, 2.0, 3.0]}
    got = bench.reach(flat, other, window=1)
    # flat ends at 1.0 having spent 30; the other first gets there at cost 10
    assert got["cost_to_reach"] == 10.0 and got["cost_ratio"] == 10.0 / 30.0
    # the 90% level is 0.9: flat first passes it at cost 30, the other at 10
    assert got["cost_ratio_at_level_90"] == 10.0 / 30.0
