"""The peers benchmark runs ours end to end on tiny sizes (no vLLM) and writes the report's fields;
its compute floor counts the model's own linear weights. No timing assertions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_peers_quick_ours_only(tmp_path):
    out = tmp_path / "peers.json"
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH / "peers.py"),
            "--quick",
            "--no-vllm",
            "--repeats",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "skipped: --no-vllm" in done.stdout and "vLLM/ours" in done.stdout
    report = json.loads(out.read_text())
    assert report["vllm"]["status"] == "skipped: --no-vllm"
    assert report["matmul_gflops"]["best"] > 0 and len(report["matmul_gflops"]["samples"]) == 4
    assert set(report["workloads"]) == {"flat", "tree", "long"}
    for row in report["workloads"].values():
        ours = row["ours"]
        assert ours["leaf_tokens"] == row["leaf_tokens"] > 0
        assert ours["sampled_tokens"] == row["sampled_tokens"] > 0
        assert ours["seconds"] > 0 and ours["tokens_per_s"] > 0 and ours["x_floor"] > 0
        assert row["floor_seconds"] > 0 and row["floor_flops"]["total"] > 0
        assert row["vllm"] is None and row["vllm_over_ours"] is None
    tree = report["workloads"]["tree"]
    assert tree["sampled_tokens"] < tree["leaf_tokens"]  # shared segments sampled once


def test_floor_counts_the_models_linear_weights(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    from peers_floor import Workload, floor_flops

    from rollout.tiny import tiny_model

    model = tiny_model(
        "llama",
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=3,
        vocab_size=100,
    )
    layer_weights = sum(
        m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)
    )
    w = Workload("t", n_prompts=2, prompt_len=5, widths=(3, 2), segments=(4, 6))
    # per prompt: 5 prompt tokens + 3 x 4 + 6 x (6 - 1) forwarded (a leaf's last token is not)
    forwarded = 2 * (5 + 12 + 30)
    flops = floor_flops(model.config, w)
    assert flops["forwarded_tokens"] == forwarded
    assert flops["linear"] == 2 * forwarded * layer_weights
    assert flops["lm_head"] == 2 * w.sampled_tokens * model.lm_head.weight.numel()
    assert w.sampled_tokens == 2 * (3 * 4 + 6 * 6) and w.leaf_tokens == 2 * 6 * 10
    # attention: 4 FLOPs per query dim per key per layer; a prompt token at i sees i + 1 keys
    keys = sum(range(1, 6)) + 3 * sum(range(6, 10)) + 6 * sum(range(10, 15))
    assert flops["attention"] == 2 * keys * 4 * 64 * 3


def test_settle_waits_for_quiet_samples_in_a_row(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import settle

    # cumulative (busy, total) jiffies: busy, quiet, busy, then quiet from there on
    deltas = [(90, 100), (0, 100), (80, 100)] + [(1, 100)] * 10
    busy = [sum(d[0] for d in deltas[: i + 1]) for i in range(len(deltas))]
    total = [sum(d[1] for d in deltas[: i + 1]) for i in range(len(deltas))]
    reads = iter([(0, 0), *zip(busy, total, strict=True)])
    calls = []
    monkeypatch.setattr(settle, "_cpu_times", lambda: (calls.append(1), next(reads))[1])
    monkeypatch.setattr(settle.time, "sleep", lambda s: None)
    settle.settle(least_s=0.0, quiet_samples=3)
    # the first read, then 3 samples until the busy one at sample 3 resets the count, then 3 quiet
    assert len(calls) == 1 + 3 + 3


def test_settle_is_a_plain_pause_without_proc_stat(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCH))
    import settle

    monkeypatch.setattr(settle, "STAT", tmp_path / "missing")
    slept = []
    monkeypatch.setattr(settle.time, "sleep", slept.append)
    settle.settle(least_s=0.25)
    assert slept == [0.25]
    assert settle._cpu_times() is None


def test_other_workloads_by_flag(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    from peers import parse
    from peers_floor import Workload, parse_workload

    w = parse_workload("deep=1:512:2x16,3x8")
    assert w == Workload("deep", 1, 512, (2, 3), (16, 8))
    assert w.sampled_tokens == 2 * 16 + 6 * 8 and w.leaf_tokens == 6 * 24
    args = parse(["--workloads", "tree", "--workload", "small=2:64:4x8"])
    assert args.names == ["tree"] and [c.name for c in args.custom] == ["small"]
    for bad in ("small=2:64", "small=2:64:4", "=2:64:4x8", "small=0:64:4x8", "tree=2:64:4x8"):
        with pytest.raises(SystemExit):
            parse(["--workloads", "tree", "--workload", bad])
