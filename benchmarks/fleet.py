"""A fleet of engines on Ray: prefix-aware routing against round-robin and random.

Workload: a stream of requests that share a few system prompts (default 4 x 384 tokens), each with
its own question (24 tokens) and a group of `--width` completions of `--new` tokens, sent by
`--concurrency` callers through `rollout.Client`; the same stream, in the same order, for every
configuration. Configurations: one engine (the reference), then 2 and 4 replicas under each
routing policy, each a fresh fleet (empty caches).

Reported per configuration: prefix tokens recomputed (system-prompt tokens forwarded across the
fleet: a system prompt computed once counts its length once; a single engine computes each once),
all prompt tokens forwarded, generated tokens/s, p50/p99 request latency, and where requests went.
Goal: prefix-aware routing recomputes within 1.1x of a single engine and at least `replicas`
times less than round-robin. A table and results/fleet.json.

What this machine can and cannot show: it has 2 cores, so 2 replicas get one each, and 4 replicas
share them (throughput then measures contention, not scale-out); the recompute counts are exact
whatever the cores, since they come from each tree's own `prefix_tokens_reused`.
Usage: python benchmarks/fleet.py [--replicas 2,4] [--requests 64] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import rollout
from rollout.fleet import start_fleet
from rollout.fleet.router import POLICIES


def stream(args: argparse.Namespace) -> tuple[list[list[int]], list[int]]:
    """The requests' prompts, and each one's system prompt length (token ids, seeded)."""
    rng = random.Random(args.seed)
    systems = [
        [rng.randrange(3, 250) for _ in range(args.system_tokens)] for _ in range(args.systems)
    ]
    prompts, shared = [], []
    for _ in range(args.requests):
        system = rng.choice(systems)
        prompts.append(system + [rng.randrange(3, 250) for _ in range(args.question_tokens)])
        shared.append(len(system))
    return prompts, shared


def run(url: str, prompts: list[list[int]], shared: list[int], args: argparse.Namespace) -> dict:
    """Send the stream; the recompute counts and latencies of its answers."""
    client = rollout.Client(url, timeout=600)

    def one(i: int) -> tuple[float, rollout.Tree]:
        start = time.perf_counter()
        (tree,) = client.sample_tree(
            [prompts[i]], 1, args.width, max_new_tokens=args.new, seed=i, eos_token_id=[]
        )
        return time.perf_counter() - start, tree

    start = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        answers = list(pool.map(one, range(len(prompts))))
    wall = time.perf_counter() - start
    latencies = sorted(lat for lat, _ in answers)
    trees = [tree for _, tree in answers]
    reused = [t.stats.prefix_tokens_reused for t in trees]
    generated = sum(len(leaf.tokens) for t in trees for leaf in t.leaves())
    return {
        "prefix_recomputed": sum(max(0, s - r) for s, r in zip(shared, reused, strict=True)),
        "prompt_forwarded": sum(len(p) - r for p, r in zip(prompts, reused, strict=True)),
        "tokens_per_s": generated / wall,
        "p50_s": statistics.median(latencies),
        "p99_s": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
        "seconds": wall,
        "tokens": [t.leaves()[0].tokens for t in trees],
    }


def measure(replicas: int, policy: str, prompts, shared, args) -> dict:
    with start_fleet(args.model, replicas, policy=policy, threads=1, kv_budget=args.kv_budget) as f:
        result = run(f.url, prompts, shared, args)
        stats = rollout.Client(f.url).stats()
    result["routed"] = [row["routed"] for row in stats["replicas"]]
    return {"replicas": replicas, "policy": policy, **result}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny:bench")
    ap.add_argument("--replicas", default="2,4", help="comma-separated replica counts")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--systems", type=int, default=4)
    ap.add_argument("--system-tokens", type=int, default=384)
    ap.add_argument("--question-tokens", type=int, default=24)
    ap.add_argument("--width", type=int, default=4)
    ap.add_argument("--new", type=int, default=8)
    ap.add_argument("--kv-budget", default="256M")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/fleet.json")
    args = ap.parse_args()
    prompts, shared = stream(args)
    rows = [measure(1, "prefix", prompts, shared, args)]
    for n in (int(x) for x in args.replicas.split(",")):
        rows += [measure(n, p, prompts, shared, args) for p in args.policies.split(",")]
    single = rows[0]
    for row in rows:
        assert row["tokens"] == single["tokens"], "a fleet sampled other tokens than one engine"
    print(
        f"\n{args.requests} requests, {args.systems} system prompts x {args.system_tokens} tokens, "
        f"question {args.question_tokens}, width {args.width}, {args.new} new tokens, "
        f"{args.concurrency} callers; {args.model}, 1 thread per replica on {platform.machine()}"
    )
    print(
        f"{'replicas':>8} {'routing':12} {'prefix recomputed':>18} {'x single':>9} "
        f"{'prompt fwd':>11} {'tok/s':>7} {'p50 s':>6} {'p99 s':>6}  routed"
    )
    for r in rows:
        ratio = r["prefix_recomputed"] / max(single["prefix_recomputed"], 1)
        print(
            f"{r['replicas']:>8} {r['policy']:12} {r['prefix_recomputed']:>18} {ratio:>9.2f} "
            f"{r['prompt_forwarded']:>11} {r['tokens_per_s']:>7.1f} {r['p50_s']:>6.2f} "
            f"{r['p99_s']:>6.2f}  {r['routed']}"
        )
    goals = {}
    for n in {r["replicas"] for r in rows[1:]}:
        by = {r["policy"]: r["prefix_recomputed"] for r in rows[1:] if r["replicas"] == n}
        if "prefix" in by:
            goals[n] = {
                "prefix_vs_single": by["prefix"] / max(single["prefix_recomputed"], 1),
                "round_robin_over_prefix": by.get("round-robin", 0) / max(by["prefix"], 1),
            }
            g = goals[n]
            print(
                f"{n} replicas: prefix routing recomputes {g['prefix_vs_single']:.2f}x a single "
                f"engine (goal <= 1.1); round-robin {g['round_robin_over_prefix']:.1f}x prefix "
                f"routing (goal >= {n})"
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for r in rows:
        r.pop("tokens")
    out.write_text(json.dumps({"args": vars(args), "rows": rows, "goals": goals}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
