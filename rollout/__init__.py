"""tree-rollouts: RL rollouts sampled as trees whose branches share their prefixes.

`rollout.sample_tree(prompts, depth, width, model=..., tokenizer=...)` returns one `trees.Tree` per
prompt; `rollout.Engine` is the reusable form for training loops. With `env=` (a `rollout.Env`)
the trees are multi-turn agent episodes (rollout/agent).
"""

from __future__ import annotations

from trees import Node, Trajectory, Tree, TreeStats

from .agent import Env, Observation, Turn
from .api import Engine, sample_tree
from .rewards import RewardFunction, score_trees
from .service.client import Client, ServerRestarted

__all__ = [
    "Client",
    "Engine",
    "Env",
    "Observation",
    "Node",
    "RewardFunction",
    "ServerRestarted",
    "Trajectory",
    "Tree",
    "TreeStats",
    "Turn",
    "sample_tree",
    "score_trees",
]
