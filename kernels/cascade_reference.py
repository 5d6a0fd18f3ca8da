"""Cascade attention in plain torch: the specification, and the CPU path of the engine.

For each group of a `CascadePlan` (see plan.py), one batched matrix product of the stacked queries
of every segment against that segment's keys, then a softmax with its log-sum-exp; partial results
merge exactly (METHODS.md, "Cascade attention"):

    lse = logsumexp_s(lse_s),   O = sum_s exp(lse_s - lse) * O_s

Math runs in fp32 whatever the input dtype; the output has the query's dtype. For speed on the CPU
each group makes few passes over its scores (max, exp in place, sum) and normalizes after the
value product ([N, D] instead of [N, L]); groups write partials with `index_copy_` and all merge
once at the end.
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
    softcap: float | None = None,
    alibi: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial attention of one group. softcap: scores -> softcap * tanh(scores / softcap) before
    the softmax (Gemma 2's attn_logit_softcapping), None for plain scores. alibi: [H] fp32 slopes,
    then + slope[h] * (absolute key position) (Bloom's ALiBi, Press et al. 2021), None for none.

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
    if group.slot_table is not None:  # fused segments name their slots
        slots = group.slot_table.reshape(-1)
    else:  # [S, B] block ids -> [S*L] slot ids
        offs = torch.arange(block_size, device=q.device)
        slots = (group.block_table[:, :, None] * block_size + offs).view(S, -1)[:, :L].reshape(-1)
    k = k_pool.index_select(0, slots).view(S, L, kvh, d).float()
    v = v_pool.index_select(0, slots).view(S, L, kvh, d).float()
    # [S, N, H, D] -> [S, KVH, N*rep, D]: the query heads of one KV head stack (GQA)
    qg = q.index_select(0, group.q_index.view(-1)).mul_(scale)
    qg = qg.view(S, N, kvh, rep, d).permute(0, 2, 1, 3, 4).reshape(S, kvh, N * rep, d)
    scores = torch.matmul(qg, k.permute(0, 2, 3, 1))  # [S, KVH, N*rep, L]
    if softcap is not None:
        scores.div_(softcap).tanh_().mul_(softcap)
    if alibi is not None:
        assert group.kv_pos is not None, "ALiBi needs the plan's key positions (plan_cascade)"
        pos = (group.kv_pos[:, None] + torch.arange(L, device=q.device)).float()  # [S, L]
        slopes = alibi.float().view(kvh, 1, rep, 1)
        scores.view(S, kvh, N, rep, L).add_(slopes[None] * pos[:, None, None, None, :])
    if group.masked:
        keys = torch.arange(L, device=q.device)
        hidden = (keys >= group.q_limit[:, None, :, None, None]) | (
            keys < group.q_first[:, None, :, None, None]
        )
        scores.view(S, kvh, N, rep, L).masked_fill_(hidden, float("-inf"))
    peak = scores.amax(dim=-1, keepdim=True)  # every real query sees >= 1 key: finite
    scores.sub_(peak).exp_()
    total = scores.sum(dim=-1, keepdim=True)
    out = torch.matmul(scores, v.permute(0, 2, 1, 3)).div_(total)  # [S, KVH, N*rep, D]
    lse = (peak + total.log()).view(S, kvh, N, rep)
    out = out.view(S, kvh, N, rep, d).permute(0, 2, 1, 3, 4).reshape(S, N, h, d)
    lse = lse.permute(0, 2, 1, 3).reshape(S, N, h)
    return out, lse


def merge_partials(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of G partial results. outs [G, T, H, D], lses [G, T, H] -> ([T, H, D], [T, H]).

    A partial with lse = -inf (the query did not attend in that group) gets weight 0.
    """
    lse = torch.logsumexp(lses, dim=0)
    weights = torch.exp(lses - lse)  # [G, T, H]
    return (weights[..., None] * outs).sum(dim=0), lse


def cascade_attention_torch(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    plan: CascadePlan,
    scale: float,
    return_lse: bool = False,
    softcap: float | None = None,
    alibi: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of every query over its path of segments (softcap, alibi: attend_group).

    q:       [T, H, D] (T = plan.num_queries), any float dtype
    k_pool:  [num_slots, KVH, D];  v_pool: [num_slots, KVH, D]
    returns  out [T, H, D] in q's dtype (and lse [T, H] fp32 when `return_lse`)
    """
    T, h, d = q.shape
    assert T == plan.num_queries, f"plan is for {plan.num_queries} queries, got {T}"
    G = len(plan.groups)
    qf = torch.cat([q.float(), q.new_zeros(1, h, d, dtype=torch.float32)])
    outs = torch.zeros(G, T + 1, h, d, dtype=torch.float32, device=q.device)
    lses = torch.full((G, T + 1, h), float("-inf"), dtype=torch.float32, device=q.device)
    for g, group in enumerate(plan.groups):
        out, lse = attend_group(qf, k_pool, v_pool, group, plan.block_size, scale, softcap, alibi)
        index = group.q_index.view(-1)
        outs[g].index_copy_(0, index, out.reshape(-1, h, d))
        lses[g].index_copy_(0, index, lse.reshape(-1, h))
    if G == 1:
        result, lse = outs[0, :T], lses[0, :T]
    else:
        result, lse = merge_partials(outs[:, :T], lses[:, :T])
    result = result.to(q.dtype)
    return (result, lse) if return_lse else result
