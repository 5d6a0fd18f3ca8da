"""Random cascade-attention problems and their naive oracle (softmax over materialized KV)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from tree_kernels.plan import Row, Segment


@dataclass
class CascadeCase:
    q: torch.Tensor  # [T, H, D]
    k_pool: torch.Tensor  # [slots, KVH, D]
    v_pool: torch.Tensor
    segments: list[Segment]
    rows: list[Row]
    block_size: int


def random_case(
    depth: int,
    width: int,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 16,
    block_size: int = 4,
    max_len: int = 9,
    prefill_rows: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> CascadeCase:
    """A tree of segments `depth` levels deep, `width` children each, with ragged lengths.

    Leaves decode one query each; `prefill_rows` leaves instead prefill a causal chunk of queries.
    Blocks are handed out in a shuffled order so the block table matters.
    """
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    lengths, parents = [rng.randint(1, max_len)], [-1]
    frontier = [0]
    for _ in range(depth):
        nxt = []
        for p in frontier:
            for _ in range(rng.randint(1, width)):
                parents.append(p)
                lengths.append(rng.randint(1, max_len))
                nxt.append(len(lengths) - 1)
        frontier = nxt
    n_blocks = sum((n + block_size - 1) // block_size for n in lengths) + 3
    order = list(range(n_blocks))
    rng.shuffle(order)
    segments, cursor, starts = [], 0, []
    for i, n in enumerate(lengths):
        nb = (n + block_size - 1) // block_size
        # absolute positions: the root starts past a few tokens (a shared prefix), a child where
        # its parent ends
        start = rng.randint(0, 5) if parents[i] < 0 else starts[parents[i]] + lengths[parents[i]]
        starts.append(start)
        segments.append(Segment(blocks=order[cursor : cursor + nb], length=n, start=start))
        cursor += nb
    rows, t = [], 0
    for i, leaf in enumerate(frontier):
        path = [leaf]
        while parents[path[-1]] >= 0:
            path.append(parents[path[-1]])
        q_len = lengths[leaf] if i < prefill_rows else 1
        rows.append(Row(q_start=t, q_len=q_len, path=path[::-1]))
        t += q_len
    k_pool = torch.randn(n_blocks * block_size, kv_heads, head_dim, generator=gen).to(dtype)
    v_pool = torch.randn(n_blocks * block_size, kv_heads, head_dim, generator=gen).to(dtype)
    q = torch.randn(t, heads, head_dim, generator=gen).to(dtype)
    return CascadeCase(q, k_pool, v_pool, segments, rows, block_size)


def naive_attention(
    case: CascadeCase,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    alibi: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per query: gather its whole visible KV (ancestors, own causal prefix), softmax, in fp64.

    window: the query at absolute position p sees only keys at positions p - window < k <= p.
    softcap: scores -> softcap * tanh(scores / softcap) before the softmax.
    alibi: [H] slopes; then scores + slope[h] * (the key's absolute position).
    """
    h = case.q.shape[1]
    kvh = case.k_pool.shape[1]
    out = torch.empty(case.q.shape, dtype=torch.float64)
    for row in case.rows:
        slots, positions = [], []
        for seg_id in row.path:
            seg = case.segments[seg_id]
            slots += seg.slot_ids(case.block_size)
            positions += range(seg.start, seg.start + seg.length)
        own_len = case.segments[row.path[-1]].length
        for j in range(row.q_len):
            n_seen = len(slots) - own_len + (own_len - row.q_len) + j + 1
            visible, seen_pos = slots[:n_seen], positions[:n_seen]
            if window is not None:
                p = positions[n_seen - 1]  # the query's own key is the last it sees
                keep = [i for i, k in enumerate(seen_pos) if k > p - window]
                visible, seen_pos = [visible[i] for i in keep], [seen_pos[i] for i in keep]
            k = case.k_pool[visible].double().repeat_interleave(h // kvh, dim=1)  # [L, H, D]
            v = case.v_pool[visible].double().repeat_interleave(h // kvh, dim=1)
            qi = case.q[row.q_start + j].double()  # [H, D]
            scores = torch.einsum("hd,lhd->hl", qi, k) * scale
            if softcap is not None:
                scores = softcap * torch.tanh(scores / softcap)
            if alibi is not None:
                scores = scores + alibi.double()[:, None] * torch.tensor(seen_pos).double()
            p = torch.softmax(scores, dim=-1)
            out[row.q_start + j] = torch.einsum("hl,lhd->hd", p, v)
    return out
