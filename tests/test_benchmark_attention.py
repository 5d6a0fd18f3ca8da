"""The attention benchmark runs end to end on a minimal grid and writes a sane JSON report."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "attention.py"


def test_attention_benchmark_smoke(tmp_path, capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_attention", BENCH)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_attention", bench)  # dataclasses look it up there
    spec.loader.exec_module(bench)
    out = tmp_path / "attention.json"
    report = bench.main(["--quick", "--grid", "2x64", "--budget-s", "0", "--out", str(out)])
    assert json.loads(out.read_text()) == report
    methods = {r["method"]: r for r in report["results"]}
    assert {"naive", "naive-gqa", "sdpa", "torch"} <= set(methods)  # triton only with a GPU
    assert all(r["seconds"] > 0 and r["vs_bound"] > 0 for r in report["results"])
    assert methods["naive"]["vs_naive"] == 1.0 and methods["naive-gqa"]["vs_naive_gqa"] == 1.0
    assert "x naive" in capsys.readouterr().out
