"""Cascade attention on the CPU: plain torch, each group one fused flash-attention call.

This is what `cascade_attention(impl="torch")` runs on CPU tensors; cascade_reference.py stays the
plain specification (and the torch path on other devices). Both are exact and tested against the
naive oracle.

The plain reference (cascade_reference.attend_group) writes each group's [N * rep, L] score matrix
to memory and passes over it several times; on a CPU that traffic, not arithmetic, sets its speed.
torch's CPU flash-attention kernel (`_scaled_dot_product_flash_attention_for_cpu`) tiles the same
computation in cache and also returns the log-sum-exp the cascade merge needs. It takes GQA as is
(fewer KV heads than query heads) and strided key/value views, so:

- a group whose segments' blocks are consecutive and evenly spaced in the pool (prompts prefilled
  together into free blocks: the pool hands out its lowest free ids) reads its keys and values
  in place, without a gather;
- the other groups' keys and values, and every group's stacked queries, come from one gather per
  tensor and layer into buffers kept with the plan (cascade_cpu_schedule.py: on this CPU, a VM,
  the page faults of a fresh multi-MB tensor cost more than the copy, and each op costs a few
  microseconds of host time, as much as a small group's arithmetic);
- a prefill group (each segment's queries are its last N keys, each seeing the keys up to its own)
  runs as the kernel's own causal case, which skips the hidden half instead of masking it: the
  keys before the queries in one unmasked call, the last N keys in one causal call, merged;
- other causal / ragged-length / sliding-window masks are an additive [S, 1, rep * N, L] tensor
  built once per plan, and none at all for groups where every query sees every key (decode);
- groups of at most NATIVE_KEYS keys and NATIVE_WORK stacked rows x keys per segment (a decode
  step's inner levels and each branch's own keys) run on the native op (cascade_cpu_native.py):
  from the pool in place, in fp32 whatever the pool's dtype, merged into the accumulators in
  place after the other groups' merge. With bf16 pools on a CPU with AMX, the op takes every
  decode group, the shared prompts too, most of them on its AMX tiles (attention_amx.cpp,
  cascade_cpu_schedule.TILE_ROWS). Where it is not built, small decode groups run as fp32
  batched products over their segments (_attend_small) and the rest on the flash kernel;
- bf16 pools are read as they are (`compute_dtype`): the kernel accumulates in fp32 and returns an
  fp32 log-sum-exp, and partials merge in fp32; other dtypes run in fp32;
- all groups' partials merge in one pass (merge_all), not group after group.
"""

from __future__ import annotations

import torch

from .cascade_cpu_native import NATIVE_LANES, amx_attention, native_op
from .cascade_cpu_schedule import GroupLayout, GroupRun, compute_dtype, group_layouts, schedule
from .plan import CascadeGroup, CascadePlan

__all__ = ["CAUSAL_CHUNK", "cascade_attention_cpu", "fused_available", "group_layouts"]

_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
# Prefill groups attend in chunks of this many queries (_attend_causal). On an AMD EPYC (2
# threads, 8 query / 2 KV heads of 64), chunks of 256 were 16-19% faster than one causal call
# on 2 x 1024 and 1 x 4096-token prompts, in isolation; on an Intel Xeon with AMX, whole peer
# runs with chunks of 256 were 7-9% slower on the 4096-token prompt than one call (fp32 and bf16)
# and chunks of 1024 within 1% of it. 1024 keeps long prompts chunked and short ones whole.
CAUSAL_CHUNK = 1024


def fused_available(device: torch.device) -> bool:
    return device.type == "cpu" and _flash is not None


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in `dtype`; x itself when it is (a decode step pays per op, even a no-op `.to`)."""
    return x if x.dtype == dtype else x.to(dtype)


def _pool_kv(pool: torch.Tensor, layout: GroupLayout, segments: int,
             length: int) -> torch.Tensor:
    """[S, KVH, L, D] a view of the pool: segment s's keys at slots first_slot + s *
    slot_stride + [0, L) (GroupLayout)."""
    _, kvh, d = pool.shape
    slot, head, dim = pool.stride()
    assert layout.first_slot is not None, "a group read in place needs its first slot"
    return pool.as_strided(
        (segments, kvh, length, d), (layout.slot_stride * slot, head, slot, dim),
        pool.storage_offset() + layout.first_slot * slot,
    )


def attend_group_rows(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, group: CascadeGroup,
    run: GroupRun, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One group's partial attention as rows: (out [R, D] fp32 or the pool's bf16, lse [R]
    fp32), in the order of the group's part of Schedule.dest.

    q: [T, H, D] the layer's queries in compute_dtype (prefill groups gather from it; the
    others read run.q, filled by this layer's query gather)
    """
    assert _flash is not None, "torch has no CPU flash-attention kernel (fused_available)"
    layout, L, d = run.layout, group.max_kv_len, q.shape[2]
    k, v = run.k, run.v
    if k is None:
        S = group.q_index.shape[0]
        k, v = _pool_kv(k_pool, layout, S, L), _pool_kv(v_pool, layout, S, L)
    if layout.causal_at is not None:
        out, lse = _attend_causal(q, k, v, group.q_index, layout.causal_at, scale)
    elif layout.small:
        out, lse = _attend_small(run.q, k, v, layout.mask, scale)
    else:
        # NOTE: a fully masked row would come back with lse 0, not -inf; none occurs: the plan
        # keeps a (query, segment) pair only where the query sees at least one key.
        out, lse = _flash(run.q, k, v, attn_mask=layout.mask, scale=scale)
    return out.reshape(-1, d), lse.reshape(-1)


def _attend_small(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """_flash's contract for small fp32 groups (SMALL_ROWS, SMALL_KEYS), one KV head at a time:
    scores, softmax and values as batched matrix products over the segments. q [S, KVH, M, D],
    k/v [S, KVH, L, D] (strided views), mask [S, 1, M, L] or None; returns out [KVH, S, M, D]
    and lse [KVH, S, M], head-major (bmm writes each head in place; batching over heads too
    would need a head-major copy of the keys, and measured slower)."""
    S, kvh, M, d = q.shape
    out, lse = q.new_empty(kvh, S, M, d), q.new_empty(kvh, S, M)
    for h in range(kvh):
        keys = k[:, h].transpose(1, 2)
        if mask is None:
            s = torch.bmm(q[:, h], keys).mul_(scale)
        else:
            s = torch.baddbmm(mask[:, 0], q[:, h], keys, alpha=scale)
        top = s.amax(-1, keepdim=True)
        p = s.sub_(top).exp_()
        total = p.sum(-1, keepdim=True)
        torch.bmm(p, v[:, h], out=out[h])
        out[h].div_(total)
        torch.add(top, total.log_(), out=lse[h, :, :, None])
    return out, lse


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
    return out, lse  # [S, H, N, D], [S, H, N]


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
    native = native_op() if d % NATIVE_LANES == 0 else None  # head dims of whole vectors
    wide = native is not None and k_pool.dtype == torch.bfloat16 and amx_attention(d)
    sched = schedule(plan, h, k_pool, native=native is not None, wide=wide)
    # 1. This layer's gathers: every group's stacked queries, every gathered group's keys.
    work = _as(q, compute_dtype(k_pool.dtype))
    for dtype, index, buf in sched.q_gathers:
        torch.index_select(_as(q, dtype).reshape(T * h, d), 0, index, out=buf)
    for g in sched.gathers:
        for pool, buf in ((k_pool, g.k), (v_pool, g.v)):
            rows = pool.view(-1, buf.shape[1])
            if pool.dtype == buf.dtype:
                torch.index_select(rows, 0, g.index, out=buf)
            else:
                buf.copy_(rows.index_select(0, g.index))
    # 2. Each torch group's partials, then one merge.
    pairs = list(zip(plan.groups, sched.groups, strict=True))
    parts = [attend_group_rows(work, k_pool, v_pool, group, run, scale)
             for group, run in pairs if not run.layout.native]
    if len(parts) == 1 and native is not None:  # each row at most once: one native pass
        (part, part_lse), = parts
        out, lse = torch.ops.tree_kernels_cpu.scatter_partials(part, part_lse, sched.dest,
                                                               (T + 1) * h)
    elif parts:
        out, lse = merge_all(parts, sched.dest, (T + 1) * h)
    else:
        out, lse = q.new_zeros((T + 1) * h, d, dtype=torch.float32), q.new_full(
            ((T + 1) * h,), float("-inf"), dtype=torch.float32)
    # 3. The native groups attend from the pool and merge into those accumulators in place.
    rows = work if work.stride(2) == 1 else work.contiguous()
    for group, run in pairs:
        if run.layout.native:
            native(out, lse, rows, k_pool, v_pool, run.slots, group.q_index, group.q_first,
                   group.q_limit, scale, run.layout.tiles)
    result = _as(out[: T * h].view(T, h, d), q.dtype)
    return (result, lse[: T * h].view(T, h)) if return_lse else result


def merge_all(parts: list[tuple[torch.Tensor, torch.Tensor]], dest: torch.Tensor,
              rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Partials (out [R_i, D] fp32 or bf16, lse [R_i] fp32) of several groups merged exactly
    into `rows` fp32 rows: partial row j lands in row dest[j] (rows concatenated in order).

    Exact (METHODS.md, the log-sum-exp merge of any number of partials):
        lse = m + log(sum_j exp(lse_j - m)),  O = sum_j exp(lse_j - lse) O_j,  m = max_j lse_j.
    Every real row gets at least one partial (its own segment); rows with none (scratch) come
    back as 0 / 0 and are discarded by the caller.
    """
    if len(parts) == 1:  # each row at most once: a permutation
        (out, lse), = parts
        acc = lse.new_zeros(rows, out.shape[1]).index_copy_(0, dest, _as(out, torch.float32))
        return acc, lse.new_full((rows,), float("-inf")).index_copy_(0, dest, lse)
    outs = torch.cat([_as(o, torch.float32) for o, _ in parts])
    lses = torch.cat([s for _, s in parts])
    top = lses.new_full((rows,), float("-inf")).scatter_reduce_(0, dest, lses, "amax")
    weight = (lses - top[dest]).exp_()
    acc = outs.new_zeros(rows, outs.shape[1]).index_add_(0, dest, outs.mul_(weight[:, None]))
    total = weight.new_zeros(rows).index_add_(0, dest, weight)
    return acc.div_(total[:, None]), top.add_(total.log_())


def merge(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
          lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two partials of the same queries merged exactly (see merge_all); out_a is fp32 and
    scaled in place. Heads are the last dimension of the lse, before D of the outputs."""
    lse = torch.logaddexp(lse_a, lse_b)
    out = out_a.mul_(torch.exp(lse_a - lse)[..., None])
    out.add_(out_b * torch.exp(lse_b - lse)[..., None])
    return out, lse
