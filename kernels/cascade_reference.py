"""Cascade attention in plain torch: the specification, and the CPU path of the engine.

For each group of a `CascadePlan` (see plan.py), one batched matrix product of the stacked queries
of every segment against that segment's keys, then a softmax with its log-sum-exp; partial results
merge exactly (METHODS.md, "Cascade attention"):

    lse = logsumexp_s(lse_s),   O = sum_s exp(lse_s - lse) * O_s

Math runs in fp32 whatever the input dtype; the output has the query's dtype.
"""

from __future__ import annotations

import torch

from .plan import CascadeGroup, CascadePlan


def attend_group(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    group: CascadeGroup,
    block_size: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial attention of one group.

    q:       [T + 1, H, D] fp32 queries (row T is a scratch row that padding points at)
    k_pool:  [num_slots, KVH, D] keys of one layer (num_slots = num_blocks * block_size)
    v_pool:  [num_slots, KVH, D]
    returns  (out [S, N, H, D] fp32, lse [S, N, H] fp32)
    """
    S, N = group.q_index.shape
    kvh, d = k_pool.shape[1], k_pool.shape[2]
    h = q.shape[1]
    rep = h // kvh
    L = group.max_kv_len
    # [S, B] block ids -> [S, L] slot ids
    offs = torch.arange(block_size, device=q.device)
    slots = (group.block_table[:, :, None] * block_size + offs).view(S, -1)[:, :L]
    k = k_pool[slots].float()  # [S, L, KVH, D]
    v = v_pool[slots].float()
    # [S, N, H, D] -> [S, KVH, N*rep, D]: the query heads of one KV head stack (GQA)
    qg = q[group.q_index].view(S, N, kvh, rep, d).permute(0, 2, 1, 3, 4).reshape(S, kvh, N * rep, d)
    scores = torch.matmul(qg, k.permute(0, 2, 3, 1)).mul_(scale)  # [S, KVH, N*rep, L]
    scores = scores.view(S, kvh, N, rep, L)
    hidden = torch.arange(L, device=q.device) >= group.q_limit[:, None, :, None, None]
    scores.masked_fill_(hidden, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [S, KVH, N, rep]
    probs = torch.exp(scores.sub_(lse[..., None]))
    out = torch.matmul(probs.view(S, kvh, N * rep, L), v.permute(0, 2, 1, 3))  # [S, KVH, N*rep, D]
    out = out.view(S, kvh, N, rep, d).permute(0, 2, 1, 3, 4).reshape(S, N, h, d)
    lse = lse.permute(0, 2, 1, 3).reshape(S, N, h)
    return out, lse


def merge_into(
    acc_out: torch.Tensor,
    acc_lse: torch.Tensor,
    index: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> None:
    """Merge partials (out [M, H, D], lse [M, H]) into the accumulators at rows `index` [M].

    Each index appears once (the scratch row excepted, whose value is discarded).
    """
    old_lse = acc_lse[index]
    new_lse = torch.logaddexp(old_lse, lse)
    w_old = torch.exp(old_lse - new_lse)[..., None]
    w_new = torch.exp(lse - new_lse)[..., None]
    acc_out[index] = acc_out[index] * w_old + out * w_new
    acc_lse[index] = new_lse


def cascade_attention_torch(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    plan: CascadePlan,
    scale: float,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of every query over its path of segments.

    q:       [T, H, D] (T = plan.num_queries), any float dtype
    k_pool:  [num_slots, KVH, D];  v_pool: [num_slots, KVH, D]
    returns  out [T, H, D] in q's dtype (and lse [T, H] fp32 when `return_lse`)
    """
    T, h, d = q.shape
    assert T == plan.num_queries, f"plan is for {plan.num_queries} queries, got {T}"
    qf = torch.cat([q.float(), q.new_zeros(1, h, d, dtype=torch.float32)])
    acc_out = torch.zeros(T + 1, h, d, dtype=torch.float32, device=q.device)
    acc_lse = torch.full((T + 1, h), float("-inf"), dtype=torch.float32, device=q.device)
    for group in plan.groups:
        out, lse = attend_group(qf, k_pool, v_pool, group, plan.block_size, scale)
        merge_into(acc_out, acc_lse, group.q_index.reshape(-1), out.reshape(-1, h, d), lse.reshape(-1, h))
    result = acc_out[:T].to(q.dtype)
    return (result, acc_lse[:T]) if return_lse else result
