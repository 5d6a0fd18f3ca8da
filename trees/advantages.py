"""Advantages on rollout trees: pure estimators over scored trees, in a registry.

Every estimator reads leaf rewards (set by `rollout.score_trees`) and returns, per tree, a dict
`{node.id: advantage}` for every non-root node; nothing is mutated (`assign_advantages` writes the
values onto `Node.advantage` when a caller wants them there). A node's advantage applies to its own
segment's tokens once: shared tokens are never duplicated per leaf.

Choices where the papers leave room (each pinned by tests/test_advantages.py):
- std is the population std (divide by n), eps is added to the std, not the variance.
- leaf GRPO: an inner node takes the mean advantage of the leaves below it.
- TreeRPO: a node's value is the mean of its children's values (recursive), so an early-stopped
  branch weighs as much as a bushy one; a group of one sibling has advantage 0.
- TreeRL: the paper's form (leave-one-out centred leaf rewards, G(n) + L(n), divided by
  sqrt(|leaves(n)|) by default), then whitened over all completion tokens of the batch.
- TreePO: unweighted mean over depths of r_i - mean(G_d(i)) for d = 0 .. depth(parent(i)), then
  whitened over all leaves of the batch; inner nodes take the mean of their leaves.
- BranchGRPO: node reward = mean over its leaves; normalized over the nodes of the same depth of the
  same tree; 0 when that depth holds one node.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .tree import Node, Tree

NodeAdvantages = dict[int, float]


@dataclass(frozen=True)
class AdvantageOptions:
    """Knobs shared by the estimators. `eps` guards every std division."""

    eps: float = 1e-6
    treerl_sqrt_leaves: bool = True

    def __post_init__(self) -> None:
        if not self.eps > 0:
            raise ValueError(f"AdvantageOptions.eps must be > 0, got {self.eps}; use e.g. 1e-6")


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def _std(xs: Sequence[float]) -> float:
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def _normalized(xs: Sequence[float], eps: float) -> list[float]:
    """(x - mean) / (std + eps); all zeros for a group of one."""
    if len(xs) < 2:
        return [0.0 for _ in xs]
    m, s = _mean(xs), _std(xs)
    return [(x - m) / (s + eps) for x in xs]


def _reward(leaf: Node) -> float:
    if leaf.reward is None:
        raise ValueError(
            f"leaf node {leaf.id} has no reward; score the trees first (rollout.score_trees)"
        )
    return float(leaf.reward)


def _inner_from_leaves(tree: Tree, leaf_adv: dict[int, float]) -> NodeAdvantages:
    """Every non-root node gets the mean advantage of the leaves below it."""
    return {
        n.id: _mean([leaf_adv[leaf.id] for leaf in n.leaves()])
        for n in tree.nodes()
        if n is not tree.root
    }


def leaf_grpo(trees: Sequence[Tree], options: AdvantageOptions) -> list[NodeAdvantages]:
    """GRPO over all leaves of a prompt: A_l = (r_l - mean_tree r) / (std_tree r + eps).

    With depth 1 this is exactly flat GRPO with the tree's width as group size.
    """
    out = []
    for tree in trees:
        leaves = tree.leaves()
        adv = _normalized([_reward(leaf) for leaf in leaves], options.eps)
        out.append(
            _inner_from_leaves(tree, {leaf.id: a for leaf, a in zip(leaves, adv, strict=True)})
        )
    return out


def _children_value(node: Node, memo: dict[int, float]) -> float:
    """TreeRPO value: a leaf's reward, else the mean of its children's values."""
    if node.id not in memo:
        memo[node.id] = (
            _reward(node)
            if node.is_leaf
            else _mean([_children_value(c, memo) for c in node.children])
        )
    return memo[node.id]


def sibling_relative(trees: Sequence[Tree], options: AdvantageOptions) -> list[NodeAdvantages]:
    """TreeRPO: A(n) = (V(n) - mean_sib V) / (std_sib V + eps), V(n) = mean of children's V."""
    out = []
    for tree in trees:
        memo: dict[int, float] = {}
        adv: NodeAdvantages = {}
        for parent in tree.nodes():
            kids = parent.children
            values = [_children_value(c, memo) for c in kids]
            adv.update(
                {c.id: a for c, a in zip(kids, _normalized(values, options.eps), strict=True)}
            )
        out.append(adv)
    return out


def _whiten_weighted(values: list[float], weights: list[int], eps: float) -> list[float]:
    total = sum(weights)
    if total == 0:
        return [0.0 for _ in values]
    m = sum(v * w for v, w in zip(values, weights, strict=True)) / total
    s = math.sqrt(sum(w * (v - m) ** 2 for v, w in zip(values, weights, strict=True)) / total)
    return [(v - m) / (s + eps) for v in values]


def _treerl_raw(tree: Tree, options: AdvantageOptions) -> NodeAdvantages:
    leaves = tree.leaves()
    rewards = [_reward(leaf) for leaf in leaves]
    n, total = len(rewards), sum(rewards)
    # leave-one-out centring: r_l - mean of the other leaves (0 for a tree with one leaf)
    centred = {
        leaf.id: (r - (total - r) / (n - 1) if n > 1 else 0.0)
        for leaf, r in zip(leaves, rewards, strict=True)
    }

    def value(node: Node) -> float:
        return _mean([centred[leaf.id] for leaf in node.leaves()])

    v_root = value(tree.root)
    raw: NodeAdvantages = {}
    for node in tree.nodes():
        if node is tree.root:
            continue
        v = value(node)
        process = (v - v_root) + (v - value(node.parent))  # G(n) + L(n)
        if options.treerl_sqrt_leaves:
            process /= math.sqrt(len(node.leaves()))
        raw[node.id] = process
    return raw


def treerl(trees: Sequence[Tree], options: AdvantageOptions) -> list[NodeAdvantages]:
    """TreeRL (EPTree), paper form: R(n) = (G(n) + L(n)) / sqrt(|leaves(n)|) with
    G(n) = V(n) - V(root), L(n) = V(n) - V(parent); V over leave-one-out centred leaf rewards.
    Then whitened over every completion token of the batch (a node weighs its token count)."""
    raws = [_treerl_raw(tree, options) for tree in trees]
    lengths = [{n.id: len(n.tokens) for n in tree.nodes() if n is not tree.root} for tree in trees]
    flat_v = [v for raw in raws for v in raw.values()]
    flat_w = [lengths[i][k] for i, raw in enumerate(raws) for k in raw]
    white = iter(_whiten_weighted(flat_v, flat_w, options.eps))
    return [{k: next(white) for k in raw} for raw in raws]


def treepo(trees: Sequence[Tree], options: AdvantageOptions) -> list[NodeAdvantages]:
    """TreePO: a_d(i) = r_i - mean over G_d(i) (leaves under i's depth-d ancestor), for every
    ancestor depth d; A_i = mean_d a_d(i); whitened over all leaves of the batch."""
    per_tree: list[dict[int, float]] = []
    for tree in trees:
        leaf_adv = {}
        for leaf in tree.leaves():
            r = _reward(leaf)
            ancestors = leaf.path()[:-1]
            terms = [r - _mean([_reward(x) for x in a.leaves()]) for a in ancestors]
            leaf_adv[leaf.id] = _mean(terms)
        per_tree.append(leaf_adv)
    flat = [a for d in per_tree for a in d.values()]
    white = iter(_whiten_weighted(flat, [1] * len(flat), options.eps))
    whitened = [{k: next(white) for k in d} for d in per_tree]
    return [_inner_from_leaves(tree, adv) for tree, adv in zip(trees, whitened, strict=True)]


def depth_normalized(trees: Sequence[Tree], options: AdvantageOptions) -> list[NodeAdvantages]:
    """BranchGRPO: r(n) = mean reward of leaves(n); A(n) = (r(n) - mean_d) / (std_d + eps) over
    the nodes at n's depth d in the same tree (0 when the depth holds one node)."""
    out = []
    for tree in trees:
        by_depth: dict[int, list[Node]] = {}
        for node in tree.nodes():
            if node is not tree.root:
                by_depth.setdefault(node.depth, []).append(node)
        adv: NodeAdvantages = {}
        for nodes in by_depth.values():
            values = [_mean([_reward(x) for x in n.leaves()]) for n in nodes]
            adv.update(
                {n.id: a for n, a in zip(nodes, _normalized(values, options.eps), strict=True)}
            )
        out.append(adv)
    return out


Estimator = Callable[[Sequence[Tree], AdvantageOptions], list[NodeAdvantages]]

ESTIMATORS: dict[str, Estimator] = {
    "grpo": leaf_grpo,
    "sibling": sibling_relative,
    "treerl": treerl,
    "treepo": treepo,
    "depth": depth_normalized,
}


def compute_advantages(
    trees: Sequence[Tree], estimator: str = "grpo", options: AdvantageOptions | None = None
) -> list[NodeAdvantages]:
    """Run the named estimator; returns `{node.id: advantage}` per tree (root excluded)."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator={estimator!r} is unknown; choose one of {sorted(ESTIMATORS)}")
    return ESTIMATORS[estimator](trees, options or AdvantageOptions())


def assign_advantages(trees: Sequence[Tree], advantages: Sequence[NodeAdvantages]) -> None:
    """Write each node's advantage onto `Node.advantage` (the root keeps None)."""
    if len(trees) != len(advantages):
        raise ValueError(f"got {len(advantages)} advantage dicts for {len(trees)} trees")
    for tree, adv in zip(trees, advantages, strict=True):
        for node in tree.nodes():
            if node is not tree.root:
                node.advantage = adv[node.id]
