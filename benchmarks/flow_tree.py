"""Flow-matching tree sampling against independent sampling of the same number of leaves.

    python benchmarks/flow_tree.py [--threads 1] [--repeats 5]

Independent sampling (Flow-GRPO / DanceGRPO style) gives each leaf its own full trajectory: the
prompts repeated `leaves` times, depth 1, width 1, the same SDE window. The tree shares the steps
before the window and each node's steps before it forks. Both run through the same batched sampler
(one transformer call per step for all live latents), so the comparison isolates the shared
steps. Reported per setting: NFE per prompt, wall time (median of repeats), the NFE ratio
(independent / tree), the wall-time ratio (median over back-to-back pairs) and wall ratio / NFE
ratio (goal >= 0.9), and the same for process CPU time, which other work on a shared CPU
disturbs less.
Writes results/flow_tree.json and results/flow_tree_grid.png (one digits tree, rows = branches).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from rollout.flow import sample_flow_tree
from rollout.flow.classifier import DigitReward, leaf_image
from rollout.flow.digits import digit_prompts, load_digits_pipeline
from rollout.flow.tiny_pipelines import build_tiny_sd3_pipeline
from rollout.rewards import score_trees

RESULTS = Path(__file__).resolve().parent.parent / "results"


def _time_pairs(first, second, repeats: int) -> tuple[list[tuple[float, ...]], list, list]:
    """Run the two samplers back to back `repeats` times (after a warm-up of each); per run keep
    (wall a, wall b, cpu a, cpu b). Pairs run seconds apart, so their ratio cancels most of the
    drift of a CPU shared with other work; the caller takes medians."""
    out_a, out_b = first(), second()
    pairs = []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        out_a = first()
        w1, c1 = time.perf_counter(), time.process_time()
        out_b = second()
        w2, c2 = time.perf_counter(), time.process_time()
        pairs.append((w1 - w0, w2 - w1, c1 - c0, c2 - c1))
    return pairs, out_a, out_b


def compare(name: str, pipe, prompts: list[str], depth: int, width: int, steps: int,
            window: tuple[int, int], guidance: float, repeats: int) -> dict:
    leaves = width**depth
    common = dict(num_inference_steps=steps, guidance_scale=guidance)

    def tree():
        return sample_flow_tree(prompts, depth, width, pipe, sde_window=window, **common)

    def independent():
        repeated = [p for p in prompts for _ in range(leaves)]
        return sample_flow_tree(repeated, 1, 1, pipe, sde_window=window, noise_levels=[1.0],
                                **common)

    pairs, trees, flat = _time_pairs(tree, independent, repeats)
    tree_s = statistics.median(p[0] for p in pairs)
    ind_s = statistics.median(p[1] for p in pairs)
    wall_ratio = statistics.median(p[1] / p[0] for p in pairs)
    cpu_ratio = statistics.median(p[3] / p[2] for p in pairs)
    tree_nfe = sum(t.stats.nfe for t in trees) / len(prompts)
    ind_nfe = sum(t.stats.nfe for t in flat) / len(prompts)
    nfe_ratio = ind_nfe / tree_nfe
    return dict(model=name, prompts=len(prompts), depth=depth, width=width, leaves=leaves,
                steps=steps, window=list(window), guidance=guidance, tree_nfe=tree_nfe,
                independent_nfe=ind_nfe, tree_s=tree_s, independent_s=ind_s,
                nfe_ratio=nfe_ratio, wall_ratio=wall_ratio, wall_over_nfe=wall_ratio / nfe_ratio,
                cpu_ratio=cpu_ratio, cpu_over_nfe=cpu_ratio / nfe_ratio)


def save_grid(path: Path) -> None:
    """One digits tree (depth 2, width 4): row r holds the leaves of level-1 branch r."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pipe = load_digits_pipeline()
    tree = sample_flow_tree(["a handwritten 5"], 2, 4, pipe, num_inference_steps=20,
                            sde_window=(0, 8), noise_levels=[1.0, 0.6], seed=7)[0]
    score_trees([tree], DigitReward(), decode=leaf_image)
    branches = tree.root.children
    fig, axes = plt.subplots(len(branches), len(branches[0].children), figsize=(6, 6.6))
    for r, branch in enumerate(branches):
        for c, leaf in enumerate(branch.children):
            ax = axes[r][c]
            ax.imshow(leaf.meta["image"][0].numpy(), cmap="gray_r", vmin=0, vmax=1)
            ax.set_title(f"p(5)={leaf.reward:.2f}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(f"branch {r}", fontsize=9)
    fig.suptitle("'a handwritten 5': rows = level-1 branches, columns = their children")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    digits = load_digits_pipeline()
    prompts = digit_prompts(range(8))
    for depth, width, window in ((2, 4, (2, 8)), (2, 4, (8, 14)), (3, 2, (4, 10))):
        rows.append(compare("digits", digits, prompts, depth, width, 20, window, 2.0,
                            args.repeats))
    sd3 = build_tiny_sd3_pipeline()
    sd3_prompts = [f"a photo of object {k}" for k in range(4)]
    for depth, width, window in ((2, 4, (1, 5)), (2, 4, (4, 8)), (3, 2, (2, 5))):
        rows.append(compare("tiny-sd3", sd3, sd3_prompts, depth, width, 10, window, 4.0,
                            args.repeats))
    header = (f"{'model':9} {'d':>2} {'w':>2} {'leaves':>6} {'steps':>5} {'window':>7} "
              f"{'NFE tree':>8} {'NFE ind':>8} {'tree s':>7} {'ind s':>7} {'NFE x':>6} "
              f"{'wall x':>6} {'wall/NFE':>8} {'cpu/NFE':>7}")
    print(f"threads={args.threads}, medians of {args.repeats} back-to-back pairs; NFE per prompt")
    print(header)
    for r in rows:
        print(f"{r['model']:9} {r['depth']:>2} {r['width']:>2} {r['leaves']:>6} {r['steps']:>5} "
              f"{str(tuple(r['window'])):>7} {r['tree_nfe']:>8.0f} {r['independent_nfe']:>8.0f} "
              f"{r['tree_s']:>7.3f} {r['independent_s']:>7.3f} {r['nfe_ratio']:>6.2f} "
              f"{r['wall_ratio']:>6.2f} {r['wall_over_nfe']:>8.2f} {r['cpu_over_nfe']:>7.2f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "flow_tree.json").write_text(json.dumps(
        dict(threads=args.threads, repeats=args.repeats, rows=rows), indent=2))
    save_grid(RESULTS / "flow_tree_grid.png")
    print(f"wrote {RESULTS / 'flow_tree.json'} and {RESULTS / 'flow_tree_grid.png'}")


if __name__ == "__main__":
    main()
