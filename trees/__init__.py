"""Rollout trees: plain data (nodes, trajectories, stats, JSON) that every package may use."""

from __future__ import annotations

from .tree import Node, Trajectory, Tree, TreeStats

_MASK64 = (1 << 64) - 1


def branch_key(parent_key: int, index: int) -> int:
    """Key of the `index`-th child of a node keyed `parent_key` (splitmix64 of the pair).

    Keys depend only on the path from the root, so seeded sampling is independent of the order or
    batching in which an engine runs the branches.
    """
    z = (parent_key * 0x9E3779B97F4A7C15 + index + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 62) - 1)


__all__ = ["Node", "Trajectory", "Tree", "TreeStats", "branch_key"]
