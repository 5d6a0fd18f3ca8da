"""Branching schedules: how wide and how long each level of a rollout tree is.

Level 0 is the prompt (the root). A node at depth d < depth samples `segment_len[d-1]` tokens
(fewer if it samples EOS, which makes it a leaf) and then forks `width[d]` children; nodes at depth
`depth` are leaves and sample until EOS or until the path holds `max_new_tokens` new tokens.
"""

from __future__ import annotations

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
    segment_len: tuple[int, ...]  # tokens sampled by nodes at depth 1 .. depth-1
    max_new_tokens: int

    @classmethod
    def make(
        cls,
        depth: int,
        width: int | Sequence[int],
        segment_len: int | Sequence[int] = 32,
        max_new_tokens: int = 256,
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
        return cls(depth=depth, width=widths, segment_len=segs, max_new_tokens=max_new_tokens)

    @property
    def leaf_len(self) -> int:
        """Tokens a leaf samples at most."""
        return self.max_new_tokens - sum(self.segment_len)

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
        """Sampled tokens per level (depth 1..depth) in a full tree."""
        return [self.nodes_at(d) * self.target(d) for d in range(1, self.depth + 1)]
