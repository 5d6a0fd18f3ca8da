"""Multi-head latent attention (DeepSeek V2/V3 style) over the cached latent, with absorbed weights.

An MLA layer caches, per token, one latent `c` (kv_lora_rank, after `kv_a_layernorm`) and one
shared RoPE key `k_rot` (qk_rope_head_dim), and expands per-head keys and values from `c` with
`kv_b_proj` = [W_UK; W_UV] (transformers 5.24 calls `cache.update(c, k_rot)` and expands after).
The pool keeps the latent, never the expansion: one "KV head" of `rank + rope` dims per token
(576 floats for DeepSeek V3, against 2 * 128 heads * 192 expanded), shared by every query head.

Attention runs on the latent (DeepSeek V2, section 2.1.2, "absorbed" form), exact in exact math:
    score_h(t, j) = q_nope_h . (W_UK_h c_j) + q_rot_h . k_rot_j
                  = (W_UK_h^T q_nope_h) . c_j + q_rot_h . k_rot_j
so each query head becomes q'_h = [W_UK_h^T q_nope_h, q_rot_h] against keys [c_j, k_rot_j], a
multi-query cascade; the softmax-weighted sum of [c_j, k_rot_j] gives o'_h, whose first `rank`
dims are sum_j p_j c_j, and out_h = W_UV_h (sum_j p_j c_j). The value pool holds the same
latent key (the CPU flash kernel needs equal key and value widths; its `rope` extra dims are
dropped from the output). NOTE: the value copy doubles the latent's memory; keys alone would do.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from transformers import PretrainedConfig


class LatentDims(NamedTuple):
    rank: int  # kv_lora_rank: the latent c
    rope: int  # qk_rope_head_dim: the shared RoPE key
    nope: int  # qk_nope_head_dim: the per-head key part expanded from c
    value: int  # v_head_dim


def latent_dims(config: PretrainedConfig) -> LatentDims | None:
    """The latent layout of an MLA config (DeepSeek's field names), or None."""
    text = config.get_text_config()
    names = ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
    values = [getattr(text, n, None) for n in names]
    if not values[0]:
        return None
    if not all(isinstance(v, int) and v > 0 for v in values):
        return None
    return LatentDims(*values)


def caches_latent(module: torch.nn.Module) -> bool:
    """An attention module that caches the latent and expands it after (`expand_kv`)."""
    proj = getattr(module, "kv_b_proj", None)
    return (
        callable(getattr(module, "expand_kv", None))
        and isinstance(proj, torch.nn.Linear)
        and proj.bias is None
    )


def _split_kv_b(module: torch.nn.Module, dims: LatentDims) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_b_proj weight [H * (nope + value), rank] -> W_UK [H, nope, rank], W_UV [H, v, rank]."""
    w = module.kv_b_proj.weight
    w = w.view(-1, dims.nope + dims.value, dims.rank)
    return w[:, : dims.nope], w[:, dims.nope :]


def absorb_query(module: torch.nn.Module, q: torch.Tensor, dims: LatentDims) -> torch.Tensor:
    """q [T, H, nope + rope] -> q' [T, H, rank + rope]: the nope part through W_UK^T."""
    w_uk, _ = _split_kv_b(module, dims)
    q_nope, q_rot = q[..., : dims.nope], q[..., dims.nope :]
    q_lat = torch.einsum("thn,hnr->thr", q_nope.to(w_uk.dtype), w_uk)  # [T, H, rank]
    return torch.cat([q_lat.to(q.dtype), q_rot], dim=-1)


def expand_output(module: torch.nn.Module, out: torch.Tensor, dims: LatentDims) -> torch.Tensor:
    """o' [T, H, rank + rope] -> [T, H, value]: the latent part through W_UV."""
    _, w_uv = _split_kv_b(module, dims)
    o_lat = out[..., : dims.rank]
    return torch.einsum("thr,hvr->thv", o_lat.to(w_uv.dtype), w_uv).to(out.dtype)
