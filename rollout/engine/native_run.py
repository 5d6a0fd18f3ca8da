"""The native path: trees sampled with the model's own cache, one branch at a time.

For the families the cascade engine refuses (attention outside transformers' AttentionInterface,
BART-style positions, sparse attention, recurrent models without attention or whose state is not
in transformers' LinearAttentionLayer cache, ...) the model
runs exactly as transformers runs it (its own attention implementation, its own cache class,
built as `generate` builds it). Each live branch holds its node, its own cache and its pending
tokens (the prompt at first); a step forwards every branch's pending tokens, one model call per
branch, and a fork hands each child but the last a `copy.deepcopy` of the parent's cache (keys,
values and any recurrent state) and the last child the parent's own. No prefix is recomputed,
but nothing is shared either: every branch reads its whole cache, and a fork copies it.

A budget (`kv_budget`, bytes) counts everything the caches hold, recurrent and convolution states
included. A branch's cache holds `fixed + per_token * n` bytes after n tokens, measured once per
run by two one-token forwards on a fresh cache (a sliding-window layer's plateau makes it an upper
bound); a tree holds at most one cache per leaf, each at its longest path, and trees start in
order while their worst cases fit together, the others wait. A tree that cannot fit alone is an
error before any work.

The decisions are the cascade engine's (text_engine.py): the same tree program, the same branch
keys and `draw_rows`, so a family that runs on both paths samples the same tokens from one seed.
Agent trees (programs that wait for an environment) are refused.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from trees import Node

from .commit import draw, finish_tree, new_child, record, step_draws
from .scheduler import Job


@dataclass(eq=False)
class _Branch:
    """A tree node that still forwards or samples tokens, with its own copy of the model's cache.
    `target`, `forks` and `state` are what its tree program reads (programs.py)."""

    job: Job
    node: Node
    target: int
    forks: int
    state: Any = None
    cache: Any = None  # the model's cache after `seen` tokens of the path; None before the first
    pending: list[int] = field(default_factory=list)  # tokens of the path not yet forwarded
    seen: int = 0


def cache_bytes(cache: Any) -> int:
    """Bytes of the tensors a cache object holds (keys, values, recurrent and conv states)."""
    found: dict[int, torch.Tensor] = {}
    stack, visited = [cache], set()
    while stack:
        obj = stack.pop()
        if id(obj) in visited or obj is None or isinstance(obj, (int, float, str, bool)):
            continue
        visited.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found[id(obj)] = obj
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)):
            stack.extend(vars(obj).values())
    return sum(t.numel() * t.element_size() for t in found.values())


class NativeRun:
    """Trees sampled with the model's own forward and cache. `add` jobs, then `step()` until
    it returns False (`run_to_end`, driver.py); `waiting` is always empty."""

    def __init__(
        self,
        model: torch.nn.Module,
        on_step: Callable[[NativeRun], None] | None = None,
        budget: int | None = None,
    ) -> None:
        self.model, self.on_step, self.budget = model, on_step, budget
        self.jobs: list[Job] = []
        self.live: list[_Branch] = []
        self.waiting: list[_Branch] = []
        self.tokens_forwarded = 0
        self.next_id: dict[int, int] = {}
        self.peak_bytes: dict[int, int] = {}  # tree -> the most cache bytes its branches held
        self.queued: list[Job] = []  # trees waiting for room in the budget
        self.reserved: dict[int, int] = {}  # running tree -> its worst-case cache bytes
        self.growth: tuple[int, int] | None = None  # (fixed, per_token) bytes of one cache
        self.device = next(model.parameters()).device
        params = inspect.signature(model.forward).parameters
        self.keep_last = "logits_to_keep" in params

    def add(self, jobs: Sequence[Job]) -> None:
        """Queue trees; each starts (its root a branch with its prompt pending) once it fits."""
        if any(job.program.waits for job in jobs):
            raise ValueError(
                "env= (agent trees) runs on the cascade engine only; this model runs on the "
                "native path (path='native', or a family the cascade engine refuses)"
            )
        if self.budget is not None:
            for job in jobs:
                if (need := self.worst_bytes(job)) > self.budget:
                    fixed, per_token = self.growth or (0, 0)
                    raise ValueError(
                        f"tree {job.index} needs up to {need} bytes of cache "
                        f"({job.spec.num_leaves} leaves x ({fixed} + {per_token} per token) at "
                        f"{len(job.prompt_ids) + job.spec.max_new_tokens} tokens) but "
                        f"kv_budget is {self.budget}: raise kv_budget or make the tree smaller"
                    )
        for job in jobs:
            self.next_id[id(job)] = 1
            self.peak_bytes[id(job)] = 0
        self.jobs.extend(jobs)
        self.queued.extend(jobs)
        self._admit()

    def worst_bytes(self, job: Job) -> int:
        """The most cache bytes the tree can hold: one cache per leaf, at its longest path."""
        if self.growth is None:
            self.growth = self._cache_growth(job.prompt_ids[0])
        fixed, per_token = self.growth
        longest = len(job.prompt_ids) + job.spec.max_new_tokens
        return job.spec.num_leaves * (fixed + per_token * longest)

    def _cache_growth(self, token: int) -> tuple[int, int]:
        """(fixed, per_token): a fresh cache's bytes after one token and what a second adds."""
        cache, held = self._new_cache(), []
        with torch.inference_mode():
            for _ in range(2):
                ids = torch.tensor([[token]], device=self.device)
                out = self.model(input_ids=ids, cache=cache, use_cache=True)
                cache = out.cache if getattr(out, "cache", None) is not None else cache
                held.append(cache_bytes(cache))
        # fixed = (bytes after one token) - per_token, floored at 0: a cache whose first token
        # costs less than its second (lazily built layers) is still bounded from above
        per_token = max(held[1] - held[0], 0)
        return max(held[0] - per_token, 0), per_token

    def _admit(self) -> None:
        """Start queued trees in order while their worst cases fit the budget (all without one)."""
        while self.queued:
            job = self.queued[0]
            need = self.worst_bytes(job) if self.budget is not None else 0
            if self.budget is not None and self.reserved and (
                sum(self.reserved.values()) + need > self.budget
            ):
                break
            self.queued.pop(0)
            self.reserved[id(job)] = need
            root = job.tree.root
            job.live = 1
            self.live.append(_Branch(job, root, *job.program.root(root), pending=list(root.tokens)))

    # forward ---------------------------------------------------------------------------------
    def _new_cache(self) -> Any:
        """The cache `generate` would build: a DynamicCache laid out from the config (attention
        and linear-attention layers), or None where the model builds its own (MiniMax, ...)."""
        if not self.model._supports_default_dynamic_cache():
            return None
        return DynamicCache(config=self.model.config.get_text_config(decoder=True))

    def forward(self, br: _Branch) -> torch.Tensor:
        """Forward the branch's pending tokens on its own cache; the last position's logits [V]."""
        # NOTE: no attention mask, as in the teacher-forced forward: one unpadded row (Mamba reads
        # a mask as covering the new tokens only, attention layers as covering the whole path)
        n = len(br.pending)
        kwargs: dict[str, Any] = dict(
            input_ids=torch.tensor([br.pending], device=self.device),
            cache=self._new_cache() if br.cache is None else br.cache,
            use_cache=True,
        )
        if self.keep_last:
            kwargs["logits_to_keep"] = 1
        out = self.model(**kwargs)
        br.cache = out.cache if getattr(out, "cache", None) is not None else kwargs["cache"]
        assert br.cache is not None, f"{type(self.model).__name__} returned no cache"
        br.seen += n
        br.pending = []
        self.tokens_forwarded += n
        br.job.tree.stats.tokens_forwarded += n
        br.job.tree.stats.forward_passes += 1
        return out.logits[0, -1]

    # sample + commit (the cascade engine's decisions: commit.py) ---------------------------
    def sample_and_commit(self, branches: list[_Branch], logits: torch.Tensor) -> None:
        draws = step_draws(branches, logits)
        drawn = draw(logits, draws)
        for d, tok, lp, top in zip(draws, *drawn, strict=True):
            br = d.branch
            if d.child is None:
                self._append(br, tok, lp, top)
            else:
                self._child(br, d.child, tok, lp, top)
                if d.child == br.forks - 1:  # its last child took its cache
                    br.node.finish_reason = "branch"
                    self._retire(br)

    def _append(self, br: _Branch, tok: int, lp: float, top: list | None) -> None:
        record(br.node, tok, lp, top)
        br.pending.append(tok)
        reason = br.job.program.after_token(br, tok)
        if reason is not None:
            br.node.finish_reason = reason
            self._retire(br)

    def _child(self, parent: _Branch, c: int, tok: int, lp: float, top: list | None) -> None:
        job = parent.job
        node = new_child(parent.node, c, self.next_id[id(job)])
        self.next_id[id(job)] += 1
        # NOTE: every child but the last copies the cache before the last one takes it
        last = c == parent.forks - 1
        cache = parent.cache if last else copy.deepcopy(parent.cache)
        br = _Branch(job, node, *job.program.child(parent, c, node), cache=cache, seen=parent.seen)
        if last:
            parent.cache = None
        self.live.append(br)
        job.live += 1
        self._append(br, tok, lp, top)

    def _retire(self, br: _Branch) -> None:
        self.live.remove(br)
        br.cache = None
        br.job.live -= 1
        if br.job.live == 0:
            self._finish_job(br.job)

    def _finish_job(self, job: Job) -> None:
        self.reserved.pop(id(job), None)
        finish_tree(job, self.peak_bytes.pop(id(job), 0))

    def _note_bytes(self) -> None:
        """Each tree's cache bytes now (forks have just copied, or every cache has grown)."""
        held: dict[int, int] = {}
        for br in self.live:
            if br.cache is not None:
                held[id(br.job)] = held.get(id(br.job), 0) + cache_bytes(br.cache)
        for key, n in held.items():
            self.peak_bytes[key] = max(self.peak_bytes[key], n)

    # driver ----------------------------------------------------------------------------------
    def step(self) -> bool:
        """Forward every live branch once, then sample and commit; False when nothing is left."""
        self._admit()
        if not self.live:
            assert not self.queued, "trees are queued but none runs"
            return False
        branches = list(self.live)
        logits = torch.stack([self.forward(br) for br in branches])  # [R, V]
        self._note_bytes()
        self.sample_and_commit(branches, logits)
        self._note_bytes()
        if self.on_step is not None:
            self.on_step(self)
        return True

    def abort(self) -> None:
        """Drop every branch and its cache."""
        for br in list(self.live):
            br.cache = None
        self.live.clear()
        self.queued.clear()

    def close(self) -> None:
        for program in {id(j.program): j.program for j in self.jobs}.values():
            program.close()
