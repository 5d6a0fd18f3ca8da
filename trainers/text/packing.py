"""Pack rollout trees for the training forward: one sequence per tree, each unique token once.

A tree's input is its prompt followed by every node's segment in depth-first order (parents before
children), without each leaf's last token: nothing is ever predicted from it, so it is never
forwarded (this matches `Tree.kv_tokens()` and `TreeStats.kv_tokens`). Each position gets
the position id it has on its own root-to-leaf path, and attends to itself, to earlier tokens of its
own node and to every token of its ancestors: an additive float mask (0 / dtype min), the form
that is exact under eager and sdpa attention (a boolean mask is wrong under eager).

Targets are every sampled token of every non-root node, once: an agent tree's observation tokens
(`Node.sampled` False) are forwarded as inputs but are never targets, so the loss never reads
them. A node's first token is predicted by the last input token on its parent's path; any other
token by its predecessor in the node. Per
target the packing also carries the sampling log-prob, the node's advantage and the weight that
GRPO's per-sequence averaging gives it (the sum over the leaves that contain it of
1 / (leaf's sampled tokens * leaves in the tree)), so losses never need the tree again.
Trees of one micro-batch are right-padded to the longest; padded rows attend only to themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from trees import Node, Tree


@dataclass(frozen=True)
class PackedBatch:
    """Packed trees. B trees, L = longest packed length, T = targets (sampled tokens)."""

    input_ids: torch.Tensor  # [B, L] long
    position_ids: torch.Tensor  # [B, L] long
    allowed: torch.Tensor  # [B, L, L] bool, query i may attend key j
    target_row: torch.Tensor  # [T] long, which tree
    target_src: torch.Tensor  # [T] long, position whose logits predict the target
    target_ids: torch.Tensor  # [T] long
    old_logprobs: torch.Tensor  # [T] float32, sampling log-probs
    advantages: torch.Tensor  # [T] float32
    seq_weights: torch.Tensor  # [T] float32, GRPO per-sequence weight (sums to 1 per tree)
    num_trees: int
    num_input_tokens: int  # unpadded positions forwarded

    def attention_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """Additive float mask [B, 1, L, L]: 0 where allowed, the dtype's min elsewhere."""
        mask = torch.zeros(self.allowed.shape, dtype=dtype)
        mask.masked_fill_(~self.allowed, torch.finfo(dtype).min)
        return mask[:, None]

    def to(self, device: torch.device | str) -> PackedBatch:
        moved = {
            k: (v.to(device) if isinstance(v, torch.Tensor) else v)
            for k, v in self.__dict__.items()
        }
        return PackedBatch(**moved)


@dataclass(frozen=True)
class _TreeLayout:
    input_ids: list[int]
    position_ids: list[int]
    allowed: torch.Tensor  # [n, n] bool
    target_src: list[int]
    target_ids: list[int]
    old_logprobs: list[float]
    advantages: list[float]
    seq_weights: list[float]


def _input_len(tree: Tree, node: Node) -> int:
    """Tokens of `node` that are forwarded: all but a leaf's last."""
    n = len(node.tokens)
    return n - 1 if (node is not tree.root and node.is_leaf and n) else n


def _sequence_weights(tree: Tree) -> dict[int, float]:
    """Per node: sum over leaves below of 1 / (leaf's sampled tokens * number of leaves)."""
    leaves = tree.leaves()
    weight: dict[int, float] = {}
    for leaf in leaves:
        path = leaf.path()[1:]
        length = sum(len(_targets(n)) for n in path)
        for n in path:
            weight[n.id] = weight.get(n.id, 0.0) + 1.0 / (max(length, 1) * len(leaves))
    return weight


def _targets(node: Node) -> list[int]:
    """Indices of the node's sampled tokens (all of them, unless the environment put some)."""
    if node.sampled is None:
        return list(range(len(node.tokens)))
    return [k for k, s in enumerate(node.sampled) if s]


def _layout(tree: Tree, use_advantages: bool) -> _TreeLayout:
    if not tree.root.tokens:
        raise ValueError("pack_trees: a tree has an empty prompt; at least one prompt token needed")
    order = list(tree.nodes())
    index = {node.id: i for i, node in enumerate(order)}
    start: dict[int, int] = {}
    end: dict[int, int] = {}  # last input position on the node's path
    node_of_pos: list[int] = []
    ids, pos, src, tgt, old, adv = [], [], [], [], [], []
    seq_w = _sequence_weights(tree)
    weights: list[float] = []
    for node in order:
        parent_end = end[node.parent.id] if node.parent is not None else -1
        base = pos[parent_end] + 1 if parent_end >= 0 else 0
        start[node.id] = len(ids)
        n_in = _input_len(tree, node)
        ids.extend(node.tokens[:n_in])
        pos.extend(range(base, base + n_in))
        node_of_pos.extend([index[node.id]] * n_in)
        end[node.id] = len(ids) - 1 if n_in else parent_end
        if node is tree.root:
            continue
        if len(node.logprobs) != len(node.tokens):
            raise ValueError(
                f"node {node.id} has {len(node.tokens)} tokens but {len(node.logprobs)} log-probs"
            )
        if use_advantages and node.advantage is None:
            raise ValueError(f"node {node.id} has no advantage; run the advantage estimator first")
        targets = _targets(node)
        for k in targets:
            src.append(parent_end if k == 0 else start[node.id] + k - 1)
            tgt.append(node.tokens[k])
            old.append(node.logprobs[k])
        adv.extend([float(node.advantage or 0.0)] * len(targets))
        weights.extend([seq_w[node.id]] * len(targets))
    # ancestor-or-self relation between nodes, then between positions (keys not after queries)
    anc = torch.zeros(len(order), len(order), dtype=torch.bool)
    for node in order:
        for a in node.path():
            anc[index[node.id], index[a.id]] = True
    owner = torch.tensor(node_of_pos, dtype=torch.long)
    allowed = anc[owner][:, owner] & torch.ones(len(ids), len(ids), dtype=torch.bool).tril()
    return _TreeLayout(ids, pos, allowed, src, tgt, old, adv, weights)


def pack_trees(
    trees: Sequence[Tree], pad_token_id: int = 0, use_advantages: bool = True
) -> PackedBatch:
    """Pack `trees` (one row each) for `trainers.text.forward.packed_logprobs`.

    `use_advantages=False` packs trees that carry no advantages yet (zeros are stored).
    """
    if not trees:
        raise ValueError("pack_trees: got no trees")
    layouts = [_layout(t, use_advantages) for t in trees]
    width = max(len(lay.input_ids) for lay in layouts)
    batch = len(layouts)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((batch, width), dtype=torch.long)
    allowed = torch.eye(width, dtype=torch.bool).repeat(batch, 1, 1)
    rows = []
    for b, lay in enumerate(layouts):
        n = len(lay.input_ids)
        input_ids[b, :n] = torch.tensor(lay.input_ids, dtype=torch.long)
        position_ids[b, :n] = torch.tensor(lay.position_ids, dtype=torch.long)
        allowed[b, :n, :n] = lay.allowed
        rows.extend([b] * len(lay.target_ids))

    def cat(name: str, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor([x for lay in layouts for x in getattr(lay, name)], dtype=dtype)

    return PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        allowed=allowed,
        target_row=torch.tensor(rows, dtype=torch.long),
        target_src=cat("target_src", torch.long),
        target_ids=cat("target_ids", torch.long),
        old_logprobs=cat("old_logprobs", torch.float32),
        advantages=cat("advantages", torch.float32),
        seq_weights=cat("seq_weights", torch.float32),
        num_trees=batch,
        num_input_tokens=sum(len(lay.input_ids) for lay in layouts),
    )
