"""What the CPU cascade path derives from a step's plan once, so that each layer runs few ops.

A decode step of a deep tree has several groups (prompt, each inner level, the leaves' own keys)
and the model has many layers; one Python-level op costs a few microseconds here, as much as the
arithmetic of a small group. So everything that does not depend on the layer's tensors is built
once per plan and cached in `plan.derived`:

- every group's stacked queries (`GroupLayout`: the query heads of one KV head stacked, row
  r * N + n) come from ONE gather of the layer's [T * H, D] query rows, into a buffer whose
  per-group views are made here;
- every gathered group's keys and values come from one gather per pool and dtype, by pool slot
  ([S, L, KVH, D], read as strided [S, KVH, L, D] views: per-slot rows gather as fast as whole
  blocks here, and a copy into a head-major layout costs more than it saves);
- every partial output row has a destination row of the [(T + 1) * H] accumulators (row T * H + h
  is the scratch row padding lands in), so all groups merge in one pass (cascade_cpu.merge_all).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .plan import CascadeGroup, CascadePlan

# Groups of at most SMALL_ROWS stacked queries per segment (a decode row's query heads of one KV
# head) over at most SMALL_KEYS keys run as plain batched products in fp32 (_attend_small), bf16
# pools' keys gathered into fp32 buffers: the flash kernel's per-(segment, head) set-up dominates
# there. Measured on this CPU, 2 threads, 128 segments x 2 KV heads x 4 rows, head dim 64: 2.1x
# faster at 16 keys, 1.8x at 64, 1.2x at 128, 1.08x at 192; with 16 rows the flash kernel is
# faster at every length (and in bf16, the flash kernel on bf16 keys is 2x slower than this).
SMALL_ROWS, SMALL_KEYS = 4, 128
# Groups of at most NATIVE_KEYS keys and NATIVE_WORK stacked rows x keys per segment (a decode
# step's inner levels and each branch's own keys) run on the native op when it is built
# (cascade_cpu_native.py): straight from the pool, merged in place, one call per group and
# layer. Larger ones (shared prompts) keep the flash kernel, whose blocked products (AMX tiles
# in bf16 where the CPU has them) win once there is arithmetic to amortize. Measured on an
# Intel Xeon with AMX, 2 threads, 8 query / 2 KV heads of 64, flash timed with its gather:
# 128 segments x 1 query: native 2.4x faster at 32 keys, 1.8x at 128, 2.3x at 256 (fp32);
# 8 segments x 16 queries: even at 32 keys, flash 2.3x faster at 128 keys in bf16.
NATIVE_KEYS, NATIVE_WORK = 256, 4096
# With `wide` (bf16 pools, a CPU with AMX: cascade_cpu_native.amx_attention), the native op takes
# every decode group, on AMX tiles (attention_amx.cpp) where a segment has at least TILE_ROWS
# stacked rows or more than TILE_KEYS keys, else on its fp32 vector path. Measured on a 2-core
# Xeon with AMX, 8 query / 2 KV heads of 64, median us of one call (tiles / vector path / the
# flash kernel alone, without the gather and merge it needs): 2 prompts x 4 queries x 1024 keys
# 86 / 227 / 104, x 16 queries 166 / 754 / 212, x 64 queries 498 / 2838 / 538; 1 x 64 x 4096
# 960 / 16761 / 1142; 8 segments x 16 queries x 32 keys 63 / 114 / 110, 32 x 4 x 32 85 / 126 /
# 114, 8 x 4 x 128 58 / 108 / 80; 128 x 1 x 32 (4 rows a segment) 214 / 170 / 248.
TILE_ROWS, TILE_KEYS = 8, 128


@dataclass(frozen=True)
class GroupLayout:
    """How the fused path reads one group.

    first_slot: segment s of the group is stored in pool slots first_slot + s * slot_stride +
                [0, L) (read in place), or None
    mask:       [S, 1, rep * N, L] fp32, 0 where visible, -inf where hidden; None if all visible
    causal_at:  set when the group is a prefill: every segment holds L keys and its query n sees
                keys [0, causal_at + n], so keys [0, causal_at) are seen by all and the last N
                form a causal square (then mask is None)
    small:      the group runs as plain fp32 products (SMALL_ROWS, SMALL_KEYS)
    native:     the group runs on the native op (NATIVE_KEYS, NATIVE_WORK), from the pool,
                merged in place
    tiles:      ... on its AMX tiles (TILE_ROWS, TILE_KEYS): bf16 numerators, not fp32
    """

    first_slot: int | None
    mask: torch.Tensor | None
    causal_at: int | None = None
    small: bool = False
    slot_stride: int = 0
    native: bool = False
    tiles: bool = False

    def dtype(self, pool_dtype: torch.dtype) -> torch.dtype:
        """The dtype this group reads keys, values and queries in."""
        return torch.float32 if self.small else compute_dtype(pool_dtype)


def compute_dtype(pool_dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernel reads keys, values and queries in: bf16 pools as they are (the kernel
    accumulates in fp32 and returns an fp32 log-sum-exp; this CPU's bf16 products are 2-3x its
    fp32 ones), anything else in fp32 (fp16 products are ~400x slower than fp32 here)."""
    return torch.bfloat16 if pool_dtype == torch.bfloat16 else torch.float32


def group_layouts(plan: CascadePlan, rep: int = 1, native: bool = False,
                  wide: bool = False) -> tuple[GroupLayout, ...]:
    """The plan's layouts for `rep` query heads per KV head, derived on first use (one host read
    of the plan's index tensors); `native`: small groups may run on the native op; `wide`: every
    group but prefills does (its AMX path, bf16 pools)."""
    key = ("torch-cpu", rep, native, wide)
    layouts = plan.derived.get(key)
    if layouts is None:
        layouts = tuple(
            _layout(g, plan.num_queries, plan.block_size, rep, native, wide)
            for g in plan.groups
        )
        plan.derived[key] = layouts
    assert isinstance(layouts, tuple), f"plan.derived[{key}] holds {type(layouts)}"
    return layouts


def _in_place(group: CascadeGroup, block_size: int) -> tuple[int, int] | None:
    """(first slot, slot stride) when segment s's keys are the pool slots first + s * stride +
    [0, L): each segment's blocks consecutive, the segments evenly spaced (a group of prompts
    prefilled together into free blocks); None otherwise."""
    if group.slot_table is not None:
        return None
    blocks = group.block_table[:, : -(-group.max_kv_len // block_size)]  # [S, B]
    first = blocks[:, :1]
    stride = int(first[1, 0] - first[0, 0]) if blocks.shape[0] > 1 else 0
    expect = first[0, 0] + stride * torch.arange(blocks.shape[0])[:, None] + torch.arange(
        blocks.shape[1])
    if stride < 0 or not bool((blocks == expect).all()):
        return None
    return int(first[0, 0]) * block_size, stride * block_size


def _causal_square(group: CascadeGroup, num_queries: int) -> bool:
    """A prefill group: every segment holds L keys, no padding, and its query n sees keys
    [0, L - N + n] (GroupLayout.causal_at)."""
    L, n = group.max_kv_len, group.q_index.shape[1]
    if not (bool((group.q_index < num_queries).all()) and bool((group.kv_len == L).all())):
        return False
    causal = torch.arange(L - n + 1, L + 1, device=group.q_limit.device)
    return bool((group.q_limit == causal).all()) and not bool(group.q_first.any())


def _layout(group: CascadeGroup, num_queries: int, block_size: int, rep: int, native: bool,
            wide: bool) -> GroupLayout:
    L = group.max_kv_len
    n = group.q_index.shape[1]
    prefill = n > 1 and _causal_square(group, num_queries)
    small = L <= NATIVE_KEYS and rep * n * L <= NATIVE_WORK
    if native and (wide or small) and not prefill:
        tiles = wide and (rep * n >= TILE_ROWS or L > TILE_KEYS)
        return GroupLayout(None, None, native=True, tiles=tiles)
    place = _in_place(group, block_size)
    first_slot, slot_stride = place if place is not None else (None, 0)
    if prefill:
        return GroupLayout(first_slot, None, causal_at=L - n, slot_stride=slot_stride)
    # Padding queries (id num_queries) are discarded, so only real ones decide on a mask.
    real = group.q_index < num_queries
    mask = None
    if bool((((group.q_limit < L) | (group.q_first > 0)) & real).any()):
        keys = torch.arange(L, device=group.q_limit.device)
        hidden = (keys >= group.q_limit[:, :, None]) | (keys < group.q_first[:, :, None])
        mask = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        # [S, N, L] -> [S, 1, rep * N, L]: row r * N + n is query n's (heads stack, see below)
        mask = mask.masked_fill_(hidden, float("-inf")).repeat(1, rep, 1)[:, None]
    small = rep * n <= SMALL_ROWS and L <= SMALL_KEYS
    return GroupLayout(first_slot, mask, small=small, slot_stride=slot_stride)


@dataclass(frozen=True)
class Gather:
    """One index_select per pool and layer: slots `index` of the pool viewed as [slots, KVH * D]
    into `k` and `v` ([len(index), KVH * D] in the dtype its groups read)."""

    index: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


@dataclass(frozen=True)
class GroupRun:
    """One group's inputs for every layer of the step.

    q:    [S, KVH, rep * N, D] view of a query buffer (None for prefill groups, which gather
          their own queries in chunks)
    k, v: [S, KVH, L, D] strided views of a Gather's buffers; None when the group reads the
          pool in place (layout.first_slot)
    slots: [S, L] contiguous pool slot of each segment's key, for native groups (the op reads
          the pool and the layer's queries itself; q, k, v are None)
    """

    layout: GroupLayout
    q: torch.Tensor | None
    k: torch.Tensor | None
    v: torch.Tensor | None
    slots: torch.Tensor | None = None


@dataclass(frozen=True)
class Schedule:
    """A plan's CPU work. q_gathers: (dtype, rows of q.view(T * H, D), buffer) per query dtype;
    dest: [R] the accumulator row of each partial output row, groups concatenated in order
    (flash groups' rows ordered (s, kv head, r * N + n), small groups' (kv head, s, r * N + n),
    prefill groups' (s, h, n); native groups add none: they merge in place)."""

    groups: tuple[GroupRun, ...]
    q_gathers: tuple[tuple[torch.dtype, torch.Tensor, torch.Tensor], ...]
    gathers: tuple[Gather, ...]
    dest: torch.Tensor


def schedule(plan: CascadePlan, heads: int, pool: torch.Tensor,
             native: bool = False, wide: bool = False) -> Schedule:
    """The plan's Schedule for `heads` query heads over pools shaped and typed like `pool`
    ([slots, KVH, D]), derived on first use; `native`: the native op may take small groups
    (fp32 and bf16 pools); `wide`: every decode group (group_layouts)."""
    native = native and pool.dtype in (torch.float32, torch.bfloat16)
    wide = wide and native
    key = ("torch-cpu-schedule", heads, tuple(pool.shape), pool.dtype, native, wide)
    found = plan.derived.get(key)
    if found is None:
        found = _schedule(plan, heads, pool, native, wide)
        plan.derived[key] = found
    assert isinstance(found, Schedule), f"plan.derived[{key}] holds {type(found)}"
    return found


def _schedule(plan: CascadePlan, heads: int, pool: torch.Tensor, native: bool,
              wide: bool) -> Schedule:
    _, kvh, d = pool.shape
    rep = heads // kvh
    T = plan.num_queries
    layouts = group_layouts(plan, rep, native, wide)
    head = torch.arange(heads).view(kvh, rep, 1)  # query head kv * rep + r
    # 1. What each group reads: query rows (by dtype), key slots (by gather) and where its
    #    output rows go.
    q_rows: dict[torch.dtype, list[torch.Tensor]] = {}
    kv_rows: dict[torch.dtype, list[torch.Tensor]] = {}
    reads, dest = [], []
    for group, layout in zip(plan.groups, layouts, strict=True):
        qi = group.q_index
        if layout.native:
            reads.append(None)
            continue
        if layout.causal_at is not None:
            dest.append((qi[:, None, :] * heads + head.view(1, heads, 1)).reshape(-1))
        else:  # row (s, kv, r * N + n) is query qi[s, n]'s head kv * rep + r
            rows = qi[:, None, None, :] * heads + head  # [S, KVH, rep, N]
            # small groups' outputs come head-major: (kv, s, r * N + n)
            dest.append((rows.transpose(0, 1) if layout.small else rows).reshape(-1))
            src = (qi.clamp(max=T - 1)[:, None, None, :] * heads + head).reshape(-1)
            q_rows.setdefault(layout.dtype(pool.dtype), []).append(src)
        work = layout.dtype(pool.dtype)
        in_place = layout.first_slot is not None and not layout.small and pool.dtype == work
        read = None
        if not in_place:
            ids = _slot_ids(group, plan.block_size).reshape(-1)  # [S * L]
            parts = kv_rows.setdefault(work, [])
            read = (work, sum(r.numel() for r in parts), ids.numel())
            parts.append(ids)
        reads.append(read)
    # 2. The buffers, one per query dtype and per gather, and each group's views of them.
    q_gathers, q_views = [], {}
    for dtype, parts in q_rows.items():
        index = torch.cat(parts)
        buf = torch.empty(index.numel(), d, dtype=dtype)
        q_gathers.append((dtype, index, buf))
        q_views[dtype] = buf
    gathers, kv_bufs = [], {}
    for dtype, parts in kv_rows.items():
        index = torch.cat(parts)
        g = Gather(index, torch.empty(index.numel(), kvh * d, dtype=dtype),
                   torch.empty(index.numel(), kvh * d, dtype=dtype))
        gathers.append(g)
        kv_bufs[dtype] = g
    runs, q_used = [], dict.fromkeys(q_views, 0)
    for group, layout, read in zip(plan.groups, layouts, reads, strict=True):
        S, N = group.q_index.shape
        L, M = group.max_kv_len, rep * N
        q = k = v = None
        if layout.native:
            runs.append(GroupRun(layout, None, None, None,
                                 _slot_ids(group, plan.block_size).contiguous()))
            continue
        if layout.causal_at is None:
            dtype = layout.dtype(pool.dtype)
            at = q_used[dtype]
            q = q_views[dtype][at : at + S * M * kvh].view(S, kvh, M, d)
            q_used[dtype] = at + S * M * kvh
        if read is not None:
            g, at, n = kv_bufs[read[0]], read[1], read[2]
            k, v = (b[at : at + n].view(S, L, kvh, d).transpose(1, 2) for b in (g.k, g.v))
        runs.append(GroupRun(layout, q, k, v))
    dest_rows = torch.cat(dest) if dest else torch.empty(0, dtype=torch.int64)
    return Schedule(tuple(runs), tuple(q_gathers), tuple(gathers), dest_rows)


def _slot_ids(group: CascadeGroup, block_size: int) -> torch.Tensor:
    """[S, L] the pool slot of each segment's key l (padding past a segment's length repeats
    valid slots; the mask or the kv length hides them)."""
    L = group.max_kv_len
    if group.slot_table is not None:
        return group.slot_table[:, :L]
    pos = torch.arange(L)
    return group.block_table[:, pos // block_size] * block_size + pos % block_size
