"""Flat GRPO vs tree-GRPO for agents, from the same start: reward against environment calls,
sampled tokens and policy-forward tokens.

Three runs on the toy calculator task (trainers/agent/toy_task.py), one config each:
- flat: configs/toy_agent_grpo.yaml, 8 independent episodes per prompt;
- tree: configs/toy_agent_tree.yaml, per-turn forks (Tree-GRPO, arXiv 2509.21240), 2 x 2 x 2;
- arpo: configs/toy_agent_arpo.yaml, forks at the first uncertain token after a tool result
  (ARPO, arXiv 2507.19849).
All see the same prompts per step, start from the same pretrained policy and differ only in what
their configs set. Costs, cumulative over the run: environment calls; tokens the policy sampled
(each once, however many episodes share it); policy-forward tokens (the sampler's forwarded
tokens plus the packed training forward of each update). The tree runs are cost-matched: they go
on past the flat run's step count (up to 3x) until they have spent its policy-forward tokens, so
a tree that is cheaper per step is not cut short. Rewards are noisy per step: curves are smoothed
with a trailing mean over `--window` steps, the flat run's final reward is its last smoothed
value, and each headline is the fraction of the flat run's cost a tree run needs to first reach it
(goals: <= 50% of the environment calls, <= 60% of the policy-forward tokens); the summary also
gives the fraction at the 90% level (90% of the way from the shared start to that reward). Seeds
are averaged step by step; the summary gives each ratio's median, min and max over seeds (each
seed against the flat run of the same seed).

    python benchmarks/agent_efficiency.py [--seeds 3] [--steps 60] [--prompts 8]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from itertools import accumulate
from pathlib import Path
from typing import Any

import torch
from train_efficiency import first_reach, mean_run, smooth, spread

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainers.config import load_config  # noqa: E402
from trainers.train import train  # noqa: E402

RUNS = {"flat": "toy_agent_grpo", "tree": "toy_agent_tree", "arpo": "toy_agent_arpo"}
NAMES = {"flat": "flat GRPO", "tree": "tree-GRPO (per turn)", "arpo": "tree-GRPO (ARPO entropy)"}
COSTS = {  # curve key -> (axis label, goal ratio or None)
    "env_calls": ("environment calls", 0.5),
    "sampled_tokens": ("sampled tokens", None),
    "forward_tokens": ("policy-forward tokens", 0.6),
}


def run_one(
    key: str, steps: int, prompts: int, seed: int, overrides: list[str], out: Path,
    max_tokens: float | None = None,
) -> dict[str, list[float]]:
    """One run's curves; with `max_tokens` it stops once its policy-forward tokens reach that."""
    cfg = load_config(
        ROOT / "configs" / f"{RUNS[key]}.yaml",
        [
            f"train.steps={steps}", f"train.prompts_per_step={prompts}", f"train.seed={seed}",
            "checkpoint.dir=", "log.wandb=false", "log.progress=false",
            f"output_dir={out.parent / (out.name + '_runs') / key}", *overrides,
        ],
    )
    start = time.perf_counter()
    until = None if max_tokens is None else (lambda m: m["forward_tokens_total"] >= max_tokens)
    history = train(cfg, use_wandb=False, until=until).history
    print(f"{key} seed {seed}: {len(history)} steps in {time.perf_counter() - start:.1f} s",
          file=sys.stderr)
    return {
        "reward": [h["reward_mean"] for h in history],
        "env_calls": list(accumulate(h["env_calls"] for h in history)),
        "sampled_tokens": list(accumulate(h["sampled_tokens"] for h in history)),
        "forward_tokens": [h["forward_tokens_total"] for h in history],
        "seconds": [h["seconds_total"] for h in history],
        "turns_per_episode": [h["turns_per_episode"] for h in history],
    }


def reach(flat: dict[str, list[float]], other: dict[str, list[float]], window: int) -> dict:
    """Per cost: how much of the flat run's total `other` spends to first reach the flat run's
    final smoothed reward, and how much of what the flat run spent to first get 90% of the way
    there from the shared start (None: it never does). The second is less at the mercy of where
    the flat run's noisy plateau happens to end."""
    flat_curve, curve = smooth(flat["reward"], window), smooth(other["reward"], window)
    target = flat_curve[-1]
    start = min(flat["reward"][0], other["reward"][0])
    level = start + 0.9 * (target - start)
    out: dict[str, Any] = {"final_reward": curve[-1], "level_90": level}
    for cost in COSTS:
        spent = first_reach(curve, other[cost], target)
        out[f"{cost}_to_reach"] = spent
        out[f"{cost}_ratio"] = spent / flat[cost][-1] if spent is not None else None
        flat_level, other_level = (first_reach(c, r[cost], level)
                                   for c, r in ((flat_curve, flat), (curve, other)))
        out[f"{cost}_ratio_at_level_90"] = (
            other_level / flat_level if flat_level and other_level is not None else None
        )
    return out


def summarize(runs: dict, per_seed: dict, window: int) -> dict[str, Any]:
    flat = runs["flat"]
    for run in runs.values():
        run["reward_smoothed"] = smooth(run["reward"], window)
    summary: dict[str, Any] = {
        "flat_final_reward": flat["reward_smoothed"][-1],
        "start_reward": {k: r["reward"][0] for k, r in runs.items()},
        **{f"flat_{cost}": flat[cost][-1] for cost in COSTS},
        "goals": {cost: goal for cost, (_, goal) in COSTS.items() if goal is not None},
    }
    for key in runs:
        if key == "flat":
            continue
        result = reach(flat, runs[key], window)
        seeds = [reach(f, o, window) for f, o in zip(per_seed["flat"], per_seed[key], strict=True)]
        for cost in COSTS:
            for name in (f"{cost}_ratio", f"{cost}_ratio_at_level_90"):
                result[f"per_seed_{name}"] = spread([s[name] for s in seeds])
        result["goals_met"] = all(
            result[f"{cost}_ratio"] is not None and result[f"{cost}_ratio"] <= goal
            for cost, goal in summary["goals"].items()
        )
        summary[key] = result
    return summary


def plot(runs: dict, summary: dict, seeds: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(COSTS), figsize=(5 * len(COSTS), 4))
    for ax, (cost, (label, goal)) in zip(axes, COSTS.items(), strict=True):
        for key, run in runs.items():
            ax.plot(run[cost], run["reward"], alpha=0.25, lw=0.8)
            ax.plot(run[cost], run["reward_smoothed"], lw=2, label=NAMES[key],
                    color=ax.lines[-1].get_color())
        ax.axhline(summary["flat_final_reward"], ls="--", color="0.5", lw=1,
                   label="flat GRPO's final reward")
        if goal is not None:
            ax.axvline(goal * summary[f"flat_{cost}"], ls=":", color="k", lw=1,
                       label=f"goal: {goal:.0%} of flat's")
        ax.set_xlabel(label)
        ax.set_ylabel("mean reward")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8)
    key = "tree" if "tree" in summary else next(k for k in runs if k != "flat")
    calls, tokens = summary[key]["env_calls_ratio"], summary[key]["forward_tokens_ratio"]
    head = (
        f"{NAMES[key]} reaches flat GRPO's final reward with {calls:.0%} of its environment "
        f"calls and {tokens:.0%} of its policy-forward tokens"
        if calls is not None and tokens is not None
        else f"{NAMES[key]} does not reach flat GRPO's final reward within its run"
    )
    seeds_note = f" (mean of {seeds} seeds)" if seeds > 1 else ""
    fig.suptitle(f"toy calculator agent: {head}{seeds_note}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description="flat vs tree RL for agents from the same start")
    parser.add_argument("--steps", type=int, default=60, help="flat run's steps")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--window", type=int, default=10, help="smoothing steps")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1, curves averaged")
    parser.add_argument("--runs", default="flat,tree,arpo", help="which runs (flat first)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override every run's config (repeatable)")
    parser.add_argument("--out", help="output path without suffix (results/agent_efficiency)")
    args = parser.parse_args()
    keys = args.runs.split(",")
    if keys[0] != "flat" or not set(keys) <= set(RUNS) or len(keys) < 2:
        parser.error(f"--runs: 'flat' first, then some of {sorted(set(RUNS) - {'flat'})}")
    if args.seeds < 1 or args.steps < 1:
        parser.error("--seeds and --steps must be >= 1")
    torch.set_num_threads(1)
    out = Path(args.out or ROOT / "results" / "agent_efficiency")
    out.parent.mkdir(parents=True, exist_ok=True)
    per_seed: dict[str, list[dict[str, list[float]]]] = {key: [] for key in keys}
    for seed in range(args.seeds):
        flat = run_one("flat", args.steps, args.prompts, seed, args.set, out)
        per_seed["flat"].append(flat)
        for key in keys[1:]:
            per_seed[key].append(run_one(key, 3 * args.steps, args.prompts, seed, args.set, out,
                                         flat["forward_tokens"][-1]))
    runs = {key: mean_run(seed_runs) for key, seed_runs in per_seed.items()}
    summary = summarize(runs, per_seed, args.window)
    settings = {"steps": args.steps, "prompts_per_step": args.prompts, "window": args.window,
                "seeds": args.seeds, "configs": {k: RUNS[k] for k in keys},
                "overrides": args.set, "torch_threads": 1,
                "tree_runs": "cost-matched on policy-forward tokens (up to 3x the steps)"}
    out.with_suffix(".json").write_text(json.dumps(
        {"summary": summary, "settings": settings, "runs": runs, "per_seed": per_seed}, indent=1))
    plot(runs, summary, args.seeds, out.with_suffix(".png"))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
