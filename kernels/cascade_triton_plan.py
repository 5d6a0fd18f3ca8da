"""The Triton work list of one step: every group of a `CascadePlan` cut into uniform tiles.

A tile is up to BLOCK_Q queries of one segment against one split of that segment's keys. Tiles of
all groups go into one table, so the partial kernel is a single launch; the merge kernel reads, per
query, the list of its tiles (CSR, sorted by query). Long segments read by few queries are split
along their keys (flash-decoding) so the GPU has enough programs; splits cost one extra partial
per query each.

Built with tensor ops on the plan's device from shapes the host already knows: no device sync.
Built once per step (cached in `plan.derived`) and reused by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .plan import CascadeGroup, CascadePlan


@dataclass(frozen=True)
class TileLayout:
    """Tile geometry. Row r of a tile's [BLOCK_M, D] matrix is query slot r // rep, head r % rep."""

    rep: int  # query heads per KV head
    block_q: int  # queries per tile
    block_m: int  # rows of the tile matrix, a power of two >= block_q * rep


@dataclass(frozen=True)
class TritonWork:
    """Tensors the kernels read. W tiles, E partials; all int32 on the plan's device.

    block_table:   [sum_g S_g * B_g] every group's block table, flattened
    tile_q:        [W, block_q] query ids (num_queries marks padding)
    tile_limit:    [W, block_q] end of the keys each query sees in the segment
    tile_first:    [W, block_q] start of them (key j visible iff first <= j < limit)
    tile_table:    [W] offset of the tile's segment row in block_table
    tile_kv_start: [W] first key of the tile's split;  tile_kv_end: [W] one past its last key
    tile_pos:      [W] absolute position of the tile's segment's key 0 (ALiBi)
    merge_ptr:     [T + 1] query t's partials are merge_src[merge_ptr[t]:merge_ptr[t + 1]]
    merge_src:     [E] tile * block_q + slot of each partial
    """

    layout: TileLayout
    block_table: torch.Tensor
    tile_q: torch.Tensor
    tile_limit: torch.Tensor
    tile_first: torch.Tensor
    tile_table: torch.Tensor
    tile_kv_start: torch.Tensor
    tile_pos: torch.Tensor
    tile_kv_end: torch.Tensor
    merge_ptr: torch.Tensor
    merge_src: torch.Tensor

    @property
    def num_tiles(self) -> int:
        return self.tile_q.shape[0]


def tile_layout(rep: int, block_m: int) -> TileLayout:
    """`block_m` rows (a power of two), widened when one query's heads alone exceed it."""
    block_m = max(block_m, triton_next_pow2(rep))
    return TileLayout(rep=rep, block_q=block_m // rep, block_m=block_m)


def triton_next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _num_splits(group: CascadeGroup, tiles: int, min_programs: int, min_split: int) -> int:
    """Key splits of one group: enough programs to fill the device, splits >= min_split keys."""
    length = group.max_kv_len
    most = max(1, -(-length // min_split))
    wanted = max(1, -(-min_programs // max(tiles, 1)))
    return min(most, wanted)


def plan_triton_work(
    plan: CascadePlan, layout: TileLayout, kv_heads: int, min_programs: int, min_split: int
) -> TritonWork:
    """Cut every group of `plan` into tiles; see the module doc. min_split is a multiple of 16."""
    T, bq = plan.num_queries, layout.block_q
    device = plan.groups[0].q_index.device
    tables, tq, tlim, tfirst, ttab, tstart, tend, tpos, e_query, e_src = ([] for _ in range(10))
    table_base = tile_base = 0
    for g in plan.groups:
        if g.slot_table is not None:
            raise ValueError(
                "the Triton path reads block tables: plan without fused segments (plan.fuse)"
            )
        S, N = g.q_index.shape
        n_blocks = g.block_table.shape[1]
        qt = -(-N // bq)
        splits = _num_splits(g, S * qt * kv_heads, min_programs, min_split)
        split_len = _ceil_div(_ceil_div(g.max_kv_len, splits), 16) * 16
        # [S, N] -> [S, qt, bq]: pad to whole tiles with the scratch query and limit 0
        q_index = F.pad(g.q_index, (0, qt * bq - N), value=T).view(S, qt, bq)
        limit = F.pad(g.q_limit, (0, qt * bq - N), value=0).view(S, qt, bq)
        first = F.pad(g.q_first, (0, qt * bq - N), value=0).view(S, qt, bq)
        # a tile's keys start at its real queries' lowest first key (sliding windows)
        lowest = torch.where(q_index < T, first, g.max_kv_len).amin(-1)  # [S, qt]
        # tiles ordered (segment, split, query tile): tiles reading one key range run side by
        # side, so on a GPU the second reader of a key block finds it in L2.
        shape = (S, splits, qt)
        starts = torch.arange(splits, device=device) * split_len
        split_start = starts[None, :, None].expand(shape)
        kv_start = torch.maximum(split_start, lowest[:, None, :])
        kv_end = torch.minimum(split_start + split_len, limit.amax(-1)[:, None, :])
        row = table_base + torch.arange(S, device=device) * n_blocks
        tiles_q = q_index[:, None].expand(*shape, bq).reshape(-1, bq)
        tiles_limit = limit[:, None].expand(*shape, bq).reshape(-1, bq)
        tiles_first = first[:, None].expand(*shape, bq).reshape(-1, bq)
        tables.append(g.block_table.reshape(-1))
        tq.append(tiles_q)
        tlim.append(tiles_limit)
        tfirst.append(tiles_first)
        ttab.append(row[:, None, None].expand(shape).reshape(-1))
        tstart.append(kv_start.reshape(-1))
        tend.append(kv_end.reshape(-1))
        pos0 = g.kv_pos if g.kv_pos is not None else torch.zeros(S, dtype=torch.int64)
        tpos.append(pos0.to(device)[:, None, None].expand(shape).reshape(-1))
        # A partial whose split holds none of its query's visible keys (past its causal limit,
        # before its window) is empty: it sorts to the end with the padding (query id T), which
        # the merge never reads.
        n_tiles = S * splits * qt
        src = (tile_base + torch.arange(n_tiles, device=device))[:, None] * bq + torch.arange(
            bq, device=device
        )
        lo = torch.maximum(kv_start.reshape(-1, 1), tiles_first)
        useful = lo < torch.minimum(kv_end.reshape(-1, 1), tiles_limit)
        e_query.append(torch.where(useful, tiles_q, T).reshape(-1))
        e_src.append(src.reshape(-1))
        table_base += S * n_blocks
        tile_base += n_tiles
    query = torch.cat(e_query)
    order = torch.sort(query, stable=True).indices
    merge_ptr = torch.searchsorted(query[order], torch.arange(T + 1, device=device))

    def i32(parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(parts).to(torch.int32).contiguous()

    return TritonWork(
        layout=layout,
        block_table=i32(tables),
        tile_q=i32(tq),
        tile_limit=i32(tlim),
        tile_first=i32(tfirst),
        tile_table=i32(ttab),
        tile_kv_start=i32(tstart),
        tile_pos=i32(tpos),
        tile_kv_end=i32(tend),
        merge_ptr=merge_ptr.to(torch.int32),
        merge_src=torch.cat(e_src)[order].to(torch.int32).contiguous(),
    )
