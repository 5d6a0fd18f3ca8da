"""Saving and loading flow trees (their SDE steps hold tensors, so `Tree.to_json` refuses them).

A flow tree becomes plain nested dicts, lists, numbers and tensors, written with `torch.save` and
read back with `torch.load(weights_only=True)` (no pickled classes, safe to load from others). The
prompt's embeddings are stored once per tree, not per step; loading re-links every `FlowStep` to
them, so `recompute_logprobs` works on loaded trees as on fresh ones. `torch.save` writes the whole
storage of a view, so a tensor that views a larger one (a row of some batch, say put in `meta` by
a caller) is saved as a copy of its own elements: one tree's file holds only that tree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from trees import Node, Tree, TreeStats

from .pipeline import PromptEmbeds
from .steps import FlowStep

_NODE_FIELDS = ("id", "depth", "key", "logprobs", "finish_reason", "reward", "advantage")
_STEP_FIELDS = tuple(f.name for f in fields(FlowStep) if f.name not in ("cond", "uncond"))


def flow_tree_to_dict(tree: Tree) -> dict[str, Any]:
    """A flow tree as nested plain data plus tensors."""
    root_meta = dict(tree.root.meta)
    cond, uncond = root_meta.pop("cond"), root_meta.pop("uncond", None)

    def node_dict(node: Node) -> dict[str, Any]:
        meta = root_meta if node is tree.root else node.meta
        return {
            **{name: getattr(node, name) for name in _NODE_FIELDS},
            "meta": {k: _own(v) for k, v in meta.items()},
            "steps": [{name: _own(getattr(s, name)) for name in _STEP_FIELDS} for s in node.steps],
            "children": [node_dict(c) for c in node.children],
        }

    return {
        "prompt": tree.prompt,
        "policy_version": tree.policy_version,
        "stats": tree.stats.to_dict(),
        "cond": {k: _own(v) for k, v in cond.tensors.items()},
        "uncond": {k: _own(v) for k, v in uncond.tensors.items()} if uncond is not None else None,
        "root": node_dict(tree.root),
    }


def _own(value: Any) -> Any:
    """`value`, or a copy of it when it is a tensor viewing a larger storage."""
    if (isinstance(value, torch.Tensor)
            and value.untyped_storage().nbytes() > value.numel() * value.element_size()):
        return value.clone()
    return value


def flow_tree_from_dict(data: dict[str, Any]) -> Tree:
    cond = PromptEmbeds(dict(data["cond"]))
    uncond = PromptEmbeds(dict(data["uncond"])) if data["uncond"] is not None else None

    def build(d: dict[str, Any], parent: Node | None) -> Node:
        node = Node(parent=parent, meta=dict(d["meta"]),
                    **{name: d[name] for name in _NODE_FIELDS})
        node.logprobs = list(node.logprobs)
        node.steps = [FlowStep(**s, cond=cond, uncond=uncond) for s in d["steps"]]
        node.children = [build(c, node) for c in d["children"]]
        return node

    root = build(data["root"], None)
    root.meta.update(cond=cond, uncond=uncond)
    return Tree(root=root, prompt=data["prompt"], policy_version=data["policy_version"],
                stats=TreeStats(**data["stats"]))


def save_flow_trees(trees: Sequence[Tree], path: str | Path) -> None:
    torch.save({"flow_trees": [flow_tree_to_dict(t) for t in trees]}, str(path))


def load_flow_trees(path: str | Path) -> list[Tree]:
    data = torch.load(str(path), weights_only=True)
    if not isinstance(data, dict) or "flow_trees" not in data:
        raise ValueError(f"{path}: not a file written by rollout.flow.save_flow_trees")
    return [flow_tree_from_dict(d) for d in data["flow_trees"]]
