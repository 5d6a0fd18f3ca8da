"""Triton `@jit` code of cascade attention: one partial kernel, one merge kernel.

The partial kernel runs every *tile* of a step's work list (cascade_triton_plan.py) in one launch:
a tile is up to BLOCK_Q queries of one segment against a range of that segment's keys, read straight
from the paged pool through the segment's block table. The tile's queries and the REP query heads
of one KV head stack into one [BLOCK_M, D] matrix, so each key block loaded feeds one real matrix
product (Hydragen's inter-sequence batching; GQA heads stack the same way). It writes the tile's
normalized partial output and its log-sum-exp (base 2, the kernel's native unit).

The merge kernel folds, per query, all of that query's partials (one per group and key split) into
the final output by the exact log-sum-exp merge (METHODS.md, "Cascade attention"). Two launches per
layer, whatever the tree's depth.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# NOTE: a finite floor for running maxima: exp2(-inf - floor) is 0, while exp2(-inf - -inf) is NaN,
# so rows with no visible key yet (masked, padded, or past their causal limit) stay NaN-free.
# A constexpr: compiled kernels may only read globals that are.
NEG_FLOOR = tl.constexpr(-1.0e30)


def _configs() -> list[triton.Config]:
    # The interpreter handles one config only (several fail with "0 active drivers"); on a GPU the
    # autotuner picks among key-block widths and pipelining depths once per (head dim, GQA, tile).
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s)
        for n in (32, 64)
        for w in (4, 8)
        for s in (2, 3)
    ]


@triton.autotune(configs=_configs(), key=["HEAD_DIM", "REP", "BLOCK_M", "DOT_FP32"])
@triton.jit
def cascade_partial_kernel(
    q_ptr, k_ptr, v_ptr, block_table_ptr,
    tile_q_ptr, tile_limit_ptr, tile_first_ptr, tile_table_ptr, tile_kv_start_ptr, tile_kv_end_ptr,
    tile_pos_ptr, alibi_ptr, part_out_ptr, part_lse_ptr,
    num_queries, num_kv_heads, scale_log2, softcap,
    stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh,
    HEAD_DIM: tl.constexpr, REP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, DOT_FP32: tl.constexpr, UPCAST: tl.constexpr, SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Grid (num_tiles, KVH). Writes part_out [tiles, KVH, BLOCK_M, D] fp32 and part_lse, base 2.

    Row r of the tile matrix is query slot r // REP, query head kvh * REP + r % REP.
    DOT_FP32: products in exact fp32 (fp32 inputs, or UPCAST); UPCAST: convert q, k, v to fp32
    right after loading (the interpreter's bf16 arithmetic is wrong; its bf16 loads are not).
    SOFTCAP: scores -> softcap * tanh(scores / softcap) (natural units) before the softmax.
    ALIBI: then + alibi[head] * (tile_pos + key), the slopes already in base-2 units.
    """
    tile = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    slot = rows // REP
    head = kvh * REP + rows % REP
    in_tile = slot < BLOCK_Q
    qid = tl.load(tile_q_ptr + tile * BLOCK_Q + slot, mask=in_tile, other=num_queries)
    limit = tl.load(tile_limit_ptr + tile * BLOCK_Q + slot, mask=in_tile, other=0)
    first = tl.load(tile_first_ptr + tile * BLOCK_Q + slot, mask=in_tile, other=0)
    row_ok = in_tile & (qid < num_queries)
    dims = tl.arange(0, HEAD_DIM)
    q_off = qid.to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :]
    q = tl.load(q_ptr + q_off, mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    table_off = tl.load(tile_table_ptr + tile)
    kv_start = tl.load(tile_kv_start_ptr + tile)
    kv_end = tl.load(tile_kv_end_ptr + tile)
    if ALIBI:
        slope = tl.load(alibi_ptr + head)  # [BLOCK_M], base 2
        pos0 = tl.load(tile_pos_ptr + tile)
    m_i = tl.full([BLOCK_M], NEG_FLOOR, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start in range(kv_start, kv_end, BLOCK_N):
        # 1. Key positions of this block -> pool slots through the segment's block table.
        pos = start + tl.arange(0, BLOCK_N)
        key_ok = pos < kv_end
        block = tl.load(block_table_ptr + table_off + pos // BLOCK_SIZE, mask=key_ok, other=0)
        kv_slot = block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
        k = tl.load(
            k_ptr + kv_slot[None, :] * stride_ks + kvh * stride_kh + dims[:, None],
            mask=key_ok[None, :],
            other=0.0,
        )  # [D, BLOCK_N]
        if UPCAST:
            k = k.to(tl.float32)
        # 2. Scores in base 2; fp32 inputs use exact fp32 products (tf32 would cost ~1e-3).
        if DOT_FP32:
            s = tl.dot(q, k, input_precision="ieee")
        else:
            s = tl.dot(q, k)
        if SOFTCAP:
            # tanh(x) = 2 sigmoid(2x) - 1 on the natural-unit score x = s * scale / softcap
            x = s * (scale_log2 * 0.6931471805599453 / softcap)
            s = softcap * (2.0 * tl.sigmoid(2.0 * x) - 1.0) * 1.4426950408889634
        else:
            s = s * scale_log2
        if ALIBI:
            s = s + slope[:, None] * (pos0 + pos)[None, :].to(tl.float32)
        # causal / ragged limit and sliding-window start, per query row
        visible = key_ok[None, :] & (pos[None, :] < limit[:, None])
        visible = visible & (pos[None, :] >= first[:, None])
        s = tl.where(visible, s, float("-inf"))
        # 3. Online softmax (FlashAttention): rescale what was accumulated to the new maximum.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_ptr + kv_slot[:, None] * stride_vs + kvh * stride_vh + dims[None, :],
            mask=key_ok[:, None],
            other=0.0,
        )  # [BLOCK_N, D]
        if UPCAST:
            v = v.to(tl.float32)
        if DOT_FP32:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    # 4. Rows that saw no key (an empty split, padding) get out 0 and lse -inf: they merge away.
    seen = l_i > 0.0
    denom = tl.where(seen, l_i, 1.0)
    lse = tl.where(seen, m_i + tl.log2(denom), float("-inf"))
    base = (tile * num_kv_heads + kvh) * BLOCK_M + rows
    tl.store(part_out_ptr + base[:, None] * HEAD_DIM + dims[None, :], acc / denom[:, None],
             mask=row_ok[:, None])
    tl.store(part_lse_ptr + base, lse, mask=row_ok)


@triton.jit
def cascade_merge_kernel(
    part_out_ptr, part_lse_ptr, merge_ptr, merge_src_ptr, out_ptr, lse_ptr,
    num_heads, num_kv_heads, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, REP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
):  # fmt: skip
    """Grid (T,). out[t] = sum_e exp(lse_e - lse) O_e over query t's partials e; lse in natural log.

    merge_src holds tile * BLOCK_Q + slot for each partial, sorted by query (CSR by merge_ptr).
    """
    t = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    head_ok = heads < num_heads
    dims = tl.arange(0, HEAD_DIM)
    first = tl.load(merge_ptr + t)
    last = tl.load(merge_ptr + t + 1)
    m = tl.full([BLOCK_H], NEG_FLOOR, dtype=tl.float32)
    l = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], dtype=tl.float32)
    for e in range(first, last):
        src = tl.load(merge_src_ptr + e).to(tl.int64)
        tile = src // BLOCK_Q
        slot = src % BLOCK_Q
        row = (tile * num_kv_heads + heads // REP) * BLOCK_M + slot * REP + heads % REP
        lse = tl.load(part_lse_ptr + row, mask=head_ok, other=float("-inf"))
        o = tl.load(part_out_ptr + row[:, None] * HEAD_DIM + dims[None, :], mask=head_ok[:, None],
                    other=0.0)
        m_new = tl.maximum(m, lse)
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(lse - m_new)
        l = l * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * o
        m = m_new
    # NOTE: every real query sees key 0 of its own segment, so l > 0 on real heads; the guard
    # keeps the padding heads (never stored) free of 0/0.
    l = tl.where(head_ok, l, 1.0)
    out = acc / l[:, None]
    o_off = t * stride_ot + heads[:, None] * stride_oh + dims[None, :]
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])
    # natural-log lse: ln 2 * (base-2 lse)
    tl.store(lse_ptr + t * num_heads + heads, (m + tl.log2(l)) * 0.6931471805599453, mask=head_ok)
