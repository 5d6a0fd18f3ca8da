"""`python -m rollout.demo`: sample trees on a built-in tiny model and show what sharing buys.

Builds a small Llama from a config (random weights, nothing downloaded), samples one tree per
prompt with `rollout.sample_tree`, prints the first tree and its stats, then times the same number
of leaves sampled the way a careful transformers user would (prefill once, expand the cache,
decode every leaf) and prints the speed ratio.
"""

from __future__ import annotations

import argparse
import time

import torch
from tree_kernels.cascade_cpu_native import native_op

import rollout
from rollout.baselines import prefill_expand_decode
from rollout.tiny import BENCH_LLAMA, tiny_model


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--width", type=int, default=4)
    ap.add_argument("--segment-len", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    args = ap.parse_args(argv)
    model = tiny_model("llama", seed=0, **{**BENCH_LLAMA, "num_hidden_layers": 4})
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(
        0, model.config.vocab_size, (args.prompts, args.prompt_len), generator=gen
    ).tolist()
    print(
        f"tiny Llama ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, random "
        f"weights), {args.prompts} prompts of {args.prompt_len} tokens, depth {args.depth}, "
        f"width {args.width}, segment {args.segment_len}, {args.max_new_tokens} new tokens per leaf"
    )
    native_op()  # the CPU cascade kernel is built on a machine's first use: not in the timing
    start = time.perf_counter()
    trees = rollout.sample_tree(
        prompts,
        args.depth,
        args.width,
        model=model,
        segment_len=args.segment_len,
        max_new_tokens=args.max_new_tokens,
        eos_token_id=[],
        seed=0,
    )
    ours = time.perf_counter() - start
    tree = trees[0]
    print("\nfirst tree (the prompt, then each node's segment):")
    print("\n".join(tree.summary().splitlines()[:12]) + "\n  ...")
    s = tree.stats
    print(
        f"leaves {len(tree.leaves())}, unique tokens {s.unique_tokens}, tokens forwarded "
        f"{s.tokens_forwarded} == tokens with KV {s.kv_tokens} (all but each leaf's last), "
        f"peak KV {s.peak_kv_bytes / 2**20:.1f} MiB, {s.forward_passes} steps"
    )
    leaves = len(tree.leaves())
    start = time.perf_counter()
    prefill_expand_decode(model, prompts, leaves, args.max_new_tokens)
    baseline = time.perf_counter() - start
    print(
        f"\nsample_tree: {ours:.2f} s; prefill once + expanded cache + per-leaf decode: "
        f"{baseline:.2f} s; speed ratio {baseline / ours:.1f}x (this machine, CPU)"
    )


if __name__ == "__main__":
    main()
