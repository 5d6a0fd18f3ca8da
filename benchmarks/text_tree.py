"""Text tree rollouts against what a transformers user does today, same model, same leaves.

Workload (the defaults): a tiny Llama built from a config (hidden 512, 8 layers, 8 query / 2 KV
heads, vocab 4096), 2 prompts of 1024 tokens, depth 3, width 4, segment 32, leaves to 96 new
tokens: 64 leaves of 96 tokens per prompt. Every method produces exactly that many tokens (EOS
disabled), sampled at temperature 1.

  ours      rollout.sample_tree
  ours-ref  the same, attention by the plain torch cascade reference (attn_impl="reference"):
            the engine before its fused cascade kernels, to show what they bring
  generate  model.generate(num_return_sequences=64) per prompt (each leaf re-reads its whole past)
  manual    prefill each prompt once, expand the KV cache to 64 rows, decode by hand, all prompts
            batched: the best a careful user does with plain transformers
  cb        transformers' continuous batching (generate_batch) with its block sharing

Prints a table (seconds, generated tokens/s, speed-up of ours over each) and writes JSON.
Usage: python benchmarks/text_tree.py [--quick] [--skip cb,generate] [--out results/text_tree.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

import rollout
from rollout.baselines import continuous_batching, generate_per_prompt, prefill_expand_decode
from rollout.tiny import BENCH_LLAMA, tiny_model


def run_ours(model, prompts, depth, width, seg, new, attn_impl="auto"):
    trees = rollout.Engine(model, attn_impl=attn_impl).sample_tree(
        prompts,
        depth,
        width,
        segment_len=seg,
        max_new_tokens=new,
        eos_token_id=[],
        seed=0,
    )
    return sum(len(t.completion_ids) for tree in trees for t in tree.trajectories())


def measure(fn: Callable[[], int]) -> dict:
    start = time.perf_counter()
    tokens = fn()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small workload for a smoke run")
    ap.add_argument(
        "--skip", default="", help="comma list of baselines to skip: ours-ref,generate,manual,cb"
    )
    ap.add_argument("--out", default="results/text_tree.json")
    args = ap.parse_args()
    if args.quick:
        model_kw = dict(BENCH_LLAMA, hidden_size=128, intermediate_size=256, num_hidden_layers=2)
        n_prompts, prompt_len, depth, width, seg, new = 2, 128, 2, 4, 8, 24
    else:
        model_kw = BENCH_LLAMA
        n_prompts, prompt_len, depth, width, seg, new = 2, 1024, 3, 4, 32, 96
    model = tiny_model("llama", seed=0, **model_kw)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(
        0, model.config.vocab_size, (n_prompts, prompt_len), generator=gen
    ).tolist()
    leaves = width**depth
    expected = n_prompts * leaves * new
    skip = {s for s in args.skip.split(",") if s}
    unknown = skip - {"ours-ref", "generate", "manual", "cb"}
    if unknown:
        raise SystemExit(
            f"--skip: unknown baselines {sorted(unknown)}; expected ours-ref,generate,manual,cb"
        )
    methods = {
        "ours": lambda: run_ours(model, prompts, depth, width, seg, new),
        "ours-ref": lambda: run_ours(model, prompts, depth, width, seg, new, "reference"),
        "generate": lambda: generate_per_prompt(model, prompts, leaves, new),
        "manual": lambda: prefill_expand_decode(model, prompts, leaves, new),
        "cb": lambda: continuous_batching(model, prompts, leaves, new),
    }
    run_ours(model, [prompts[0][:16]], 1, 2, seg, 4)  # warm-up (registration, allocator)
    results = {}
    for name, fn in methods.items():
        if name in skip:
            continue
        torch.manual_seed(0)
        results[name] = measure(fn)
        if results[name]["tokens"] != expected:
            raise SystemExit(
                f"{name} produced {results[name]['tokens']} tokens, expected {expected}"
            )
        print(f"  {name}: {results[name]['seconds']:.2f} s", flush=True)
    ours = results["ours"]["seconds"]
    print(
        f"\n{n_prompts} prompts x {prompt_len} tokens, depth {depth}, width {width}, "
        f"segment {seg}, "
        f"{new} new tokens per leaf ({expected} generated tokens), torch threads "
        f"{torch.get_num_threads()}, {platform.processor() or platform.machine()}"
    )
    print(f"{'method':<10}{'seconds':>10}{'tokens/s':>12}{'ours is x faster':>18}")
    for name, r in results.items():
        r["speedup_of_ours"] = r["seconds"] / ours
        print(
            f"{name:<10}{r['seconds']:>10.2f}{r['tokens_per_s']:>12.1f}{r['speedup_of_ours']:>18.2f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "workload": dict(
                    prompts=n_prompts,
                    prompt_len=prompt_len,
                    depth=depth,
                    width=width,
                    segment_len=seg,
                    max_new_tokens=new,
                    model=model_kw,
                ),
                "device": "cpu",
                "threads": torch.get_num_threads(),
                "results": results,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
