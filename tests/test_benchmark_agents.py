"""The agents benchmark end to end on ours only (tiny Llama, 2 conversations x 3 turns, cache vs
no cache, no vLLM, no timing assertions), and its pure parts: the new-token trie and the
Prometheus parser it reads vLLM's counters with.

The system prompt is 48 tokens on purpose: the scheduler shares a prefix between requests sent
together only when that saves >= 64 tokens (2 x 48 saves 48), so without the cache every turn
computes its whole prompt, and with it exactly the tokens no earlier turn forwarded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
CLIENTS, TURNS, SYSTEM, OBSERVATION, ANSWER = 2, 3, 48, 8, 4


def test_agents_ours_cache_vs_no_cache(tmp_path):
    out = tmp_path / "agents.json"
    cmd = [
        sys.executable, str(BENCH / "agents.py"), "--model", "tiny:llama", "--no-vllm",
        "--clients", str(CLIENTS), "--turns", str(TURNS), "--system-tokens", str(SYSTEM),
        "--observation-tokens", str(OBSERVATION), "--max-tokens", str(ANSWER),
        "--repeats", "1", "--warmup-turns", "1", "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "vllm not run: skipped: --no-vllm" in done.stdout
    report = json.loads(out.read_text())
    assert Path(report["plot"]).is_file()
    assert report["not_run"] == {"vllm": "skipped: --no-vllm"}
    assert set(report["servers"]) == {"ours-cache", "ours-no-cache"}
    assert report["ratios"]["ours-cache/ours-no-cache tokens_per_s_best"] > 0
    assert report["ratios"]["ours-cache/vllm tokens_per_s_best"] is None

    cache, plain = report["servers"]["ours-cache"], report["servers"]["ours-no-cache"]
    # the goal line: the system prompt once, then each turn's observation + the last answer
    # token (sampled, never forwarded) per conversation
    new = [SYSTEM + CLIENTS * OBSERVATION] + [CLIENTS * (OBSERVATION + 1)] * (TURNS - 1)
    for row in (cache, plain):
        assert row["new_per_turn"] == new
        assert row["generated_tokens"] == CLIENTS * TURNS * ANSWER
        assert row["requests"] == CLIENTS * TURNS
        assert row["tokens_per_s_best"] > 0 and row["latency_p50_s"] <= row["latency_p99_s"]
        assert row["prefill_total"] == sum(row["prefill_per_turn"])
        assert row["prompt_total"] == sum(row["prompt_per_turn"])
    assert cache["prefill_per_turn"][1:] == new[1:]
    assert plain["prefill_per_turn"][1:] == plain["prompt_per_turn"][1:]
    assert plain["prompt_per_turn"][1] == CLIENTS * (SYSTEM + 2 * OBSERVATION + ANSWER)


def test_new_tokens_counts_past_the_longest_forwarded_prefix(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    from agents_workload import NewTokens, Record, new_tokens_per_turn

    trie = NewTokens()
    assert trie.new((1, 2, 3)) == 3
    trie.add((1, 2, 3))
    assert trie.new((1, 2, 3, 4)) == 1 and trie.new((1, 9)) == 1 and trie.new((5,)) == 1
    rec = lambda c, t, p, a: Record(c, t, tuple(p), tuple(a), None, 0.1)  # noqa: E731
    records = [
        rec(1, 0, [7, 7, 2], [5, 6]),  # out of order on purpose: turns count in client order
        rec(0, 0, [7, 7, 1], [3, 4]),
        rec(0, 1, [7, 7, 1, 3, 4, 8], [9, 9]),  # 4 was sampled last, never forwarded: new
    ]
    assert new_tokens_per_turn(records, 2) == [3 + 1, 2]


def test_prometheus_counters_sum_label_sets(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    from agents_servers import parse_prometheus

    text = "\n".join([
        "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
        "# TYPE vllm:prompt_tokens_total counter",
        'vllm:prompt_tokens_total{engine="0",model_name="m"} 620.0',
        'vllm:prompt_tokens_total{engine="1",model_name="m"} 10.0',
        'vllm:prompt_tokens_created{engine="0",model_name="m"} 1.7e9',
        'vllm:prompt_tokens_by_source_total{engine="0",source="local_compute"} 364',
        'vllm:prompt_tokens_by_source_total{engine="0",source="local_cache_hit"} 256',
        "vllm:prefix_cache_hits_total 256",
    ])  # fmt: skip
    got = parse_prometheus(text)
    assert got["vllm:prompt_tokens_total"] == 630.0
    assert "vllm:prompt_tokens_created" not in got
    assert got['vllm:prompt_tokens_by_source_total{source="local_compute"}'] == 364.0
    assert got["vllm:prompt_tokens_by_source_total"] == 620.0
    assert got["vllm:prefix_cache_hits_total"] == 256.0
