"""Hybrid-model trees: the cascade engine (shared attention KV, state slots) against the native
path.

Workload (the defaults): a Jamba built from a config (hidden 256, 4 layers: 3 Mamba and 1
attention, vocab 4096), 2 prompts of 512 tokens, depth 3, width 4, segment 16, leaves to 48 new
tokens: 64 leaves per prompt, EOS disabled. Both paths sample the same tokens from one seed
(checked: token for token and log-prob for log-prob, except at a near-tie of a draw, see
`parted`); the native path is the model's own cache, one call per branch and step, copied at
each fork: what a transformers user gets without the cascade.

Both sides run in one process on the same model, interleaved after a warm-up, best of `--runs`.
Prints seconds, tokens/s and the ratio, and writes JSON.
Usage: python benchmarks/hybrid_tree.py [--quick] [--runs 3] [--out results/hybrid_tree.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, JambaConfig

import rollout

MODEL = dict(
    vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=2, attn_layer_period=4, attn_layer_offset=3,
    expert_layer_period=100, expert_layer_offset=99, num_experts=1, mamba_d_state=16,
    mamba_d_conv=4, mamba_expand=2, max_position_embeddings=4096, pad_token_id=0,
)  # fmt: skip


def build(hidden: int) -> torch.nn.Module:
    config = JambaConfig(**{**MODEL, "hidden_size": hidden, "intermediate_size": 2 * hidden})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def run(model, path: str, prompts, kw) -> tuple[float, list]:
    start = time.perf_counter()
    trees = rollout.Engine(model, path=path).sample_tree(prompts, **kw)
    return time.perf_counter() - start, trees


def parted(a: list, b: list, tol: float = 1e-4) -> int:
    """How many trajectories of two runs' trees (same seed, same shape) part at a near-tie.

    The paths sum the same products in other orders (packed linear layers, cascade attention), so
    their log-probs differ by ~1e-6 and a draw whose uniform falls that close to a boundary of the
    inverse CDF (over token ids in order) picks the neighbouring token on one path; from there
    the subtrees differ. Everything else is checked: equal tokens and log-probs within `tol` up
    to a trajectory's first difference, which must be such a neighbour."""
    n = 0
    for tree_a, tree_b in zip(a, b, strict=True):
        for x, y in zip(tree_a.trajectories(), tree_b.trajectories(), strict=True):
            for i, (u, v) in enumerate(zip(x.completion_ids, y.completion_ids, strict=True)):
                if u != v:
                    assert abs(u - v) == 1, f"the paths sampled {u} and {v}: not a near-tie"
                    n += 1
                    break
                gap = abs(float(x.logprobs[i]) - float(y.logprobs[i]))
                assert gap <= tol, f"log-probs {gap:.2e} apart on the same tokens"
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small workload for a smoke run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default="results/hybrid_tree.json")
    args = ap.parse_args()
    hidden, prompt_len, new = (64, 32, 12) if args.quick else (256, 512, 48)
    model = build(hidden)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 4096, (prompt_len,), generator=gen).tolist() for _ in range(2)]
    seg = new // 3
    kw = dict(depth=3, width=4, segment_len=seg, max_new_tokens=new, eos_token_id=[], seed=0)
    with torch.inference_mode():
        run(model, "cascade", prompts, kw)  # warm-up: same shapes, pool and probe made
        run(model, "native", prompts, kw)
        best = {"cascade": float("inf"), "native": float("inf")}
        trees = {}
        for _ in range(args.runs):
            for path in best:
                seconds, trees[path] = run(model, path, prompts, kw)
                best[path] = min(best[path], seconds)
    near_ties = parted(trees["cascade"], trees["native"])
    tokens = sum(len(t.completion_ids) for tr in trees["cascade"] for t in tr.trajectories())
    result = {
        "workload": dict(hidden=hidden, prompt_len=prompt_len, prompts=2, **kw),
        "tokens": tokens,
        "seconds": best,
        "tokens_per_s": {p: tokens / s for p, s in best.items()},
        "cascade_speedup": best["native"] / best["cascade"],
        "trajectories_parted_at_near_ties": near_ties,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor(),
    }
    print(f"{'path':8s} {'s':>8s} {'tokens/s':>10s}")
    for p, s in best.items():
        print(f"{p:8s} {s:8.2f} {tokens / s:10.0f}")
    print(f"cascade is {result['cascade_speedup']:.2f}x the native path ({tokens} tokens; "
          f"{near_ties} trajectories parted at a near-tie of a draw)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
