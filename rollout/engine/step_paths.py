"""A step's KV paths as cascade segments and rows, with each row's private chain fused.

Every KV node on a row's path is one segment of the cascade plan, and the plan batches segments
by depth: a conversation that comes back turn after turn through the prefix cache reads a chain of
nodes (prompt, answer, observation, answer, ...) that only it reads, and unfused each link would
cost one attention product per layer. Where the torch paths read the plan (the CPU), the tail of a
path that no other row of the step reads becomes one segment with explicit pool slots
(`tree_kernels.plan.fuse`): one product for the whole private chain, however many turns long.
Shared segments stay whole, so siblings still read their common past once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from tree_kernels.plan import Row, Segment

from .kv_nodes import KVNode

Entry = tuple[int, int, Sequence[KVNode]]  # (first query, queries, path of KV nodes root first)


def segments_and_rows(
    entries: Sequence[Entry], block_size: int, fuse: bool
) -> tuple[list[Segment], list[Row]]:
    """The plan's segments (one per node, or per fused private chain) and rows, in entry order."""
    readers = Counter(id(n) for _, _, path in entries for n in path) if fuse else None
    segments: list[Segment] = []
    seg_of: dict[int, int] = {}
    rows = []
    for q_start, q_len, path in entries:
        cut = len(path) - 1  # the row's own node is its alone
        while readers is not None and cut > 0 and readers[id(path[cut - 1])] == 1:
            cut -= 1
        ids = []
        for n in path[:cut]:
            if id(n) not in seg_of:
                seg_of[id(n)] = len(segments)
                segments.append(Segment(n.blocks, n.stored, n.start))
            ids.append(seg_of[id(n)])
        tail = path[cut:]
        if len(tail) == 1:
            segments.append(Segment(tail[0].blocks, tail[0].stored, tail[0].start))
        else:
            slots = [s for n in tail for s in slot_ids(n, block_size)]
            segments.append(Segment((), len(slots), tail[0].start, slots=slots))
        ids.append(len(segments) - 1)
        rows.append(Row(q_start=q_start, q_len=q_len, path=ids))
    return segments, rows


def slot_ids(node: KVNode, block_size: int) -> list[int]:
    """The pool slots of the node's stored keys, kept on the node (stored keys never move)."""
    have = node.slot_cache
    for j in range(len(have), node.stored):
        have.append(node.blocks[j // block_size] * block_size + j % block_size)
    return have[: node.stored]
