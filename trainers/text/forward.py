"""The training forward over packed trees: one model call per micro-batch, log-probs per target.

The model sees explicit `position_ids` and the additive 4D tree mask from `PackedBatch`; any
transformers causal LM accepts both (a prepared 4D mask is passed through as-is). Logits are taken
only at the positions that predict a target, then log-softmaxed in fp32 at the sampling
temperature, so the values compare directly with the sampler's log-probs.
"""

from __future__ import annotations

import torch

from .packing import PackedBatch


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def packed_logprobs(
    model: torch.nn.Module, batch: PackedBatch, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probs [T] (fp32) of every target token of `batch` under `model` at `temperature`."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; greedy has no log-probs")
    device = next(model.parameters()).device
    batch = batch.to(device)
    out = model(
        input_ids=batch.input_ids,
        position_ids=batch.position_ids,
        attention_mask=batch.attention_mask(_model_dtype(model)).to(device),
        use_cache=False,
    )
    logits = out.logits[batch.target_row, batch.target_src].float()  # [T, V]
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp.gather(-1, batch.target_ids[:, None]).squeeze(-1)
