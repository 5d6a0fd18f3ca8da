"""Flat GRPO vs tree-GRPO on the toy task: reward against policy-forward tokens and wall seconds.

Both runs start from the same pretrained toy policy and see the same prompts per step; they differ
only in the rollout shape (a flat group of 8 vs a [2, 4] tree) and the advantage estimator (leaf
GRPO vs TreeRPO's sibling-relative), as in configs/toy_grpo.yaml and configs/toy_tree_grpo.yaml.
Policy-forward tokens count every token the policy forwards: the sampler's (`TreeStats`) plus the
packed training forward of each update. Rewards are noisy per step, so both curves are smoothed
with a trailing mean over `--window` steps; flat GRPO's final reward is its last smoothed value,
and the headline is the fraction of flat GRPO's tokens tree-GRPO needs to first reach it.

    python benchmarks/train_efficiency.py            # writes results/train_efficiency.{json,png}
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainers.config import load_config  # noqa: E402
from trainers.train import train  # noqa: E402

RUNS = {"flat GRPO": "toy_grpo", "tree-GRPO": "toy_tree_grpo"}


def smooth(xs: list[float], window: int) -> list[float]:
    return [
        sum(xs[max(0, i - window + 1) : i + 1]) / len(xs[max(0, i - window + 1) : i + 1])
        for i in range(len(xs))
    ]


def run_one(preset: str, steps: int, prompts: int, seed: int) -> dict[str, list[float]]:
    cfg = load_config(
        ROOT / "configs" / f"{preset}.yaml",
        [
            f"train.steps={steps}",
            f"train.prompts_per_step={prompts}",
            f"train.seed={seed}",
            "checkpoint.dir=",
            "log.wandb=false",
            "log.progress=false",
            f"output_dir={ROOT / 'results' / 'train_efficiency' / preset}",
        ],
    )
    start = time.perf_counter()
    history = train(cfg, use_wandb=False).history
    print(f"{preset}: {steps} steps in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return {
        "reward": [h["reward_mean"] for h in history],
        "forward_tokens": [h["forward_tokens_total"] for h in history],
        "seconds": [h["seconds_total"] for h in history],
        "forwarded_per_unique": [h["forwarded_per_unique"] for h in history],
    }


def first_reach(curve: list[float], xs: list[float], target: float) -> float | None:
    return next((x for r, x in zip(curve, xs, strict=True) if r >= target), None)


def summarize(runs: dict[str, dict[str, list[float]]], window: int) -> dict[str, float | None]:
    flat, tree = runs["flat GRPO"], runs["tree-GRPO"]
    for run in runs.values():
        run["reward_smoothed"] = smooth(run["reward"], window)
    target = flat["reward_smoothed"][-1]
    tokens = first_reach(tree["reward_smoothed"], tree["forward_tokens"], target)
    seconds = first_reach(tree["reward_smoothed"], tree["seconds"], target)
    ratio = tokens / flat["forward_tokens"][-1] if tokens is not None else None
    return {
        "flat_final_reward": target,
        "flat_forward_tokens": flat["forward_tokens"][-1],
        "flat_seconds": flat["seconds"][-1],
        "tree_final_reward": tree["reward_smoothed"][-1],
        "tree_forward_tokens_to_reach": tokens,
        "tree_seconds_to_reach": seconds,
        "token_ratio": ratio,
        "seconds_ratio": seconds / flat["seconds"][-1] if seconds is not None else None,
        "goal_token_ratio": 0.6,
        "goal_met": ratio is not None and ratio <= 0.6,
    }


def plot(runs: dict[str, dict[str, list[float]]], summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, run in runs.items():
        for ax, key in zip(axes, ("forward_tokens", "seconds"), strict=True):
            ax.plot(run[key], run["reward"], alpha=0.25, lw=0.8)
            ax.plot(
                run[key], run["reward_smoothed"], lw=2, label=name, color=ax.lines[-1].get_color()
            )
    for ax, label in zip(axes, ("policy-forward tokens", "wall seconds"), strict=True):
        ax.axhline(
            summary["flat_final_reward"], ls="--", color="0.5", lw=1, label="flat GRPO final reward"
        )
        ax.set_xlabel(label)
        ax.set_ylabel("mean reward")
        ax.grid(alpha=0.3)
    if summary["tree_forward_tokens_to_reach"] is not None:
        axes[0].axvline(summary["tree_forward_tokens_to_reach"], ls=":", color="k", lw=1)
    axes[0].legend(loc="lower right")
    ratio = summary["token_ratio"]
    fig.suptitle(
        "toy digit sorting: tree-GRPO reaches flat GRPO's final reward with "
        + (f"{ratio:.0%} of its forward tokens" if ratio is not None else "-- (not reached)")
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description="flat GRPO vs tree-GRPO on the toy task")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--window", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "results" / "train_efficiency"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = {
        name: run_one(preset, args.steps, args.prompts, args.seed) for name, preset in RUNS.items()
    }
    summary = summarize(runs, args.window)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "steps": args.steps,
        "prompts_per_step": args.prompts,
        "window": args.window,
        "seed": args.seed,
        "configs": RUNS,
        "torch_threads": 1,
    }
    out.with_suffix(".json").write_text(
        json.dumps({"summary": summary, "settings": meta, "runs": runs}, indent=1)
    )
    plot(runs, summary, out.with_suffix(".png"))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
