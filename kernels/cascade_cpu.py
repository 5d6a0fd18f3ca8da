"""Cascade attention on the CPU: plain torch, each group one fused flash-attention call.

This is what `cascade_attention(impl="torch")` runs on CPU tensors; cascade_reference.py stays the
plain specification (and the torch path on other devices). Both are exact and tested against the
naive oracle.

The plain reference (cascade_reference.attend_group) writes each group's [N * rep, L] score matrix
to memory and passes over it several times; on a CPU that traffic, not arithmetic, sets its speed.
torch's CPU flash-attention kernel (`_scaled_dot_product_flash_attention_for_cpu`) tiles the same
computation in cache and also returns the log-sum-exp the cascade merge needs. It takes GQA as is
(fewer KV heads than query heads) and strided key/value views, so:

- a group of one segment whose blocks are consecutive in the pool (a prompt prefilled into a fresh
  pool) reads its keys and values in place, without a gather;
- other groups gather whole blocks (block-sized rows, not single slots) into a workspace kept with
  the plan: on this CPU (a VM) the page faults of a fresh multi-MB tensor cost more than the copy;
  groups of fused segments (a reader's private chain, plan.fuse) gather their key slots;
- a prefill group (each segment's queries are its last N keys, each seeing the keys up to its own)
  runs as the kernel's own causal case, which skips the hidden half instead of masking it: the
  keys before the queries in one unmasked call, the last N keys in one causal call, merged;
- other causal / ragged-length / sliding-window masks are an additive [S, 1, rep * N, L] tensor
  built once per plan, and none at all for groups where every query sees every key (decode);
- bf16 pools are read as they are (`compute_dtype`): the kernel accumulates in fp32 and returns an
  fp32 log-sum-exp, and partials merge in fp32; other dtypes run in fp32.

The per-group layout and the workspace are derived once per plan (cached in `plan.derived`) and
reused by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .plan import CascadeGroup, CascadePlan

_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
# Groups of at most SMALL_ROWS stacked queries per segment (a decode row's query heads of one KV
# head) over at most SMALL_KEYS keys run as plain batched products in fp32 (_attend_small), bf16
# pools' keys gathered into fp32 buffers: the flash kernel's per-(segment, head) set-up dominates
# there. Measured on this CPU, 2 threads, 128 segments x 2 KV heads x 4 rows, head dim 64: 2.1x
# faster at 16 keys, 1.8x at 64, 1.2x at 128, 1.08x at 192; with 16 rows the flash kernel is
# faster at every length (and in bf16, the flash kernel on bf16 keys is 2x slower than this).
SMALL_ROWS, SMALL_KEYS = 4, 128
# Prefill groups attend in chunks of this many queries (_attend_causal): in isolation 16-19%
# faster than one causal call on 2 x 1024 and 1 x 4096-token prompts here (8 query / 2 KV
# heads, head dim 64).
CAUSAL_CHUNK = 256


@dataclass(frozen=True)
class Workspace:
    """Buffers reused by every layer of a step. kv[g]: (K, V) gather buffers of group g, each
    [S * B, block_size * KVH * D] in compute_dtype, or None where the group is read in place."""

    kv: tuple[tuple[torch.Tensor, torch.Tensor] | None, ...]


@dataclass(frozen=True)
class GroupLayout:
    """How the fused path reads one group.

    first_slot: the group is one segment stored in pool slots [first_slot, first_slot + L), or None
    mask:       [S, 1, rep * N, L] fp32, 0 where visible, -inf where hidden; None if all visible
    causal_at:  set when the group is a prefill: every segment holds L keys and its query n sees
                keys [0, causal_at + n], so keys [0, causal_at) are seen by all and the last N
                form a causal square (then mask is None)
    small:      the group runs as plain fp32 products (SMALL_ROWS, SMALL_KEYS)
    """

    first_slot: int | None
    mask: torch.Tensor | None
    causal_at: int | None = None
    small: bool = False

    def dtype(self, pool_dtype: torch.dtype) -> torch.dtype:
        """The dtype this group reads keys and values in."""
        return torch.float32 if self.small else compute_dtype(pool_dtype)


def compute_dtype(pool_dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernel reads keys, values and queries in: bf16 pools as they are (the kernel
    accumulates in fp32 and returns an fp32 log-sum-exp; this CPU's bf16 products are 2-3x its
    fp32 ones), anything else in fp32 (fp16 products are ~400x slower than fp32 here)."""
    return torch.bfloat16 if pool_dtype == torch.bfloat16 else torch.float32


def fused_available(device: torch.device) -> bool:
    return device.type == "cpu" and _flash is not None


def group_layouts(plan: CascadePlan, rep: int = 1) -> tuple[GroupLayout, ...]:
    """The plan's layouts for `rep` query heads per KV head, derived on first use (one host read
    of the plan's index tensors)."""
    key = ("torch-cpu", rep)
    layouts = plan.derived.get(key)
    if layouts is None:
        layouts = tuple(_layout(g, plan.num_queries, plan.block_size, rep) for g in plan.groups)
        plan.derived[key] = layouts
    assert isinstance(layouts, tuple), f"plan.derived[{key}] holds {type(layouts)}"
    return layouts


def _layout(group: CascadeGroup, num_queries: int, block_size: int, rep: int) -> GroupLayout:
    L = group.max_kv_len
    first_slot = None
    if group.slot_table is None and group.block_table.shape[0] == 1:
        blocks = group.block_table[0, : -(-L // block_size)].tolist()
        if blocks == list(range(blocks[0], blocks[0] + len(blocks))):
            first_slot = blocks[0] * block_size
    # Padding queries (id num_queries) are discarded, so only real ones decide on a mask.
    real = group.q_index < num_queries
    n = group.q_index.shape[1]
    if n > 1 and bool(real.all()) and bool((group.kv_len == L).all()):
        causal = torch.arange(L - n + 1, L + 1, device=group.q_limit.device)
        if bool((group.q_limit == causal).all()) and not bool(group.q_first.any()):
            return GroupLayout(first_slot=first_slot, mask=None, causal_at=L - n)
    mask = None
    if bool((((group.q_limit < L) | (group.q_first > 0)) & real).any()):
        keys = torch.arange(L, device=group.q_limit.device)
        hidden = (keys >= group.q_limit[:, :, None]) | (keys < group.q_first[:, :, None])
        mask = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        # [S, N, L] -> [S, 1, rep * N, L]: row r * N + n is query n's (heads stack, see below)
        mask = mask.masked_fill_(hidden, float("-inf")).repeat(1, rep, 1)[:, None]
    small = rep * n <= SMALL_ROWS and L <= SMALL_KEYS
    return GroupLayout(first_slot=first_slot, mask=mask, small=small)


def _workspace(plan: CascadePlan, layouts: tuple[GroupLayout, ...],
               pool: torch.Tensor) -> Workspace:
    key = ("torch-cpu-workspace", tuple(pool.shape), pool.dtype)
    ws = plan.derived.get(key)
    if ws is None:
        kv = []
        for group, layout in zip(plan.groups, layouts, strict=True):
            work = layout.dtype(pool.dtype)
            in_place = layout.first_slot is not None and pool.dtype == work
            if group.slot_table is not None:  # one row per key slot
                n, row = group.slot_table.numel(), pool.shape[1] * pool.shape[2]
            else:  # one row per block
                n, row = group.block_table.numel(), plan.block_size * pool.shape[1] * pool.shape[2]
            kv.append(None if in_place else (torch.empty(n, row, dtype=work),
                                             torch.empty(n, row, dtype=work)))
        ws = Workspace(tuple(kv))
        plan.derived[key] = ws
    assert isinstance(ws, Workspace), f"plan.derived[{key}] holds {type(ws)}"
    return ws


def _segment_kv(pool: torch.Tensor, group: CascadeGroup, block_size: int,
                first_slot: int | None, buf: torch.Tensor | None) -> torch.Tensor:
    """[S, KVH, L, D] keys (or values) of the group's segments, in compute_dtype: a view of the
    pool or `buf`."""
    L = group.max_kv_len
    if buf is None:
        assert first_slot is not None, "a group gathered into no buffer must be read in place"
        kv = pool[first_slot : first_slot + L][None]  # [1, L, KVH, D], no copy
    else:
        if group.slot_table is not None:  # fused segments: gather key slots
            S, B, unit = group.slot_table.shape[0], group.slot_table.shape[1], 1
            index = group.slot_table.reshape(-1)
        else:  # gather whole blocks
            (S, B), unit = group.block_table.shape, block_size
            index = group.block_table.reshape(-1)
        rows = pool.view(pool.shape[0] // unit, -1)  # [num_slots / unit, unit * KVH * D]
        if pool.dtype == buf.dtype:
            torch.index_select(rows, 0, index, out=buf)
        else:
            buf.copy_(rows.index_select(0, index))
        kv = buf.view(S, B * unit, *pool.shape[1:])[:, :L]  # [S, L, KVH, D]
    return kv.transpose(1, 2)


def attend_group_fused(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    group: CascadeGroup,
    block_size: int,
    scale: float,
    layout: GroupLayout,
    bufs: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as cascade_reference.attend_group: (out [S, N, H, D], lse [S, N, H] fp32),
    out in q's dtype or fp32.

    q: [T + 1, H, D] in compute_dtype (row T is the scratch row padding points at)
    pools: [slots, KVH, D]
    bufs: (K, V) gather buffers from the workspace; None reads the pool in place
    """
    assert _flash is not None, "torch has no CPU flash-attention kernel; use attend_group"
    S, N = group.q_index.shape
    h, d = q.shape[1:]
    kvh = k_pool.shape[1]
    rep = h // kvh
    k = _segment_kv(k_pool, group, block_size, layout.first_slot, bufs and bufs[0])
    v = _segment_kv(v_pool, group, block_size, layout.first_slot, bufs and bufs[1])
    if layout.causal_at is not None:
        return _attend_causal(q, k, v, group.q_index, layout.causal_at, scale)
    # The query heads of one KV head stack into one matrix (GQA): each key block then feeds
    # rep * N rows at once. [S * N, H, D] -> [S, KVH, rep * N, D], row r * N + n.
    qs = q.index_select(0, group.q_index.reshape(-1)).view(S, N, kvh, rep, d)
    qs = qs.permute(0, 2, 3, 1, 4).reshape(S, kvh, rep * N, d)
    # NOTE: a fully masked row would come back with lse 0, not -inf; none occurs: the plan keeps
    # a (query, segment) pair only where the query sees at least one key (q_first < q_limit).
    if layout.small:
        out, lse = _attend_small(qs.to(k.dtype), k, v, attn_mask=layout.mask, scale=scale)
    else:
        out, lse = _flash(qs, k, v, attn_mask=layout.mask, scale=scale)  # [S, KVH, rep*N, (D)]
    out = out.view(S, kvh, rep, N, d).permute(0, 3, 1, 2, 4).reshape(S, N, h, d)
    lse = lse.view(S, kvh, rep, N).permute(0, 3, 1, 2).reshape(S, N, h)
    return out, lse


def _attend_small(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """_flash's contract for small fp32 groups (SMALL_ROWS, SMALL_KEYS), one KV head at a time:
    scores, softmax and values as batched matrix products over the segments. q [S, KVH, M, D],
    k/v [S, KVH, L, D] (strided views), mask [S, 1, M, L] or None; returns out [S, KVH, M, D]
    and lse [S, KVH, M]."""
    S, kvh, M, d = q.shape
    out, lse = q.new_empty(kvh, S, M, d), q.new_empty(kvh, S, M)  # head-major: bmm writes in place
    for h in range(kvh):
        keys = k[:, h].transpose(1, 2)
        if attn_mask is None:
            s = torch.bmm(q[:, h], keys).mul_(scale)
        else:
            s = torch.baddbmm(attn_mask[:, 0], q[:, h], keys, alpha=scale)
        top = s.amax(-1, keepdim=True)
        p = s.sub_(top).exp_()
        total = p.sum(-1, keepdim=True)
        torch.bmm(p, v[:, h], out=out[h])
        out[h].div_(total)
        torch.add(top, total.log_(), out=lse[h, :, :, None])
    return out.transpose(0, 1), lse.transpose(0, 1)


def _attend_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_index: torch.Tensor,
                   at: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A prefill group (GroupLayout.causal_at): keys [0, at) unmasked, the last N causally.

    The queries go in chunks of CAUSAL_CHUNK. Chunk [c, c + n) sees keys [0, at + c) unmasked:
    one call with the query heads of each KV head stacked (rep * n rows, as in decode groups);
    and its own n keys causally: the kernel's causal case aligns query j with key j, so it gets
    those keys only, and its heads stay unstacked (stacked rows would misalign it). The two
    partials merge by log-sum-exp. One causal call over all N queries would compute the hidden
    half of its large blocks and read each KV head once per query head."""
    S, N = q_index.shape
    h, d = q.shape[1:]
    kvh = k.shape[1]
    qs = q.index_select(0, q_index.reshape(-1)).view(S, N, h, d).transpose(1, 2)  # [S, H, N, D]
    out = torch.empty(S, h, N, d)
    lse = torch.empty(S, h, N)
    for c in range(0, N, CAUSAL_CHUNK):
        n = min(CAUSAL_CHUNK, N - c)
        qc = qs[:, :, c : c + n]
        keys = slice(at + c, at + c + n)
        o, l = _flash(qc, k[:, :, keys], v[:, :, keys], is_causal=True, scale=scale)
        if at + c:
            stacked = qc.reshape(S, kvh, h // kvh * n, d)  # head kv * rep + r -> row r * n + j
            o_a, l_a = _flash(stacked, k[:, :, : at + c], v[:, :, : at + c], scale=scale)
            o, l = merge(o_a.float().reshape(S, h, n, d), l_a.reshape(S, h, n), o, l)
        out[:, :, c : c + n] = o
        lse[:, :, c : c + n] = l
    return out.transpose(1, 2), lse.transpose(1, 2)  # [S, N, H, D], [S, N, H]


def cascade_attention_cpu(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    plan: CascadePlan,
    scale: float,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Same contract as cascade_reference.cascade_attention_torch, on CPU tensors.

    q: [T, H, D];  pools: [slots, KVH, D];  returns out [T, H, D] in q's dtype (and lse [T, H] fp32)
    """
    T, h, d = q.shape
    assert T == plan.num_queries, f"plan is for {plan.num_queries} queries, got {T}"
    work = compute_dtype(k_pool.dtype)
    qf = torch.cat([q.to(work), q.new_zeros(1, h, d, dtype=work)])
    layouts = group_layouts(plan, h // k_pool.shape[1])
    ws = _workspace(plan, layouts, k_pool)
    acc_out = torch.zeros(T + 1, h, d)
    acc_lse = torch.full((T + 1, h), float("-inf"))
    for i, (group, layout, bufs) in enumerate(zip(plan.groups, layouts, ws.kv, strict=True)):
        out, lse = attend_group_fused(
            qf, k_pool, v_pool, group, plan.block_size, scale, layout, bufs
        )
        index, out, lse = group.q_index.reshape(-1), out.reshape(-1, h, d), lse.reshape(-1, h)
        if i == 0:  # nothing to merge with yet (a group holds each query once)
            acc_out.index_copy_(0, index, out.float())
            acc_lse.index_copy_(0, index, lse)
        else:
            merge_into(acc_out, acc_lse, index, out, lse)
    result = acc_out[:T].to(q.dtype)
    return (result, acc_lse[:T]) if return_lse else result


def merge_into(acc_out: torch.Tensor, acc_lse: torch.Tensor, index: torch.Tensor,
               out: torch.Tensor, lse: torch.Tensor) -> None:
    """Merge partials (out [M, H, D], lse [M, H]) into the accumulators' rows `index` [M].

    Exact (METHODS.md): lse' = logaddexp(lse_a, lse),
                        O'   = exp(lse_a - lse') O_a + exp(lse - lse') O.

    Each index appears once, the scratch row excepted (its value is discarded).
    """
    # finite lse: every real query attends in every group it is in
    merged, new = merge(acc_out.index_select(0, index), acc_lse.index_select(0, index), out, lse)
    acc_out.index_copy_(0, index, merged)
    acc_lse.index_copy_(0, index, new)


def merge(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
          lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two partials of the same queries merged exactly (see merge_into); out_a is fp32 and
    scaled in place. Heads are the last dimension of the lse, before D of the outputs."""
    lse = torch.logaddexp(lse_a, lse_b)
    out = out_a.mul_(torch.exp(lse_a - lse)[..., None])
    out.add_(out_b * torch.exp(lse_b - lse)[..., None])
    return out, lse
