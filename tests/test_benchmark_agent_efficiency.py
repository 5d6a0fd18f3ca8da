"""The agent-efficiency benchmark runs end to end on a tiny budget with consistent curves."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "agent_efficiency.py"


def test_agent_efficiency_smoke(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH.parent))  # it imports train_efficiency beside it
    spec = importlib.util.spec_from_file_location("bench_agent_efficiency", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "agents"
    argv = ["x", "--steps", "2", "--prompts", "2", "--window", "2", "--seeds", "2",
            "--set", "model.pretrain_steps=20", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    report = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    assert set(report["per_seed"]) == {"flat", "tree", "arpo"}
    for key, seeds in report["per_seed"].items():
        assert len(seeds) == 2
        for run in seeds:
            for cost in ("env_calls", "sampled_tokens", "forward_tokens"):
                assert all(b > a for a, b in zip(run[cost], run[cost][1:], strict=False))
        mean = [(a + b) / 2 for a, b in zip(seeds[0]["reward"], seeds[1]["reward"], strict=False)]
        assert report["runs"][key]["reward"] == mean
    for flat, tree in zip(report["per_seed"]["flat"], report["per_seed"]["tree"], strict=True):
        # a tree step calls the environment less than a flat one: it runs on to the same tokens
        assert len(flat["reward"]) == 2 and len(tree["reward"]) > 2
        assert tree["env_calls"][1] < flat["env_calls"][1]
    for key in ("tree", "arpo"):
        assert "env_calls_ratio" in report["summary"][key]
