"""The rollout service against the in-process engine: N concurrent callers sharing system prompts.

Workload (the defaults): the benchmarks' tiny Llama (`tiny:bench`: hidden 512, 8 layers, vocab
4096); 2 system prompts of 128 tokens; each caller sends `rounds` requests one after another, each
request 2 prompts (a system prompt + a 16-token question), trees of depth 2, width [4, 2],
segment 16, leaves to 48 new tokens (EOS off). Rows:

  in-process, one call     every request of every caller in one `Engine.sample_tree` call: the
                           best batching there is (it needs every round up front)
  in-process, per request  the requests one after another on one Engine (what callers that each
                           own a sampler get: no batching and no sharing across them)
  in-process, per round    round k of every caller in one call: the callers' arrival pattern
                           (round k+1 is sent when round k returns) batched in process, the
                           like-for-like throughput target
  service, N callers       `python -m rollout.serve` in a subprocess, N `rollout.Client` threads

Throughput counts sampled tokens; latency is per request, as a caller sees it; prefix sharing is
the fraction of prompt tokens whose KV a tree read from a prefix computed once for several trees
(for the service: across callers). Prints a table and writes JSON.
Usage: python benchmarks/service.py [--clients 1,8] [--rounds 2] [--out results/service.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

import rollout
from rollout.service.cli import free_port, load_model, parse_bytes

KV_BUDGET = "256M"
TREE = dict(depth=2, width=[4, 2], segment_len=16, max_new_tokens=48, eos_token_id=[])


def make_requests(clients: int, rounds: int, vocab: int = 4096) -> list[list[dict]]:
    """Per caller, its requests in order: kwargs of `sample_tree`."""
    rng = random.Random(0)
    systems = [[rng.randrange(vocab) for _ in range(128)] for _ in range(2)]
    out = []
    for c in range(clients):
        mine = []
        for r in range(rounds):
            prompts = [s + [rng.randrange(vocab) for _ in range(16)] for s in systems]
            mine.append(dict(prompts=prompts, seed=1000 * c + r, **TREE))
        out.append(mine)
    return out


def sampled_tokens(trees: list) -> int:
    return sum(len(n.tokens) for t in trees for n in t.nodes() if n is not t.root)


def sharing(trees: list) -> float:
    prompt = sum(len(t.prompt_ids) for t in trees)
    return sum(t.stats.prefix_tokens_reused for t in trees) / prompt


def row(name: str, seconds: float, tokens: int, latencies: list[float], share: float) -> dict:
    lat = sorted(latencies)
    pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]  # noqa: E731
    return {
        "name": name,
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "p50_s": pick(0.5),
        "p99_s": pick(0.99),
        "prefix_sharing": share,
    }


def timed_calls(name: str, calls: list) -> dict:
    """Run `calls` (each returns trees) one after another; one row with per-call latencies."""
    latencies, trees = [], []
    start = time.perf_counter()
    for call in calls:
        t0 = time.perf_counter()
        trees += call()
        latencies.append(time.perf_counter() - t0)
    seconds = time.perf_counter() - start
    return row(name, seconds, sampled_tokens(trees), latencies, sharing(trees))


def in_process(engine: rollout.Engine, requests: list[list[dict]]) -> list[dict]:
    flat = [r for mine in requests for r in mine]
    prompts = [p for r in flat for p in r["prompts"]]
    start = time.perf_counter()
    trees = engine.sample_tree(prompts, seed=0, **TREE)
    batched = row(
        "in-process, one call",
        time.perf_counter() - start,
        sampled_tokens(trees),
        [time.perf_counter() - start],
        sharing(trees),
    )
    serial = timed_calls(
        "in-process, per request", [lambda r=r: engine.sample_tree(**r) for r in flat]
    )
    # The callers' arrival pattern in process: round k of every caller in one call, as a trainer
    # that gathers its callers' requests each round would do.
    rounds = [
        [p for mine in requests if k < len(mine) for p in mine[k]["prompts"]]
        for k in range(max(len(mine) for mine in requests))
    ]
    per_round = timed_calls(
        "in-process, per round",
        [lambda ps=ps: engine.sample_tree(ps, seed=0, **TREE) for ps in rounds],
    )
    return [batched, serial, per_round]


def through_service(url: str, requests: list[list[dict]]) -> dict:
    latencies: list[float] = []
    trees: list = []
    lock = threading.Lock()

    def caller(mine: list[dict]) -> None:
        with rollout.Client(url, deadline=600) as client:
            for r in mine:
                t0 = time.perf_counter()
                got = client.sample_tree(**r)
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    trees.extend(got)

    threads = [threading.Thread(target=caller, args=(mine,)) for mine in requests]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    assert len(latencies) == sum(len(m) for m in requests), "a request was lost"
    return row(
        f"service, {len(requests)} callers",
        seconds,
        sampled_tokens(trees),
        latencies,
        sharing(trees),
    )


def start_server(port: int, threads: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [
        sys.executable,
        "-m",
        "rollout.serve",
        "--model",
        "tiny:bench",
        "--port",
        str(port),
        "--kv-budget",
        KV_BUDGET,
        "--max-queue",
        "1024",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    client = rollout.Client(f"http://127.0.0.1:{port}", deadline=120)
    try:
        client.health()  # retries refused connections until the server is up
    finally:
        client.close()
    return proc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--clients", default="1,8", help="comma list of caller counts")
    ap.add_argument("--rounds", type=int, default=2, help="requests per caller, in sequence")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads, each side (1: a shared CPU)"
    )
    ap.add_argument("--out", default="results/service.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model("tiny:bench")
    engine = rollout.Engine(model, kv_budget=parse_bytes(KV_BUDGET))
    port = free_port()
    server = start_server(port, args.threads)
    url = f"http://127.0.0.1:{port}"
    results = []
    try:
        warm = make_requests(1, 1)
        in_process(engine, warm)
        through_service(url, warm)
        for n in [int(x) for x in args.clients.split(",")]:
            requests = make_requests(n, args.rounds)
            base = in_process(engine, requests)
            served = through_service(url, requests)
            served["vs_in_process"] = served["tokens_per_s"] / base[0]["tokens_per_s"]
            served["vs_in_process_per_round"] = served["tokens_per_s"] / base[2]["tokens_per_s"]
            results.append({"clients": n, "rows": [*base, served]})
            print_table(n, [*base, served])
    finally:
        server.terminate()
        server.wait(30)
    meta = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "threads": args.threads,
        "torch": torch.__version__,
        "tree": TREE,
        "rounds": args.rounds,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {args.out}")


def print_table(clients: int, rows: list[dict]) -> None:
    print(f"\n{clients} caller(s)")
    print(f"{'':26} {'seconds':>8} {'tokens/s':>9} {'p50 s':>7} {'p99 s':>7} {'sharing':>8}")
    for r in rows:
        print(
            f"{r['name']:26} {r['seconds']:8.2f} {r['tokens_per_s']:9.0f} {r['p50_s']:7.2f} "
            f"{r['p99_s']:7.2f} {r['prefix_sharing']:8.2f}"
        )
    ratio = rows[-1].get("vs_in_process")
    print(f"service throughput / in-process (one call): {ratio:.2f}")
    ratio = rows[-1].get("vs_in_process_per_round")
    print(f"service throughput / in-process (per round, the callers' arrival pattern): {ratio:.2f}")


if __name__ == "__main__":
    main()
