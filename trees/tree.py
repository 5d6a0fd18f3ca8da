"""The rollout tree: plain data shared by the samplers, the trainers and the service.

A `Tree` holds one prompt's rollouts. Its root is the prompt (depth 0, `tokens` = prompt ids); every
other node holds the segment it sampled (token ids and their log-probs for text, SDE steps for flow
matching in `steps`). Siblings share exactly their ancestors' segments; a root-to-leaf path is one
trajectory. Nodes are numbered in creation order (`Node.id`), and `Node.key` is a path-derived
64-bit key the samplers use to seed each branch, so a node's randomness does not depend on the
order in which an engine happened to run it.

Everything here is CPU-side Python and JSON-serializable (tensors in `Node.steps` are not: the flow
sampler owns their serialization).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TreeStats:
    """What building a tree cost.

    `tokens_forwarded` is counted by the engine (sum of model input lengths). Two counts derive
    from the tree: `unique_tokens`, every token it holds once (the prompt and every sampled token,
    however many leaves share it), and `kv_tokens`, the tokens whose keys and values some branch
    needs (the same less each leaf's last token: nothing is sampled after it, so it is never
    forwarded). An engine that forwards each needed token exactly once
    has `tokens_forwarded + prefix_tokens_reused == kv_tokens`, where `prefix_tokens_reused`
    counts prompt tokens whose keys/values the tree read from a prefix that another tree of the
    batch computed (or a prefix cache held). For flow trees `nfe` counts transformer evaluations
    per latent.
    """

    tokens_forwarded: int = 0
    prefix_tokens_reused: int = 0
    unique_tokens: int = 0
    kv_tokens: int = 0
    peak_kv_bytes: int = 0
    seconds: float = 0.0
    forward_passes: int = 0
    nfe: int = 0
    # tokens a flat run of the same leaves would hold on top (each leaf's whole path, shared
    # turns and segments repeated), and for agent trees (rollout.Env) the environment calls made
    # and those such a flat run would add
    tokens_saved: int = 0
    env_calls: int = 0
    env_calls_saved: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(eq=False)
class Node:
    """One segment of the tree. `tokens` of the root are the prompt ids (no log-probs)."""

    id: int
    depth: int
    key: int = 0
    parent: Node | None = field(default=None, repr=False)
    children: list[Node] = field(default_factory=list, repr=False)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    steps: list[Any] = field(default_factory=list, repr=False)
    # per token, the likeliest alternatives as (token id, log-prob), when the sampler was asked
    top_logprobs: list[list[tuple[int, float]]] | None = field(default=None, repr=False)
    # agent trees: per token, True where the policy sampled it, False where the environment's
    # observation put it (forwarded, never sampled: its log-prob is None); None: all sampled
    sampled: list[bool] | None = None
    # "eos" | "stop" (a stop string) | "length" | "branch" (forked) | None (running); agent
    # trees add "done", "max_turns", "env_error" and "env_timeout" (rollout/agent)
    finish_reason: str | None = None
    reward: float | None = None
    advantage: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_leaf(self) -> bool:
        return not self.children

    def path(self) -> list[Node]:
        """Nodes from the root down to this one, inclusive."""
        out: list[Node] = []
        node: Node | None = self
        while node is not None:
            out.append(node)
            node = node.parent
        return out[::-1]

    def leaves(self) -> list[Node]:
        """Leaves of the subtree rooted here (this node if it is a leaf), left to right."""
        if self.is_leaf:
            return [self]
        return [leaf for child in self.children for leaf in child.leaves()]


@dataclass(frozen=True)
class Trajectory:
    """One root-to-leaf path, flattened."""

    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float | None]  # None at observation tokens (agent trees)
    nodes: list[Node]

    @property
    def loss_mask(self) -> list[bool]:
        """Per completion token: True where the policy sampled it (the loss reads only those),
        False for environment observations."""
        return [s for n in self.nodes[1:] for s in _sampled(n)]

    @property
    def leaf(self) -> Node:
        return self.nodes[-1]

    @property
    def reward(self) -> float | None:
        return self.leaf.reward


@dataclass(eq=False)
class Tree:
    """A prompt's rollout tree; `prompt` keeps the caller's prompt (text or ids) for rewards."""

    root: Node
    prompt: Any = None
    policy_version: int = 0
    stats: TreeStats = field(default_factory=TreeStats)

    @property
    def prompt_ids(self) -> list[int]:
        return self.root.tokens

    def nodes(self) -> Iterator[Node]:
        """All nodes, depth-first, parents before children."""
        stack = [self.root]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(reversed(node.children))

    def leaves(self) -> list[Node]:
        return self.root.leaves()

    @property
    def depth(self) -> int:
        return max(node.depth for node in self.nodes())

    def trajectories(self) -> list[Trajectory]:
        """One trajectory per leaf, left to right."""
        out = []
        for leaf in self.leaves():
            path = leaf.path()
            out.append(
                Trajectory(
                    prompt_ids=list(self.root.tokens),
                    completion_ids=[t for n in path[1:] for t in n.tokens],
                    logprobs=[lp for n in path[1:] for lp in n.logprobs],
                    nodes=path,
                )
            )
        return out

    def flat_tokens(self) -> int:
        """Tokens the same leaves hold sampled one by one: each its prompt and its whole path."""
        return sum(sum(len(n.tokens) for n in leaf.path()) for leaf in self.leaves())

    def unique_tokens(self) -> int:
        """Every token the tree holds, once: the prompt and each node's segment."""
        return sum(len(node.tokens) for node in self.nodes())

    def kv_tokens(self) -> int:
        """Tokens whose keys/values some branch needs: every token except each leaf's last one
        (nothing is sampled after it, so it is never forwarded), and the prompt in full."""
        leaves_last = sum(1 for n in self.leaves() if n is not self.root and n.tokens)
        return self.unique_tokens() - leaves_last

    # JSON round trip -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        def node_dict(node: Node) -> dict[str, Any]:
            if node.steps:
                raise TypeError("Tree.to_dict: nodes with flow steps serialize via rollout.flow")
            return {
                "id": node.id,
                "depth": node.depth,
                "key": node.key,
                "tokens": node.tokens,
                "logprobs": node.logprobs,
                **({} if node.top_logprobs is None else {"top_logprobs": node.top_logprobs}),
                **({} if node.sampled is None else {"sampled": node.sampled}),
                "finish_reason": node.finish_reason,
                "reward": node.reward,
                "advantage": node.advantage,
                "meta": node.meta,
                "children": [node_dict(c) for c in node.children],
            }

        return {
            "prompt": self.prompt,
            "policy_version": self.policy_version,
            "stats": self.stats.to_dict(),
            "root": node_dict(self.root),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Tree:
        def build(d: dict[str, Any], parent: Node | None) -> Node:
            node = Node(
                id=d["id"],
                depth=d["depth"],
                key=d.get("key", 0),
                parent=parent,
                tokens=list(d["tokens"]),
                logprobs=list(d["logprobs"]),
                top_logprobs=_pairs(d.get("top_logprobs")),
                sampled=None if d.get("sampled") is None else [bool(b) for b in d["sampled"]],
                finish_reason=d.get("finish_reason"),
                reward=d.get("reward"),
                advantage=d.get("advantage"),
                meta=dict(d.get("meta", {})),
            )
            node.children = [build(c, node) for c in d["children"]]
            return node

        return cls(
            root=build(data["root"], None),
            prompt=data.get("prompt"),
            policy_version=data.get("policy_version", 0),
            stats=TreeStats(**data.get("stats", {})),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> Tree:
        return cls.from_dict(json.loads(text))

    def summary(self) -> str:
        """A short text drawing of the tree: one line per node, indented by depth."""
        lines = []
        for node in self.nodes():
            label = "prompt" if node is self.root else f"node {node.id}"
            extra = f" reward={node.reward:.3f}" if node.reward is not None else ""
            fin = f" [{node.finish_reason}]" if node.finish_reason else ""
            size = f"{len(node.tokens)} tokens"
            if node.sampled is not None:  # agent trees: what the policy sampled, what came back
                size += f" ({sum(node.sampled)} sampled, {node.sampled.count(False)} observed)"
            lines.append(f"{'  ' * node.depth}{label}: {size}{fin}{extra}")
        return "\n".join(lines)


def _sampled(node: Node) -> list[bool]:
    return [True] * len(node.tokens) if node.sampled is None else node.sampled


def _pairs(rows: list[list[list[Any]]] | None) -> list[list[tuple[int, float]]] | None:
    """JSON's [[id, logprob], ...] per token back to tuples (None stays None)."""
    if rows is None:
        return None
    return [[(int(t), float(lp)) for t, lp in row] for row in rows]
