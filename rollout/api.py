"""The front door: `sample_tree` (one call) and `Engine` (a reusable sampler for training loops).

Everything a caller passes is checked here, before any work runs, with errors that name the
argument and the fix; the engine below assumes valid input. `Engine` owns the KV block pool across
calls and the policy version: `policy_updated()` after an optimizer step drops every key/value
computed under the old weights, so no rollout is ever sampled from stale prefix KV.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from trees import Tree
from trees.spec import TreeSpec

from .attention_adapter import cascade_attention_enabled
from .block_pool import BlockPool
from .text_engine import SamplingParams, TreeRun, worst_case_blocks
from .validation import check_causal_lm, check_sampling, context_limit, encode_prompts, eos_ids


class Engine:
    """A text tree sampler bound to one model.

    kv_budget: bytes of KV memory the pool may use (keys and values of all layers). Trees wait for
        room rather than exceed it; a tree that cannot fit alone is an error before any work.
        None sizes the pool to each batch's worst case.
    block_size: tokens per KV block.
    max_step_tokens: tokens forwarded per step at most (long prompts prefill in chunks).
    attn_impl: "auto" (Triton on CUDA, torch elsewhere), "torch" or "triton".
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any = None,
        *,
        kv_budget: int | None = None,
        block_size: int = 16,
        max_step_tokens: int = 4096,
        attn_impl: str = "auto",
    ) -> None:
        check_causal_lm(model)
        if kv_budget is not None and (not isinstance(kv_budget, int) or kv_budget <= 0):
            raise ValueError(
                f"kv_budget={kv_budget!r}: expected a positive number of bytes, or None"
            )
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size={block_size!r}: expected an int >= 1 (16 is typical)")
        if not isinstance(max_step_tokens, int) or max_step_tokens < 1:
            raise ValueError(f"max_step_tokens={max_step_tokens!r}: expected an int >= 1")
        self.model = model
        self.tokenizer = tokenizer
        self.kv_budget = kv_budget
        self.block_size = block_size
        self.max_step_tokens = max_step_tokens
        self.attn_impl = attn_impl
        self.policy_version = 0
        self.pool: BlockPool | None = None

    def policy_updated(self) -> int:
        """Call after every weight update: drops all KV computed under the old policy."""
        self.policy_version += 1
        self.pool = None
        return self.policy_version

    def _pool_for(self, worst_blocks: list[int]) -> BlockPool:
        cfg = self.model.config.get_text_config()
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        param = next(self.model.parameters())
        layers = cfg.num_hidden_layers
        block_bytes = 2 * layers * self.block_size * kv_heads * head_dim * param.element_size()
        if self.kv_budget is None:
            num_blocks = sum(worst_blocks)
        else:
            num_blocks = self.kv_budget // block_bytes
            if max(worst_blocks) > num_blocks:
                raise ValueError(
                    f"kv_budget={self.kv_budget} bytes holds {num_blocks} KV blocks of "
                    f"{block_bytes} bytes, "
                    f"bytes, but one tree needs up to {max(worst_blocks)}: raise kv_budget to at "
                    f"least {max(worst_blocks) * block_bytes} or make the tree smaller"
                )
        pool = self.pool
        if pool is None or pool.num_blocks < num_blocks or pool.k.device != param.device:
            pool = BlockPool(
                layers,
                num_blocks,
                self.block_size,
                kv_heads,
                head_dim,
                dtype=param.dtype,
                device=param.device,
            )
            self.pool = pool
        return pool

    def sample_tree(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        depth: int = 1,
        width: int | Sequence[int] = 1,
        *,
        segment_len: int | Sequence[int] = 32,
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        eos_token_id: int | Sequence[int] | None = None,
    ) -> list[Tree]:
        """One `Tree` per prompt, in the caller's order. See `rollout.sample_tree`."""
        spec = TreeSpec.make(depth, width, segment_len, max_new_tokens)
        check_sampling(temperature, top_p, top_k, seed)
        ids = encode_prompts(prompts, self.tokenizer, self.model)
        limit = context_limit(self.model)
        for i, p in enumerate(ids):
            if limit is not None and len(p) + max_new_tokens > limit:
                raise ValueError(
                    f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} that is "
                    f"{len(p) + max_new_tokens} > the model's context of {limit} tokens"
                )
        params = SamplingParams(
            temperature, top_k, top_p, eos_ids(eos_token_id, self.model, self.tokenizer)
        )
        worst = [worst_case_blocks(spec, len(p), self.block_size) for p in ids]
        pool = self._pool_for(worst)
        run = TreeRun(
            self.model,
            pool,
            ids,
            list(prompts),
            spec,
            params,
            seed,
            self.max_step_tokens,
            self.attn_impl,
            self.policy_version,
        )
        with cascade_attention_enabled(self.model):
            return run.run()


def sample_tree(
    prompts: Sequence[str] | Sequence[Sequence[int]],
    depth: int = 1,
    width: int | Sequence[int] = 1,
    *,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    pipeline: Any = None,
    kv_budget: int | None = None,
    **kwargs: Any,
) -> list[Tree]:
    """Sample one rollout tree per prompt.

    Text: `model` is any transformers decoder-only causal LM; prompts are strings (with
    `tokenizer`) or token-id lists. Each non-leaf node samples `segment_len` tokens and forks
    `width` children; leaves sample until EOS or `max_new_tokens` new tokens in total; a branch
    that samples EOS early is a leaf. Keyword arguments: segment_len, max_new_tokens,
    temperature, top_p, top_k, seed, eos_token_id (see `Engine.sample_tree`). Recorded
    log-probabilities are log_softmax(logits / temperature) of the sampled tokens.

    Flow matching: pass a diffusers `pipeline` instead of a model (see `rollout.flow`).
    """
    if pipeline is not None:
        if model is not None:
            raise ValueError(
                "sample_tree: pass either model= (text) or pipeline= (flow matching), not both"
            )
        from .flow import sample_flow_tree

        return sample_flow_tree(prompts, depth, width, pipeline, **kwargs)
    if model is None:
        raise ValueError(
            "sample_tree: pass model= (a transformers causal LM) or pipeline= (diffusers)"
        )
    return Engine(model, tokenizer, kv_budget=kv_budget).sample_tree(
        prompts, depth, width, **kwargs
    )
