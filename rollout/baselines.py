"""What a transformers user does today to sample G completions per prompt: the yardsticks that
`benchmarks/text_tree.py` and `python -m rollout.demo` hold `sample_tree` against.

All sample at temperature 1 with EOS disabled, so every method produces the same number of tokens.
Each returns the number of generated tokens.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, GenerationConfig, PreTrainedModel


def generate_per_prompt(
    model: PreTrainedModel, prompts: list[list[int]], leaves: int, new: int
) -> int:
    """`model.generate(num_return_sequences=leaves)` per prompt: each row re-reads its past."""
    tokens = 0
    for p in prompts:
        out = model.generate(
            torch.tensor([p]),
            do_sample=True,
            num_return_sequences=leaves,
            max_new_tokens=new,
            min_new_tokens=new,
            pad_token_id=0,
            top_k=0,
            top_p=1.0,
        )
        tokens += out[:, len(p) :].numel()
    return tokens


def prefill_expand_decode(
    model: PreTrainedModel, prompts: list[list[int]], leaves: int, new: int
) -> int:
    """The careful user: prefill every prompt once (batched; equal lengths, no padding), repeat
    the KV cache once per leaf, then decode all rows by hand."""
    ids = torch.tensor(prompts)
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        out = model(ids, cache=cache)
        cache.batch_repeat_interleave(leaves)
        logits = out.logits[:, -1].repeat_interleave(leaves, dim=0)
        pos, tokens = ids.shape[1], 0
        for _ in range(new):
            nxt = torch.multinomial(torch.softmax(logits.float(), dim=-1), 1)  # [B, 1]
            tokens += nxt.shape[0]
            logits = model(nxt, cache=cache, position_ids=torch.full_like(nxt, pos)).logits[:, -1]
            pos += 1
    return tokens


def continuous_batching(
    model: PreTrainedModel, prompts: list[list[int]], leaves: int, new: int
) -> int:
    """transformers' continuous batching (`generate_batch`), which shares prompt blocks."""
    cfg = GenerationConfig(
        do_sample=True,
        num_return_sequences=leaves,
        max_new_tokens=new,
        min_new_tokens=new,
        eos_token_id=-1,
        pad_token_id=0,
        top_k=0,
        top_p=1.0,
    )
    out = model.generate_batch(inputs=prompts, generation_config=cfg, progress_bar=False)
    return sum(len(r.generated_tokens) for r in out.values())
