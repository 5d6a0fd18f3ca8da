"""The batched reward interface shared by text and flow-matching trees.

A reward function takes the leaves' decoded outputs (completion strings, token ids, or images) and
their prompts, all trees of a step at once, and returns one float per output. `score_trees` calls
it once per batch and writes each leaf's `reward`; trainers derive node values from the leaves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from trees import Trajectory, Tree


class RewardFunction(Protocol):
    def __call__(
        self, outputs: Sequence[Any], prompts: Sequence[Any]
    ) -> Sequence[float] | torch.Tensor:
        """One reward per output; `prompts[i]` is the prompt `outputs[i]` answers."""
        ...


def score_trees(
    trees: Sequence[Tree],
    reward_fn: RewardFunction,
    decode: Callable[[Trajectory], Any] | None = None,
) -> list[float]:
    """Score every leaf of every tree in one call of `reward_fn`; set `leaf.reward`.

    `decode` turns a trajectory into the output the reward function expects (for text, usually
    `lambda t: tokenizer.decode(t.completion_ids)`); without it the trajectory itself is passed.
    Returns the rewards in tree order, leaves left to right.
    """
    trajectories = [t for tree in trees for t in tree.trajectories()]
    prompts = [tree.prompt for tree in trees for _ in tree.leaves()]
    outputs = [decode(t) if decode is not None else t for t in trajectories]
    rewards = reward_fn(outputs, prompts)
    if isinstance(rewards, torch.Tensor):
        rewards = rewards.detach().float().cpu().tolist()
    rewards = [float(r) for r in rewards]
    if len(rewards) != len(trajectories):
        raise ValueError(
            f"reward function returned {len(rewards)} rewards for {len(trajectories)} outputs"
        )
    bad = [r for r in rewards if not math.isfinite(r)]
    if bad:
        raise ValueError(f"reward function returned non-finite rewards: {bad[:5]}")
    for traj, r in zip(trajectories, rewards, strict=True):
        traj.leaf.reward = r
    return rewards
