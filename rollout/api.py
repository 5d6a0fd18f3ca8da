"""The front door: `sample_tree` (one call) and `Engine` (a reusable sampler for training loops).

Everything a caller passes is checked here, before any work runs, with errors that name the
argument and the fix; the engine below assumes valid input. `Engine` owns the KV block pool across
calls and the policy version: `policy_updated()` after an optimizer step drops every key/value
computed under the old weights, so no rollout is ever sampled from stale prefix KV.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tree_kernels.cascade import IMPLS

from trees import Node, Tree, branch_key
from trees.spec import TreeSpec

from .agent.options import agent_options, spec_segment_len
from .agent.program import AgentProgram
from .engine.attention_adapter import cascade_attention_enabled
from .engine.block_pool import BlockPool
from .engine.driver import run_to_end
from .engine.features import UnsupportedModelError
from .engine.mla import latent_dims
from .engine.native_run import NativeRun
from .engine.radix_cache import RadixCache
from .engine.sampling import SamplingParams
from .engine.scheduler import POLICIES, Job, make_scheduler, own_worst_blocks
from .engine.state_layout import state_layout
from .engine.state_store import placement
from .engine.stop import StopStrings
from .engine.text_engine import TreeRun
from .engine.validation import (
    check_causal_lm,
    check_outputs,
    check_sampling,
    context_limit,
    encode_prompts,
    eos_ids,
)

# model -> the last budget-less pool sized for it (weak: a pool never keeps its model alive)
_POOLS: weakref.WeakKeyDictionary[torch.nn.Module, BlockPool] = weakref.WeakKeyDictionary()


class Engine:
    """A text tree sampler bound to one model.

    kv_budget: bytes of KV memory the pool may use (keys and values of all layers, and for
        hybrid models the recurrent state slots, which live in the pool too). Trees wait for
        room rather than exceed it; a tree that cannot fit alone is an error before any work.
        None sizes the pool to each batch's worst case.
    block_size: tokens per KV block.
    max_step_tokens: tokens forwarded per step at most (long prompts prefill in chunks).
    attn_impl: "auto" (Triton on CUDA, torch elsewhere), "torch", "triton" or "reference" (the
        plain torch specification, a baseline).
    policy: "global" (BatchLLM: shared prefixes planned over the whole batch, computed once) or
        "fcfs-lru" (arrival order with an LRU prefix cache, as vLLM and SGLang do).
    prefix_cache: keep the KV of finished trees in the pool (a radix cache, evicted least
        recently used first when the budget needs room) so that a later prompt extending a
        cached sequence (the next turn of a conversation) computes only its new tokens. Needs
        policy "global". Off by default: whoever updates the weights must then call
        `policy_updated()`, which empties the cache (the service does). Refused, as is
        "fcfs-lru", for hybrid models: reused KV does not carry the recurrent state.
    path: "auto" (the cascade engine where it computes the model exactly, else the native path),
        "cascade" (refuse what the cascade engine does not compute), or "native": the model's own
        forward and cache, one model call per branch and step, the cache copied at each fork
        (rollout/engine/native_run.py). Exact for the families the cascade engine refuses
        (attention outside the AttentionInterface, recurrent models without attention, ...)
        and the same tokens from the same seed where both run; slower (no shared KV reads),
        also for hybrids, which the cascade runs with shared KV. `kv_budget` counts
        every byte its caches hold (recurrent states included); `prefix_cache` and
        `policy="fcfs-lru"` are the cascade engine's and refused on it.
    prepack: on the CPU, run the model's `nn.Linear` layers on oneDNN's prepacked weights while
        the cascade engine samples (rollout/engine/packed_linear.py: 1.2-2x faster products here,
        equal up to the order of the sums); it holds a second copy of those weights. False runs
        them as they are. The native path always runs the model as transformers does.
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
        policy: str = "global",
        prefix_cache: bool = False,
        path: str = "auto",
        prepack: bool = True,
    ) -> None:
        self.path = check_causal_lm(model, path)
        self.requested_path = path
        if policy not in POLICIES:
            raise ValueError(f"policy={policy!r}: expected one of {POLICIES}")
        if prefix_cache and policy != "global":
            raise ValueError(
                f"prefix_cache=True needs policy='global' (policy={policy!r} keeps its own LRU "
                "cache of prompt blocks)"
            )
        if kv_budget is not None and (not isinstance(kv_budget, int) or kv_budget <= 0):
            raise ValueError(
                f"kv_budget={kv_budget!r}: expected a positive number of bytes, or None"
            )
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size={block_size!r}: expected an int >= 1 (16 is typical)")
        if not isinstance(max_step_tokens, int) or max_step_tokens < 1:
            raise ValueError(f"max_step_tokens={max_step_tokens!r}: expected an int >= 1")
        if attn_impl not in IMPLS:
            raise ValueError(f"attn_impl={attn_impl!r}: expected one of {IMPLS}")
        self.model = model
        self.tokenizer = tokenizer
        self.kv_budget = kv_budget
        self.block_size = block_size
        self.max_step_tokens = max_step_tokens
        self.attn_impl = attn_impl
        self.policy = policy
        self.prefix_cache = prefix_cache
        self.prepack = bool(prepack)
        self.policy_version = 0
        self.pool: BlockPool | None = None
        if self.path == "native":
            self._check_native_options()
        else:
            self._check_state_options()

    def _check_state_options(self) -> None:
        """KV reused from another request carries no recurrent state: refused for hybrids."""
        layout = state_layout(self.model)
        reuse = [
            name
            for name, given in (
                ("prefix_cache=True", self.prefix_cache),
                (f"policy={self.policy!r}", self.policy != "global"),
            )
            if given
        ]
        if layout is not None and reuse:
            raise ValueError(
                f"{reuse[0]} with {type(self.model).__name__}: it reuses prompt KV from earlier "
                f"requests, but its recurrent layers {sorted(layout.mixers)} also need the state "
                "at the reused prefix's end, which is not kept; drop it (shared prefixes within "
                "a call are still computed once by policy='global')"
            )

    def _check_native_options(self) -> None:
        """The cascade engine's options have no meaning on the native path: refused, not ignored."""
        why = "path='native'" if self.requested_path == "native" else (
            f"{type(self.model).__name__} runs on the native path only (path='auto')"
        )
        for name, given in (
            ("prefix_cache=True", self.prefix_cache),
            (f"policy={self.policy!r}", self.policy != "global"),
        ):
            if given:
                raise ValueError(
                    f"{name} with {why}: the native path keeps each branch's own cache (no pool, "
                    f"prefix cache or scheduling policy); drop {name.split('=')[0]}"
                )

    def policy_updated(self) -> int:
        """Call after every weight update: no KV computed under the old policy is used again.

        Runs never outlive a call (or, for `open_run` callers, end with `close()`), and every
        shared prefix or cached block is owned by a run, so once no run is in flight the pool holds
        no live KV but the prefix cache's, which is emptied here; its memory is reused, its
        contents never read.
        """
        if self.pool is not None and self.pool.cache is not None:
            self.pool.cache.flush()
        if self.pool is not None and self.pool.used_blocks:
            raise RuntimeError(
                f"policy_updated: {self.pool.used_blocks} KV blocks are still in use; close the "
                "running TreeRun (or let sample_tree return) before updating the policy"
            )
        self.policy_version += 1
        return self.policy_version

    def _pool_dims(self) -> tuple[int, int, int]:
        """(layers, kv_heads, head_dim) of the pool, from the model's text config."""
        cfg = self.model.config.get_text_config()
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        if getattr(cfg, "multi_query", False):  # GPT-BigCode: one key/value head
            kv_heads = 1
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        if (latent := latent_dims(cfg)) is not None:  # MLA: one latent "head" per token
            kv_heads, head_dim = 1, latent.rank + latent.rope
        return cfg.num_hidden_layers, kv_heads, head_dim

    def _worst_blocks(self, jobs: Sequence[Job]) -> int:
        """Blocks the jobs hold at most, all running at once: KV, and state slots (hybrids)."""
        slot, layout = 0, state_layout(self.model)
        if layout is not None:
            layers, kv_heads, head_dim = self._pool_dims()
            itemsize = next(self.model.parameters()).element_size()
            cell = self.block_size * kv_heads * head_dim * itemsize  # a block's key rows, a layer
            slot = placement(layout, cell, planes=2 * layers)[1]  # as StateStore places them
        return sum(own_worst_blocks(j, len(j.prompt_ids), self.block_size, slot) for j in jobs)

    def _pool(self, worst_blocks: int) -> BlockPool:
        """The pool: sized by kv_budget, else to `worst_blocks`; reused across calls if it fits.

        NOTE: a fresh pool's first touch is slow (page faults: on a VM, more than the step work of
        a short call), so without a budget a pool at least as large as needed is kept, not
        resized down; `sample_tree` keeps one per model (`_POOLS`) for the same reason."""
        layers, kv_heads, head_dim = self._pool_dims()
        param = next(self.model.parameters())
        block_bytes = 2 * layers * self.block_size * kv_heads * head_dim * param.element_size()
        num_blocks = worst_blocks if self.kv_budget is None else self.kv_budget // block_bytes
        pool = self.pool
        fits = pool is not None and (
            pool.num_blocks == num_blocks
            or (self.kv_budget is None and pool.num_blocks > num_blocks)
        )
        if (
            not fits
            or pool.k.device != param.device
            or pool.k.dtype != param.dtype
        ):
            pool = BlockPool(
                layers,
                max(num_blocks, 1),
                self.block_size,
                kv_heads,
                head_dim,
                dtype=param.dtype,
                device=param.device,
            )
            if self.prefix_cache:
                pool.cache = RadixCache(pool)
        self.pool = pool
        return pool

    def make_jobs(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        depth: int = 1,
        width: int | Sequence[int] = 1,
        *,
        segment_len: int | Sequence[int] | None = None,
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        eos_token_id: int | Sequence[int] | None = None,
        branch_entropy: float | None = None,
        min_segment_len: int | Sequence[int] | None = None,
        stop: str | Sequence[str] | None = None,
        top_logprobs: int = 0,
        env: Any = None,
        max_turns: int | None = None,
        turn_stop: str | int | Sequence[str | int] | None = None,
        max_turn_tokens: int | None = None,
        env_timeout: float = 60.0,
        env_workers: int = 8,
    ) -> list[Job]:
        """Validated, not yet started trees (see `sample_tree` for the arguments)."""
        segment_len = spec_segment_len(
            env, segment_len, branch_entropy, max_turns=max_turns, turn_stop=turn_stop,
            max_turn_tokens=max_turn_tokens,
        )
        spec = TreeSpec.make(
            depth, width, segment_len, max_new_tokens, branch_entropy, min_segment_len
        )
        check_sampling(temperature, top_p, top_k, seed)
        strings = check_outputs(stop, top_logprobs, self.tokenizer)
        agent = None
        if env is not None:
            if max_turns is None:
                raise ValueError("env= needs max_turns= (the most turns an episode may take)")
            agent = agent_options(
                env, max_turns, turn_stop, max_turn_tokens, env_timeout, env_workers,
                depth=depth, max_new_tokens=max_new_tokens, tokenizer=self.tokenizer,
                decode=self._decode,
            )
        ids = encode_prompts(prompts, self.tokenizer, self.model)
        limit = context_limit(self.model)
        for i, p in enumerate(ids):
            if limit is not None and len(p) + max_new_tokens > limit:
                raise ValueError(
                    f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} that is "
                    f"{len(p) + max_new_tokens} > the model's context of {limit} tokens"
                )
        eos = eos_ids(eos_token_id, self.model, self.tokenizer)
        stops = StopStrings(strings, self._decode) if strings else None
        params = SamplingParams(temperature, top_k, top_p, eos, top_logprobs, stops)
        seed_key = branch_key(seed & ((1 << 62) - 1), 0x5EED)
        program = None
        if agent is not None:  # one program (one pool of environment calls) for the call
            vocab = self.model.get_output_embeddings().weight.shape[0]
            decode = self._decode if self.tokenizer is not None else None
            program = AgentProgram(spec, agent, self.tokenizer, vocab, decode)
        jobs = []
        for i, (p, prompt) in enumerate(zip(ids, prompts, strict=True)):
            root = Node(id=0, depth=0, key=branch_key(seed_key, i), tokens=list(p))
            tree = Tree(root=root, prompt=prompt, policy_version=self.policy_version)
            jobs.append(Job(index=i, tree=tree, spec=spec, params=params, program=program))
        return jobs

    def _decode(self, ids: list[int]) -> str:
        """The text of `ids` as the caller reads it (special tokens skipped): stop strings."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def open_run(
        self, num_blocks: int | None = None, on_step: Callable[[TreeRun], None] | None = None
    ) -> TreeRun:
        """A `TreeRun` on this engine's pool for callers that feed trees and step it themselves
        (the service): `run.add(engine.make_jobs(...))` between steps, `run.step()` inside
        `rollout.engine.attention_adapter.cascade_attention_enabled(engine.model)` and
        `torch.inference_mode()`, `run.cancel(jobs)`, `run.forget(jobs)`, `run.close()`. The pool
        holds `kv_budget` bytes, or `num_blocks` blocks when the engine has no budget. A step that
        raises leaves the run unusable: `abort()` and `close()` it and open another."""
        if self.path == "native":
            raise ValueError(
                "open_run steps the cascade engine; this engine runs path='native': call "
                "sample_tree"
            )
        if self.kv_budget is None and num_blocks is None:
            raise ValueError("open_run needs kv_budget on the Engine or num_blocks")
        pool = self._pool(num_blocks or 0)
        pool.peak_used = pool.used_blocks
        return TreeRun(
            self.model,
            pool,
            make_scheduler(self.policy, pool),
            self.max_step_tokens,
            self.attn_impl,
            on_step,
            self.prepack,
        )

    def sample_tree(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        depth: int = 1,
        width: int | Sequence[int] = 1,
        *,
        progress: bool | None = None,
        on_step: Callable[[Any], None] | None = None,
        **kwargs: Any,
    ) -> list[Tree]:
        """One `Tree` per prompt, in the caller's order. See `rollout.sample_tree`.

        progress: a progress bar (trees done, tokens/s); None shows it when stderr is a terminal.
        on_step: called after every engine step with the run (tests use it to check invariants).
        """
        jobs = self.make_jobs(prompts, depth, width, **kwargs)
        if self.path == "native":
            run = NativeRun(self.model, on_step, budget=self.kv_budget)
            run.add(jobs)
            return run_to_end(run, progress)
        cascade = self.open_run(self._worst_blocks(jobs), on_step)
        cascade.add(jobs)
        try:
            with cascade_attention_enabled(self.model):
                return run_to_end(cascade, progress)
        except UnsupportedModelError as e:
            # refused at the first forward (what no config reveals: DiffLlama, JetMoE, ...): the
            # door passed check_native, so with path="auto" the same trees run natively instead
            if self.requested_path != "auto":
                raise
            self.path = "native"
            try:
                self._check_native_options()
            except ValueError as bad:
                raise bad from e
            return self.sample_tree(prompts, depth, width, progress=progress, on_step=on_step,
                                    **kwargs)


def sample_tree(
    prompts: Sequence[str] | Sequence[Sequence[int]],
    depth: int = 1,
    width: int | Sequence[int] = 1,
    *,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    pipeline: Any = None,
    kv_budget: int | None = None,
    policy: str = "global",
    path: str = "auto",
    **kwargs: Any,
) -> list[Tree]:
    """Sample one rollout tree per prompt.

    Text: `model` is any transformers decoder-only causal LM; prompts are strings (with
    `tokenizer`) or token-id lists. Each non-leaf node samples `segment_len` tokens and forks
    `width` children; leaves sample until EOS or `max_new_tokens` new tokens in total; a branch
    that samples EOS early is a leaf. Keyword arguments: segment_len, max_new_tokens,
    temperature, top_p, top_k, seed, eos_token_id (see `Engine.sample_tree`). Recorded
    log-probabilities are log_softmax(logits / temperature) of the sampled tokens.
    `stop` (strings; needs the tokenizer) ends a branch, finish_reason "stop", at the token
    that completes one (rollout/engine/stop.py); `top_logprobs=k` (up to 20) records each
    sampled token's k likeliest alternatives of the same distribution in `Node.top_logprobs`.

    Entropy-guided branching: with `branch_entropy=h` (nats) a non-leaf node forks at its first
    token whose distribution has entropy >= h, once it holds `min_segment_len` tokens (default 1),
    and at `segment_len` tokens at the latest (trees/spec.py).

    Agent trees: with `env=` (a `rollout.Env`) and `max_turns=`, a node is one turn. The model
    samples until the turn ends (EOS, a `turn_stop` string or token id, `max_turn_tokens`), the
    environment answers off the engine's thread (`env_timeout` seconds at most, `env_workers`
    threads), and its observation is appended as forwarded, never sampled, tokens
    (`Node.sampled` False, log-prob None). Nodes fork `width` children after an observation, or
    with `branch_entropy` at the first uncertain token within `segment_len` tokens after one;
    `max_new_tokens` bounds each path's sampled and observed tokens (rollout/agent).

    `path`: "auto" (default), "cascade" or "native" (see `Engine`): families the cascade
    engine refuses (attention outside the AttentionInterface, pure recurrent models, ...) run on
    the native path, the model's own cache copied at each fork; bidirectional encoders are
    refused. Hybrid models (Jamba, Qwen3-Next, Falcon-H1, ...) run on the cascade: attention KV
    shared, each node's recurrent state in a slot copied at its fork.

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
    engine = Engine(model, tokenizer, kv_budget=kv_budget, policy=policy, path=path)
    # a kept pool is taken out while in use, so concurrent calls on one model never share one
    engine.pool = _POOLS.pop(model, None) if kv_budget is None else None
    try:
        return engine.sample_tree(prompts, depth, width, **kwargs)
    finally:
        if kv_budget is None and engine.pool is not None:
            _POOLS[model] = engine.pool
