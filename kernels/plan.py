"""Cascade-attention plans: the tree layout of one engine step, built once, used by every layer.

A step forwards `T` query tokens. Each query belongs to a *row* (a contiguous chunk of queries of
one branch: one token when decoding, many when prefilling) whose *path* is a chain of KV segments
(shared prefix, prompt, level-1 node, ..., the row's own node). A query sees every key of its
ancestor segments and, in its own (last) segment, the keys up to and including its own position.
With a sliding window W (a layer's `sliding_window`), a query at absolute position p sees only the
keys at positions p - W < k <= p (transformers' `sliding_window_overlay`): each (query, segment)
pair gets a lower key bound, and pairs whose segment lies wholly before the window are dropped,
so a windowed plan reads no segment nobody's window reaches. Layers with different windows use
different plans of the same step (the engine builds one per distinct window).

The plan groups (query, segment) pairs so that each group is one batched matrix product:
segments at the same path depth, bucketed by size so padding stays bounded. Inside a group every
segment's queries are stacked into one matrix against that segment's keys (Hydragen's
inter-sequence batching), and each query appears at most once per group, so partial results merge
by log-sum-exp group after group. The number of groups depends on the tree's depth and the spread
of sizes, not on the number of branches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Segment:
    """A run of keys/values in the block pool: `blocks` in order, the first `length` slots used.
    `start` is the absolute position of its key 0 (only windowed plans read it).

    slots: the pool slots of its `length` keys, explicitly (then `blocks` is unused): a chain of
    segments that one reader alone reads, fused into one (`fuse`), so that it costs one product
    instead of one per segment. Each segment of the chain ends in a part-filled block, so the
    fused keys are not whole blocks; the torch paths read slot tables, the Triton path does not."""

    blocks: Sequence[int]
    length: int
    start: int = 0
    slots: Sequence[int] | None = None

    def slot_ids(self, block_size: int) -> list[int]:
        """The pool slots of its keys, in order."""
        if self.slots is not None:
            return list(self.slots)
        return [self.blocks[j // block_size] * block_size + j % block_size
                for j in range(self.length)]


def fuse(chain: Sequence[Segment], block_size: int) -> Segment:
    """One segment holding the keys of `chain` (consecutive positions, root first) in order."""
    for a, b in zip(chain, chain[1:], strict=False):
        assert a.start + a.length == b.start, "fused segments must be consecutive"
    slots = [s for seg in chain for s in seg.slot_ids(block_size)]
    return Segment(blocks=(), length=len(slots), start=chain[0].start, slots=slots)


@dataclass(frozen=True)
class Row:
    """`q_len` consecutive queries starting at `q_start`; `path` lists segment ids root to own.

    The own segment's `length` already counts this row's queries (their keys are written before
    attention runs), so query j of the row sees `length - q_len + j + 1` keys of its own segment.
    """

    q_start: int
    q_len: int
    path: Sequence[int]


@dataclass(frozen=True)
class CascadeGroup:
    """One batched product. Shapes: S segments, B blocks, N queries per segment (padded).

    block_table: [S, B] int64 pool block ids (padding repeats a valid block)
    slot_table:  [S, max_kv_len] int64 pool slot ids, set instead when a member is a fused
                 segment (Segment.slots); block_table is then [S, 1] and unused
    kv_len:      [S] int64 keys per segment
    q_index:     [S, N] int64 query ids; padding points at the scratch query `num_queries`
    q_limit:     [S, N] int64 end of each query's visible keys, >= 1
    q_first:     [S, N] int64 start of them: key j is visible iff q_first <= j < q_limit (0
                 without a window; q_first < q_limit for every real query)
    kv_pos:      [S] int64 absolute position of each segment's key 0 (ALiBi biases read it)
    """

    block_table: torch.Tensor
    kv_len: torch.Tensor
    q_index: torch.Tensor
    q_limit: torch.Tensor
    q_first: torch.Tensor
    max_kv_len: int
    masked: bool = True  # False when every query sees all max_kv_len keys (no mask, no padding)
    slot_table: torch.Tensor | None = None
    kv_pos: torch.Tensor | None = None


@dataclass(frozen=True)
class CascadePlan:
    """The step's groups. `derived` caches what each backend derives from them (its own work
    layout), so that work is done once per step and reused by every layer."""

    groups: tuple[CascadeGroup, ...]
    num_queries: int
    block_size: int
    window: int | None = None
    derived: dict[tuple, object] = field(default_factory=dict, compare=False, repr=False)


def _bucket(n: int) -> int:
    """Size class by powers of 8: a group pads its members to at most 8x the smallest one."""
    b = 0
    while n > 8:
        n = (n + 7) // 8
        b += 1
    return b


def plan_cascade(
    segments: Sequence[Segment],
    rows: Sequence[Row],
    block_size: int,
    device: torch.device | str = "cpu",
    window: int | None = None,
) -> CascadePlan:
    """Group every (query, segment) pair of the step into batched products. See the module doc.

    window: a query at absolute position p sees keys at p - window < k <= p (segments' `start`
    give key positions); None sees its whole path.
    """
    if window is not None and window < 1:
        raise ValueError(f"plan_cascade: window={window}; expected an int >= 1 or None")
    num_queries = sum(r.q_len for r in rows)
    per_seg = _visible_pairs(segments, rows, window)
    # 2. Bucket segments of one depth by (query count, key count) size class.
    buckets: dict[tuple[int, int, int], list[int]] = {}
    for (depth, seg_id), (qs, _, _) in per_seg.items():
        key = (depth, _bucket(len(qs)), _bucket(segments[seg_id].length))
        buckets.setdefault(key, []).append(seg_id)
    # 3. Pad each bucket into dense tensors.
    groups = []
    for (depth, _, _), seg_ids in sorted(buckets.items()):
        n_max = max(len(per_seg[(depth, s)][0]) for s in seg_ids)
        l_max = max(segments[s].length for s in seg_ids)
        b_max = (l_max + block_size - 1) // block_size
        by_slot = any(segments[s].slots is not None for s in seg_ids)
        table, kv_len, kv_pos, q_index, q_limit, q_first = [], [], [], [], [], []
        for s in seg_ids:
            seg = segments[s]
            if by_slot:
                ids = seg.slot_ids(block_size)
                table.append(ids + [ids[0]] * (l_max - len(ids)))
            else:
                n_blocks = (seg.length + block_size - 1) // block_size
                blocks = list(seg.blocks[:n_blocks])
                assert len(blocks) == n_blocks, (
                    f"segment {s}: {len(blocks)} blocks for {seg.length} keys"
                )
                table.append(blocks + [blocks[0]] * (b_max - n_blocks))
            kv_len.append(seg.length)
            kv_pos.append(seg.start)
            qs, limits, firsts = per_seg[(depth, s)]
            pad = n_max - len(qs)
            q_index.append(qs + [num_queries] * pad)
            q_limit.append(limits + [l_max] * pad)  # padding queries are discarded: no mask
            if firsts is not None:
                q_first.append(firsts + [0] * pad)

        def as_tensor(x: list) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.int64, device=device)

        index = as_tensor(q_index)
        masked = any(lim != l_max for row in q_limit for lim in row)
        if window is None:
            first = torch.zeros_like(index)
        else:
            first = as_tensor(q_first)
            masked = masked or any(f for row in q_first for f in row)
        slot_table = as_tensor(table) if by_slot else None
        groups.append(
            CascadeGroup(
                block_table=as_tensor(table) if not by_slot else index.new_zeros(len(seg_ids), 1),
                slot_table=slot_table,
                kv_len=as_tensor(kv_len),
                q_index=index,
                q_limit=as_tensor(q_limit),
                q_first=first,
                max_kv_len=l_max,
                masked=masked,
                kv_pos=as_tensor(kv_pos),
            )
        )
    return CascadePlan(
        groups=tuple(groups), num_queries=num_queries, block_size=block_size, window=window
    )


_Pairs = dict[tuple[int, int], tuple[list[int], list[int], list[int] | None]]


def _visible_pairs(
    segments: Sequence[Segment], rows: Sequence[Row], window: int | None
) -> _Pairs:
    """1. For each (depth, segment): the queries that read it, each one's key limit and (with a
    window) its first visible key. Without a window only empty segments are skipped."""
    per_seg: _Pairs = {}
    for row in rows:
        if row.q_len < 1 or not row.path:
            raise ValueError(f"plan_cascade: row {row} needs q_len >= 1 and a non-empty path")
        own_seg = segments[row.path[-1]]
        first_limit = own_seg.length - row.q_len + 1
        if first_limit < 1:
            raise ValueError(
                f"plan_cascade: segment {row.path[-1]} shorter than its row's queries"
            )
        q_ids = range(row.q_start, row.q_start + row.q_len)
        # the row's first query sits at absolute position own_seg.start + first_limit - 1, so
        # its first visible key is at that position - window + 1
        lowest = own_seg.start + first_limit - (window or 0)
        last = len(row.path) - 1
        for depth, seg_id in enumerate(row.path):
            seg = segments[seg_id]
            if depth == last:
                limits = list(range(first_limit, seg.length + 1))
            elif seg.length:
                limits = [seg.length] * row.q_len
            else:
                continue
            if window is None:
                qs, lim, _ = per_seg.setdefault((depth, seg_id), ([], [], None))
                qs.extend(q_ids)
                lim.extend(limits)
                continue
            lo = lowest - seg.start  # query j's first visible key of this segment: lo + j
            keep = [j for j in range(row.q_len) if lo + j < limits[j]]
            if not keep:
                continue  # the segment lies wholly before every query's window
            qs, lim, firsts = per_seg.setdefault((depth, seg_id), ([], [], []))
            assert firsts is not None
            qs.extend(q_ids[j] for j in keep)
            lim.extend(limits[j] for j in keep)
            firsts.extend(max(lo + j, 0) for j in keep)
    return per_seg
