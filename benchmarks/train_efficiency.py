"""Flat vs tree RL from the same start: reward against policy cost and wall seconds.

`--task text` (default): flat GRPO vs tree-GRPO on the toy sorting task (configs/toy_grpo.yaml,
configs/toy_tree_grpo.yaml); cost = policy-forward tokens, the sampler's plus the packed training
forward of each update. `--task flow`: flat Flow-GRPO vs Dynamic-TreeRPO on the digits model
(configs/digits_flow_grpo.yaml, configs/digits_tree.yaml); cost = NFE, the sampler's transformer
evaluations per latent plus one per trained SDE step and update. Both runs of a task see the same
prompts per step and differ only in what their configs set. Rewards are noisy per step, so curves
are smoothed with a trailing mean over `--window` steps; the flat run's final reward is its last
smoothed value, and the headline is the fraction of the flat run's cost the tree run needs to first
reach it (goal <= 0.6). Because that headline depends on how long the flat run goes on after it
saturates, the summary also gives both runs' cost to first reach a fixed level: 90% of the way
from the shared start to the flat run's final reward.

The tree run is cost-matched: it goes on past the flat run's step count (up to 3x) until it has
spent what the flat run of the same seed spent (within one step), so a tree that is cheaper per
step is not cut short (`--same-steps` gives both the same step count). Seeds are averaged step by
step over the steps every seed ran, so the mean tree curve ends at its shortest seed's run, a
step or two short of the flat run's cost: a cut that can only count against the tree.

`--small-group N` (text default 4) adds a third run: the flat config with groups of N, cost-matched
the same way. A tree that costs less per step than flat GRPO must also beat this cheaper flat run,
or its saving is only that of sampling fewer completions.

`--seeds N` repeats the runs with seeds 0 .. N-1 (prompts, sampling and the toy policy's pretraining
all follow the seed) and compares the mean curves, since one seed's curve moves by a few hundredths
from run to run; the summary also gives each ratio's median, min and max over the seeds (each seed's
run against the flat run of the same seed), to show how far the noise reaches (on the toy
task, seeds 0-4 gave the tree's ratio as 0.56 and seeds 0-9 as 0.67; the default 10 seeds x 3 runs
take about 11 minutes on a 2-core CPU).
`--flat KEY=VALUE` / `--tree KEY=VALUE` (repeatable) override one side's config (`--flat` also
applies to the small-group run), to compare other tree shapes or estimators from the same start.

    python benchmarks/train_efficiency.py [--task flow] [--seeds 3] [--small-group 4]
                                          [--tree rollout.width=[4,2]]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainers.config import load_config  # noqa: E402
from trainers.train import train  # noqa: E402

TASKS = {
    "text": {
        "runs": {"flat": "toy_grpo", "tree": "toy_tree_grpo"},
        "names": {"flat": "flat GRPO", "tree": "tree-GRPO"},
        "cost": "forward_tokens_total",
        "unit": "policy-forward tokens",
        "title": "toy digit sorting",
        "defaults": {"steps": 150, "prompts": 16, "window": 20, "seeds": 10, "small_group": 4},
        "out": "train_efficiency",
    },
    "flow": {
        "runs": {"flat": "digits_flow_grpo", "tree": "digits_tree"},
        "names": {"flat": "flat Flow-GRPO", "tree": "tree (Dynamic-TreeRPO)"},
        "cost": "nfe_total",
        "unit": "NFE (sampling + training)",
        "title": "digits flow model",
        "defaults": {"steps": 80, "prompts": 16, "window": 10, "seeds": 1, "small_group": 0},
        "out": "train_efficiency_flow",
    },
}


def smooth(xs: list[float], window: int) -> list[float]:
    return [
        sum(xs[max(0, i - window + 1) : i + 1]) / len(xs[max(0, i - window + 1) : i + 1])
        for i in range(len(xs))
    ]


def run_one(
    preset: str,
    label: str,
    steps: int,
    prompts: int,
    seed: int,
    cost_key: str,
    overrides: list[str],
    max_cost: float | None = None,
) -> dict[str, list[float]]:
    """One run's curves; with `max_cost` it stops once its cumulative cost reaches that."""
    cfg = load_config(
        ROOT / "configs" / f"{preset}.yaml",
        [
            f"train.steps={steps}",
            f"train.prompts_per_step={prompts}",
            f"train.seed={seed}",
            "checkpoint.dir=",
            "log.wandb=false",
            "log.progress=false",
            f"output_dir={ROOT / 'results' / 'train_efficiency' / label}",
            *overrides,
        ],
    )
    start = time.perf_counter()
    until = None if max_cost is None else (lambda m: m[cost_key] >= max_cost)
    history = train(cfg, use_wandb=False, until=until).history
    print(
        f"{label} seed {seed}: {len(history)} steps in {time.perf_counter() - start:.1f} s",
        file=sys.stderr,
    )
    return {
        "reward": [h["reward_mean"] for h in history],
        "cost": [h[cost_key] for h in history],
        "seconds": [h["seconds_total"] for h in history],
    }


def mean_run(runs: list[dict[str, list[float]]]) -> dict[str, list[float]]:
    """Step-wise mean of several seeds' curves, over the steps every run has."""
    return {
        key: [sum(values) / len(values) for values in zip(*(r[key] for r in runs), strict=False)]
        for key in runs[0]
    }


def first_reach(curve: list[float], xs: list[float], target: float) -> float | None:
    return next((x for r, x in zip(curve, xs, strict=True) if r >= target), None)


def reach(
    flat: dict[str, list[float]], other: dict[str, list[float]], window: int
) -> dict[str, float | None]:
    """How much of `flat`'s cost `other` needs to first reach `flat`'s final smoothed reward, and
    to first reach the 90% level (90% of the way from the shared start to that reward)."""
    target = smooth(flat["reward"], window)[-1]
    other_smoothed, flat_smoothed = smooth(other["reward"], window), smooth(flat["reward"], window)
    cost = first_reach(other_smoothed, other["cost"], target)
    seconds = first_reach(other_smoothed, other["seconds"], target)
    start = min(flat["reward"][0], other["reward"][0])
    level = start + 0.9 * (target - start)
    flat_level = first_reach(flat_smoothed, flat["cost"], level)
    other_level = first_reach(other_smoothed, other["cost"], level)
    return {
        "final_reward": other_smoothed[-1],
        "cost_to_reach": cost,
        "seconds_to_reach": seconds,
        "cost_ratio": cost / flat["cost"][-1] if cost is not None else None,
        "seconds_ratio": seconds / flat["seconds"][-1] if seconds is not None else None,
        "level_90": level,
        "flat_cost_to_level_90": flat_level,
        "cost_to_level_90": other_level,
        "cost_ratio_at_level_90": (
            other_level / flat_level if flat_level is not None and other_level is not None else None
        ),
    }


def spread(values: list[float | None]) -> dict[str, float | int | None]:
    """Median, min and max of the per-seed ratios that exist, and how many seeds never got there."""
    got = sorted(v for v in values if v is not None)
    if not got:
        return {"median": None, "min": None, "max": None, "not_reached": len(values)}
    mid = len(got) // 2
    median = got[mid] if len(got) % 2 else (got[mid - 1] + got[mid]) / 2
    return {"median": median, "min": got[0], "max": got[-1], "not_reached": len(values) - len(got)}


def summarize(
    runs: dict[str, dict[str, list[float]]],
    per_seed: dict[str, list[dict[str, list[float]]]],
    window: int,
) -> dict[str, Any]:
    """The headline (mean curves) for every run against flat, with the per-seed spread."""
    flat = runs["flat"]
    for run in runs.values():
        run["reward_smoothed"] = smooth(run["reward"], window)
    summary: dict[str, Any] = {
        "flat_final_reward": flat["reward_smoothed"][-1],
        "flat_cost": flat["cost"][-1],
        "flat_seconds": flat["seconds"][-1],
        "goal_cost_ratio": 0.6,
    }
    for key in runs:
        if key == "flat":
            continue
        result = reach(flat, runs[key], window)
        seeds = [reach(f, o, window) for f, o in zip(per_seed["flat"], per_seed[key], strict=True)]
        result["per_seed_cost_ratio"] = spread([r["cost_ratio"] for r in seeds])
        result["per_seed_cost_ratio_at_level_90"] = spread(
            [r["cost_ratio_at_level_90"] for r in seeds]
        )
        summary[key] = result
    tree = summary["tree"]
    summary["goal_met"] = tree["cost_ratio"] is not None and tree["cost_ratio"] <= 0.6
    return summary


def plot(
    runs: dict[str, dict[str, list[float]]], summary: dict, names: dict, task: dict, seeds: int,
    path: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, run in runs.items():
        for ax, x in zip(axes, ("cost", "seconds"), strict=True):
            ax.plot(run[x], run["reward"], alpha=0.25, lw=0.8)
            color = ax.lines[-1].get_color()
            ax.plot(run[x], run["reward_smoothed"], lw=2, label=names[key], color=color)
    for ax, label in zip(axes, (task["unit"], "wall seconds"), strict=True):
        ax.axhline(
            summary["flat_final_reward"],
            ls="--",
            color="0.5",
            lw=1,
            label=f"{names['flat']} final reward",
        )
        ax.set_xlabel(label)
        ax.set_ylabel("mean reward")
        ax.grid(alpha=0.3)
    tree = summary["tree"]
    if tree["cost_to_reach"] is not None:
        axes[0].axvline(tree["cost_to_reach"], ls=":", color="k", lw=1)
    axes[0].legend(loc="lower right")
    ratio = tree["cost_ratio"]
    reached = (
        f"reaches {names['flat']}'s final reward with {ratio:.0%} of its {task['unit']}"
        if ratio is not None
        else f"does not reach {names['flat']}'s final reward within its run"
    )
    seeds_note = f" (mean of {seeds} seeds)" if seeds > 1 else ""
    fig.suptitle(f"{task['title']}: {names['tree']} {reached}{seeds_note}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description="flat vs tree RL from the same start")
    parser.add_argument("--task", choices=sorted(TASKS), default="text")
    parser.add_argument("--steps", type=int, help="default: 150 (text), 80 (flow)")
    parser.add_argument("--prompts", type=int, help="prompts per step; default 16")
    parser.add_argument("--window", type=int, help="smoothing steps; default 20 (text), 10 (flow)")
    parser.add_argument("--seeds", type=int, help="seeds 0 .. N-1, curves averaged; default 10 "
                        "(text), 1 (flow)")
    parser.add_argument("--flat", action="append", default=[], metavar="KEY=VALUE",
                        help="override the flat run's config (repeatable)")
    parser.add_argument("--tree", action="append", default=[], metavar="KEY=VALUE",
                        help="override the tree run's config (repeatable)")
    parser.add_argument("--small-group", type=int, metavar="N",
                        help="also run the flat config with groups of N, cost-matched like the "
                        "tree (0 = off); default 4 (text), 0 (flow)")
    parser.add_argument("--same-steps", action="store_true",
                        help="stop the tree run at the flat run's step count, not its cost")
    parser.add_argument("--out", help="output path without suffix; default results/<name>")
    args = parser.parse_args()
    task = TASKS[args.task]
    steps, prompts, window, seeds, small = (
        getattr(args, k) if getattr(args, k) is not None else task["defaults"][k]
        for k in ("steps", "prompts", "window", "seeds", "small_group")
    )
    if seeds < 1:
        parser.error("--seeds must be >= 1")
    if small < 0 or small == 1:
        parser.error("--small-group must be 0 (off) or >= 2: GRPO needs a group")
    torch.set_num_threads(1)
    flat_preset, tree_preset = task["runs"]["flat"], task["runs"]["tree"]
    # key -> (preset, output label, overrides); every run after the flat one is cost-matched
    plan = {"flat": (flat_preset, flat_preset, args.flat),
            "tree": (tree_preset, tree_preset, args.tree)}
    names = dict(task["names"])
    if small:
        plan["small"] = (flat_preset, f"{flat_preset}_group{small}",
                         [*args.flat, f"rollout.width={small}"])
        names["small"] = f"{names['flat']}, groups of {small}"
    per_seed: dict[str, list[dict[str, list[float]]]] = {key: [] for key in plan}
    for seed in range(seeds):
        flat = None
        for key, (preset, label, overrides) in plan.items():
            matched = flat is not None and not args.same_steps
            budget = flat["cost"][-1] if matched else None
            run = run_one(preset, label, 3 * steps if matched else steps, prompts, seed,
                          task["cost"], overrides, budget)
            flat = run if flat is None else flat
            per_seed[key].append(run)
    runs = {key: mean_run(seed_runs) for key, seed_runs in per_seed.items()}
    summary = summarize(runs, per_seed, window)
    out = Path(args.out or ROOT / "results" / task["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "task": args.task,
        "steps": steps,
        "prompts_per_step": prompts,
        "window": window,
        "seeds": seeds,
        "configs": task["runs"],
        "overrides": {key: overrides for key, (_, _, overrides) in plan.items()},
        "names": names,
        "tree_run": "same steps" if args.same_steps else "cost-matched (up to 3x the steps)",
        "cost_unit": task["unit"],
        "torch_threads": 1,
    }
    out.with_suffix(".json").write_text(
        json.dumps(
            {"summary": summary, "settings": meta, "runs": runs, "per_seed": per_seed}, indent=1
        )
    )
    plot(runs, summary, names, task, seeds, out.with_suffix(".png"))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
