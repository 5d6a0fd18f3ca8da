"""Run logging: a thin wandb wrapper, a null logger, and a diagram of one rollout tree.

wandb runs offline when no API key is configured (`WANDB_MODE=offline` unless the user set a mode),
so a run never needs a network; `--no-wandb` and every non-main process get `NullLogger`, which
accepts the same calls and does nothing. Metrics are gathered in one dict per step and logged once.
The tree diagram places leaves left to right and each inner node above the middle of its children;
each node is coloured by its advantage and labelled with its reward (the mean over its leaves for
inner nodes) and advantage; agent tree nodes show their turns and their sampled and observed
tokens. Flow trees (leaves with `meta["image"]`) also log a grid of the tree's
leaf images, left to right as in the diagram, each titled with its reward.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

from trees import Node, Tree


class RunLogger(Protocol):
    directory: str  # where the logger writes its files ("" when it writes none)

    def log(self, metrics: dict[str, float], step: int) -> None: ...
    def log_tree(self, tree: Tree, step: int) -> None: ...
    def finish(self) -> None: ...


class NullLogger:
    """Accepts every logging call and does nothing (non-main processes, --no-wandb)."""

    directory = ""

    def log(self, metrics: dict[str, float], step: int) -> None:
        return None

    def log_tree(self, tree: Tree, step: int) -> None:
        return None

    def finish(self) -> None:
        return None


def _node_reward(node: Node) -> float | None:
    rewards = [leaf.reward for leaf in node.leaves()]
    return None if any(r is None for r in rewards) else sum(rewards) / len(rewards)


def _layout(tree: Tree) -> dict[int, tuple[float, float]]:
    """(x, y) per node id: leaves at 0, 1, 2, ... left to right; parents centred above."""
    xy: dict[int, tuple[float, float]] = {}
    leaves = iter(range(10**9))

    def place(node: Node) -> float:
        if node.is_leaf:
            x = float(next(leaves))
        else:
            xs = [place(c) for c in node.children]
            x = sum(xs) / len(xs)
        xy[node.id] = (x, -float(node.depth))
        return x

    place(tree.root)
    return xy


def _node_size(node: Node) -> str:
    """What a node holds: SDE steps (flow), tokens (text), or turns (agent trees: the turns that
    ended in it, its sampled tokens and the environment's)."""
    if node.steps:
        return f"{len(node.steps)} SDE"
    if node.sampled is None:
        return f"{len(node.tokens)} tok"
    turns, own = node.meta.get("env_calls", 0), sum(node.sampled)
    return f"{turns} turn{'s' * (turns != 1)}\n{own}+{len(node.tokens) - own} env tok"


def tree_figure(tree: Tree, title: str = "") -> Any:
    """A matplotlib figure of `tree`: edges, nodes coloured by advantage, reward/advantage text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xy = _layout(tree)
    nodes = list(tree.nodes())
    n_leaves = len(tree.leaves())
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * n_leaves), 1.6 * (tree.depth + 1)))
    for node in nodes:
        for child in node.children:
            (x0, y0), (x1, y1) = xy[node.id], xy[child.id]
            ax.plot([x0, x1], [y0, y1], color="0.6", lw=1, zorder=1)
    advs = [n.advantage or 0.0 for n in nodes]
    scale = max(1e-6, max(abs(a) for a in advs))
    ax.scatter(
        [xy[n.id][0] for n in nodes],
        [xy[n.id][1] for n in nodes],
        c=advs,
        cmap="coolwarm",
        vmin=-scale,
        vmax=scale,
        s=260,
        edgecolors="k",
        zorder=2,
    )
    for node in nodes:
        r = _node_reward(node)
        size = _node_size(node)
        text = "prompt" if node is tree.root else size
        text += f"\nr={r:.2f}" if r is not None else ""
        text += f"\nA={node.advantage:+.2f}" if node.advantage is not None else ""
        x, y = xy[node.id]
        ax.text(x, y - 0.18, text, ha="center", va="top", fontsize=7)
    ax.set_title(title or f"rollout tree (policy version {tree.policy_version})", fontsize=9)
    ax.set_ylim(-tree.depth - 0.9, 0.4)
    ax.axis("off")
    fig.tight_layout()
    return fig


def leaf_grid_figure(tree: Tree, title: str = "") -> Any:
    """A matplotlib figure of a flow tree's leaf images in one row, titled with their rewards."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    leaves = tree.leaves()
    fig, axes = plt.subplots(1, len(leaves), figsize=(1.3 * len(leaves), 1.7), squeeze=False)
    for ax, leaf in zip(axes[0], leaves, strict=True):
        image = leaf.meta["image"].float().clamp(0, 1)  # [C, H, W]
        grey = image.shape[0] == 1
        ax.imshow(image[0] if grey else image.permute(1, 2, 0), cmap="gray" if grey else None,
                  vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"r={leaf.reward:.2f}" if leaf.reward is not None else "", fontsize=7)
        ax.axis("off")
    fig.suptitle(title or str(tree.prompt), fontsize=8)
    fig.tight_layout()
    return fig


def is_flow_tree(tree: Tree) -> bool:
    return all("image" in leaf.meta for leaf in tree.leaves())


class WandbLogger:
    """wandb, offline unless a key or a mode is configured."""

    def __init__(self, project: str, name: str, config: dict[str, Any], directory: str) -> None:
        import wandb

        if not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE"):
            os.environ["WANDB_MODE"] = "offline"
        Path(directory).mkdir(parents=True, exist_ok=True)
        self._wandb = wandb
        self.run = wandb.init(project=project, name=name or None, config=config, dir=directory)
        self.directory = str(Path(self.run.dir).parent)  # the run's folder (wandb/<run>/)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_tree(self, tree: Tree, step: int) -> None:
        import matplotlib.pyplot as plt

        figures = {"tree": tree_figure(tree, f"step {step}")}
        if is_flow_tree(tree):
            figures["leaf_images"] = leaf_grid_figure(tree, f"step {step}: {tree.prompt}")
        self.run.log({k: self._wandb.Image(f) for k, f in figures.items()}, step=step)
        for fig in figures.values():
            plt.close(fig)

    def finish(self) -> None:
        self.run.finish()


def make_logger(
    enabled: bool, is_main: bool, project: str, name: str, config: dict[str, Any], directory: str
) -> RunLogger:
    """WandbLogger on the main process when enabled, else NullLogger."""
    if not (enabled and is_main):
        return NullLogger()
    return WandbLogger(project, name, config, directory)
