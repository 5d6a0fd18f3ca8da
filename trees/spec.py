"""Branching schedules: how wide and how long each level of a rollout tree is.

Level 0 is the prompt (the root). A node at depth d < depth samples `segment_len[d-1]` tokens
(fewer if it samples EOS, which makes it a leaf) and then forks `width[d]` children; nodes at depth
`depth` are leaves and sample until EOS or until the path holds `max_new_tokens` new tokens.

Entropy-guided branching (`branch_entropy` set): a node at depth d < depth forks at the first point
where the policy is uncertain instead of at a fixed length. Once it holds `min_segment_len[d-1]`
tokens, it forks as soon as the distribution of its next token has entropy >= `branch_entropy`
nats, and at `segment_len[d-1]` tokens at the latest; each child then draws that uncertain token
for itself. Siblings thus share the tokens the policy was sure of and differ from the first token
it was not (TreeRL's EPTree forks at high-entropy tokens too, but over finished chains in several
passes; this decides online, in the one pass). Leaves still stop at `max_new_tokens` new tokens on
their path, so a node that forks early leaves its leaves more room.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def _per_level(name: str, value: int | Sequence[int], levels: int) -> tuple[int, ...]:
    if isinstance(value, bool) or not isinstance(value, (int, Sequence)):
        raise TypeError(f"{name} must be an int or a list of ints, got {type(value).__name__}")
    values = (value,) * levels if isinstance(value, int) else tuple(value)
    if len(values) != levels:
        raise ValueError(
            f"{name}={list(values)} has {len(values)} entries; expected {levels} (one per level "
            f"{'above the leaves' if name == 'segment_len' else 'that forks'})"
        )
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={list(values)}: every entry must be an int >= 1")
    return values


@dataclass(frozen=True)
class TreeSpec:
    """A validated branching schedule. Build it with `TreeSpec.make`."""

    depth: int
    width: tuple[int, ...]  # children per node at depth 0 .. depth-1
    segment_len: tuple[int, ...]  # tokens sampled by nodes at depth 1 .. depth-1 (at most)
    max_new_tokens: int
    branch_entropy: float | None = None  # nats; None: fork at segment_len exactly
    min_segment_len: tuple[int, ...] = ()  # tokens before an entropy fork may happen (per level)

    @classmethod
    def make(
        cls,
        depth: int,
        width: int | Sequence[int],
        segment_len: int | Sequence[int] = 32,
        max_new_tokens: int = 256,
        branch_entropy: float | None = None,
        min_segment_len: int | Sequence[int] | None = None,
    ) -> TreeSpec:
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth={depth!r}: expected an int >= 1")
        widths = _per_level("width", width, depth)
        segs = _per_level("segment_len", segment_len, depth - 1)  # the leaves' length is implied
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise TypeError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
        if max_new_tokens <= sum(segs):
            raise ValueError(
                f"max_new_tokens={max_new_tokens} leaves nothing for the leaves: the segments "
                f"above them take {sum(segs)} tokens ({list(segs)}); raise max_new_tokens or "
                "shorten segment_len"
            )
        if branch_entropy is None:
            if min_segment_len is not None:
                raise ValueError(
                    "min_segment_len only applies to entropy-guided branching; set "
                    "branch_entropy (nats) too, or drop min_segment_len"
                )
            mins = segs
        else:
            if (
                isinstance(branch_entropy, bool)
                or not isinstance(branch_entropy, (int, float))
                or not math.isfinite(branch_entropy)
                or branch_entropy < 0
            ):
                raise ValueError(
                    f"branch_entropy={branch_entropy!r}: expected a finite number of nats >= 0 "
                    "(or None for fixed-length segments)"
                )
            mins = _per_level("min_segment_len", 1 if min_segment_len is None else min_segment_len,
                              depth - 1)
            over = [(m, s) for m, s in zip(mins, segs, strict=True) if m > s]
            if over:
                raise ValueError(
                    f"min_segment_len={list(mins)} exceeds segment_len={list(segs)} "
                    f"({over[0][0]} > {over[0][1]}): segment_len is each level's longest node"
                )
            if depth == 1:
                raise ValueError(
                    f"branch_entropy={branch_entropy!r} with depth=1: a depth-1 tree has no inner "
                    "node to fork; use depth >= 2, or drop branch_entropy"
                )
            branch_entropy = float(branch_entropy)
        return cls(
            depth=depth,
            width=widths,
            segment_len=segs,
            max_new_tokens=max_new_tokens,
            branch_entropy=branch_entropy,
            min_segment_len=mins,
        )

    def min_len(self, depth: int) -> int:
        """Tokens a node at `depth` (1 .. depth-1) holds before it may fork."""
        if not 1 <= depth < self.depth:
            raise ValueError(f"min_len: depth {depth} is not an inner level 1..{self.depth - 1}")
        return (self.min_segment_len or self.segment_len)[depth - 1]

    @property
    def leaf_len(self) -> int:
        """Tokens a leaf samples at most (below nodes that forked as early as allowed)."""
        mins = self.min_segment_len or self.segment_len
        return self.max_new_tokens - sum(mins)

    def target(self, depth: int) -> int:
        """Tokens a node at `depth` (>= 1) samples at most."""
        return self.segment_len[depth - 1] if depth < self.depth else self.leaf_len

    def nodes_at(self, depth: int) -> int:
        """Nodes at `depth` in a tree where no branch stops early."""
        n = 1
        for d in range(depth):
            n *= self.width[d]
        return n

    @property
    def num_leaves(self) -> int:
        return self.nodes_at(self.depth)

    def max_tokens_per_level(self) -> list[int]:
        """Sampled tokens per level (depth 1..depth) in a full tree, each node at its longest (an
        upper bound under entropy-guided branching, where long leaves follow short parents)."""
        return [self.nodes_at(d) * self.target(d) for d in range(1, self.depth + 1)]
