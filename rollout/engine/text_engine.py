"""The text tree engine: all live branches of all trees advance together, one model forward a step.

A step reads plan -> forward -> sample -> commit:
  plan     shared prefixes and prompts contribute prefill chunks, decoding branches one token each
           (up to `max_step_tokens`; decode first); new keys/values get pool slots; the cascade
           plan maps every query to its path of segments (shared prefix, prompt, node, ...)
  forward  the user's model on one packed row with explicit positions; cascade attention reads
           every ancestor segment in place from the pool
  sample   one draw per branch, or `width` draws (one per child) where a node forks: its segment
           is full, or (entropy-guided branching) its next token's distribution is uncertain enough
  commit   the one host sync of the step: append tokens, fork, finish, free KV nodes (steps where
           a node may fork early on entropy read the entropies first: a second sync)

Trees start when the scheduler (scheduler.py) admits them under the KV budget; `add` may be
called between steps (the service feeds new requests that way), `cancel` frees a tree at once;
`run_to_end` (driver.py) steps a run until every tree is done. What a branch does after each
token (go on, fork, finish, or wait out of the batch for its environment) is its tree's program
(programs.py, rollout/agent/program.py).
Each tree's `peak_kv_bytes` is its own: the most blocks its nodes held at once, plus the shared
prefix blocks above its prompt (other trees' work in the same run does not enter it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tree_kernels.cascade import resolve_impl
from tree_kernels.plan import plan_cascade

from trees import Node

from .attention_adapter import PoolCache, StepContext, check_step_done, step_context
from .block_pool import BlockPool
from .commit import draw, finish_tree, new_child, record, step_draws
from .features import family
from .fused_forwards import FusedForwards
from .fused_layers import FusedLayers
from .kv_nodes import KVNode, grow, unref
from .layout import kv_layout
from .packed_linear import PackedLinears
from .programs import WAIT
from .scheduler import Admission, FCFSLRUScheduler, GlobalPrefixScheduler, Job
from .state_layout import state_layout
from .state_mixers import mixer_forwards, state_mixers_enabled
from .state_store import StateStore
from .step_paths import Entry, segments_and_rows


@dataclass(eq=False)
class _Branch:
    """A tree node that still forwards or samples tokens, or waits for its environment."""

    job: Job
    node: Node
    kv: KVNode
    target: int  # tokens the node holds when full
    forks: int  # children to fork when full; 0 for leaves
    state: Any = None  # its tree program's own state (an agent's episode: rollout/agent)


@dataclass
class _StepPlan:
    ctx: StepContext
    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    logit_rows: torch.Tensor  # [R] index into T of each query whose logits are sampled
    branches: list[_Branch]  # the branch behind each logit row


def _ancestors_stored(node: KVNode) -> bool:
    """Whether every node above `node` has forwarded all its tokens (it can attend now)."""
    up = node.parent
    while up is not None:
        if up.pending:
            return False
        up = up.parent
    return True


class TreeRun:
    """Trees being sampled on one pool. `add` jobs, then `run()` (or `step()` repeatedly)."""

    def __init__(
        self,
        model: torch.nn.Module,
        pool: BlockPool,
        scheduler: GlobalPrefixScheduler | FCFSLRUScheduler,
        max_step_tokens: int = 4096,
        attn_impl: str = "auto",
        on_step: Callable[[TreeRun], None] | None = None,
        prepack: bool = True,
    ) -> None:
        self.model, self.pool, self.scheduler = model, pool, scheduler
        self.linears = PackedLinears(model, prepack)  # oneDNN's packed weights (CPU)
        self.forwards = FusedForwards(model, pool.k.device.type == "cpu")  # norms, MLPs, RoPE (CPU)
        self.layers = FusedLayers(model, self.forwards, self.linears)  # Llama-like layers (CPU)
        self.max_step_tokens, self.attn_impl, self.on_step = max_step_tokens, attn_impl, on_step
        self.jobs: list[Job] = []
        self.live: list[_Branch] = []
        self.waiting: list[_Branch] = []  # out of the batch until their environment answers
        self.prefills: list[KVNode] = []  # shared prefixes still being forwarded
        self.next_id: dict[int, int] = {}
        self.held: dict[int, int] = {}  # running tree -> blocks its own nodes hold now
        self.peak_held: dict[int, int] = {}  # running tree -> the most they held at once
        self.tokens_forwarded = 0
        self.broken = False  # a step raised (see abort)
        self.device = pool.k.device
        self.family = family(model)
        self.layout = kv_layout(model.config)
        # private chains fuse where the torch paths read the plan (step_paths.py)
        self.fuse = self.device.type == "cpu" and resolve_impl(attn_impl, self.device) == "torch"
        # hybrid models: each node's recurrent state in a slot of the pool (state_store.py)
        layout = state_layout(model)
        self.states = StateStore(pool, layout) if layout is not None else None
        self.mixers = mixer_forwards(layout, self.family) if layout is not None else []
        if self.states is not None:
            scheduler.state_blocks = self.states.blocks_per_slot

    def add(self, jobs: Sequence[Job]) -> None:
        """Queue trees; a tree that could never fit the pool is refused before anything runs."""
        self.scheduler.add(jobs)
        too_big = [
            (job, n) for job in jobs if (n := self.scheduler.worst_case(job)) > self.pool.num_blocks
        ]
        if too_big:
            self.scheduler.remove(jobs)
            job, need = too_big[0]
            raise ValueError(
                f"tree {job.index} needs up to {need} KV blocks of "
                f"{self.pool.bytes_per_block} bytes but the budget holds {self.pool.num_blocks}: "
                "raise kv_budget or make the tree smaller (depth, width, max_new_tokens, prompt)"
            )
        for job in jobs:
            self.next_id[id(job)] = 1
        self.jobs.extend(jobs)

    # admission -------------------------------------------------------------------------------
    def admit(self) -> None:
        """Start what the scheduler admits; forget prefixes that are stored or cancelled."""
        for adm in self.scheduler.admit():
            self._start(adm)
        self.prefills = [n for n in self.prefills if n.pending and n.refs]  # cancelled: refs 0

    def _start(self, adm: Admission) -> None:
        job, root = adm.job, adm.root
        job.root_kv = root
        self.held[id(job)] = self.peak_held[id(job)] = len(root.blocks)  # reused cached blocks
        self.prefills.extend(adm.new_prefixes)
        paid = sum(len(n.tokens) for n in adm.new_prefixes)
        job.tree.stats.tokens_forwarded += paid  # this tree pays for the prefixes it created
        job.tree.stats.prefix_tokens_reused = len(job.prompt_ids) - len(root.tokens) - paid
        job.tree.stats.prefix_tokens_reused += root.stored
        job.live = 1
        self.live.append(_Branch(job, job.tree.root, root, *job.program.root(job.tree.root)))

    # plan ------------------------------------------------------------------------------------
    def plan(self) -> _StepPlan:
        """Decode tokens first, then prefill chunks, until the step's token budget is spent."""
        work: list[tuple[KVNode, _Branch | None]] = [(n, None) for n in self.prefills]
        work += [(br.kv, br) for br in self.live]
        work = [w for w in work if _ancestors_stored(w[0])]
        work.sort(key=lambda w: w[0].pending)
        budget = self.max_step_tokens
        entries: list[Entry] = []
        ids, pos, slots, logit_rows, logit_branches = [], [], [], [], []
        planned: list[tuple[KVNode, int, int]] = []  # (node, first query, queries)
        bs = self.pool.block_size
        for kv, br in work:
            if budget <= 0 and entries:
                break
            q_len = min(kv.pending, max(budget, 1))
            budget -= q_len
            first = kv.stored
            self._note_alloc(kv.owner, grow(kv, self.pool, first + q_len))
            slots += [kv.blocks[j // bs] * bs + j % bs for j in range(first, first + q_len)]
            ids += kv.tokens[first : first + q_len]
            pos += range(kv.start + first, kv.start + first + q_len)
            kv.stored += q_len
            self.tokens_forwarded += q_len
            entries.append((len(ids) - q_len, q_len, kv.path()))
            planned.append((kv, len(ids) - q_len, q_len))
            if br is None:
                continue
            br.job.tree.stats.tokens_forwarded += q_len
            if kv.pending == 0:
                logit_rows.append(len(ids) - 1)
                logit_branches.append(br)
                if br.node is br.job.tree.root:
                    self.scheduler.prefilled(br.job)
                    # every ancestor is stored now: the shared blocks this tree reads
                    br.job.meta["prefix_blocks"] = sum(len(n.blocks) for n in kv.path()[:-1])
        segments, rows = segments_and_rows(entries, bs, self.fuse)
        # one plan per distinct sliding window among the layers (one for most models)
        plans = {
            w: plan_cascade(segments, rows, bs, device=self.device, window=w)
            for w in self.layout.distinct_windows
        }

        def t(x: list[int]) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.int64, device=self.device)

        ctx = StepContext(
            self.pool, plans, self.layout.windows, t(slots), self.attn_impl, self.layout.latent
        )
        if self.states is not None:
            ctx.states = self.states.plan(planned, self._note_alloc)
        return _StepPlan(ctx, t(ids)[None], t(pos)[None], t(logit_rows), logit_branches)

    def _note_alloc(self, owner: int, n: int) -> None:
        """`n` blocks allocated for `owner` (negative: a state slot released; the budget counts
        allocations, which its reservation bounds, so only the tree's own stats go down)."""
        if n > 0:
            self.scheduler.budget.note_alloc(owner, n)
        if owner in self.held:  # a tree's node (shared prefixes are counted once, at prefill)
            held = self.held[owner] = self.held[owner] + n
            self.peak_held[owner] = max(self.peak_held[owner], held)

    # forward ---------------------------------------------------------------------------------
    def forward(self, step: _StepPlan) -> torch.Tensor:
        """Logits [R, V] at the step's logit rows."""
        with (
            step_context(step.ctx),
            state_mixers_enabled(self.mixers),
            self.linears.enabled(),
            self.forwards.enabled(),
            self.layers.enabled(),
        ):
            out = self.model(
                input_ids=step.input_ids,
                position_ids=step.position_ids,
                cache=PoolCache(self.family),
                use_cache=True,
                logits_to_keep=step.logit_rows,
            )
        check_step_done(self.model, step.ctx)
        return out.logits[0]

    # sample + commit -------------------------------------------------------------------------
    def sample_and_commit(self, step: _StepPlan, logits: torch.Tensor) -> None:
        """Draw each branch's next token (or each new child's first) and apply them."""
        draws = step_draws(step.branches, logits)
        if not draws:
            return
        drawn = draw(logits, draws)
        forked: set[int] = set()
        for d, tok, lp, top in zip(draws, *drawn, strict=True):
            if d.child is None:
                self._append(d.branch, tok, lp, top)
            else:
                self._child(d.branch, d.child, tok, lp, top)
                forked.add(id(d.branch))
        for br in step.branches:
            if id(br) in forked:
                br.node.finish_reason = "branch"
                self._retire(br)

    def _append(self, br: _Branch, tok: int, lp: float, top: list | None) -> None:
        node = br.node
        record(node, tok, lp, top)
        reason = br.job.program.after_token(br, tok)
        if reason == WAIT:  # its program called the environment: out of the batch till it answers
            self.live.remove(br)
            self.waiting.append(br)
        elif reason is not None:
            node.finish_reason = reason
            self._retire(br)

    def _take_observations(self, block: bool) -> None:
        """Branches whose environment answered rejoin the batch with the observation's tokens
        pending (forwarded like a prompt, never sampled), or finish with the reason given."""
        # blocking: wait on the first waiter's program (it answers by its timeout at the latest)
        waiters = self.waiting[:1] if block else self.waiting
        programs = {id(br.job.program): br.job.program for br in waiters}
        for program in programs.values():
            for br, got in program.answers(block):
                if br not in self.waiting:  # cancelled meanwhile
                    continue
                self.waiting.remove(br)
                self.live.append(br)
                if isinstance(got, str):
                    br.node.finish_reason = got
                    self._retire(br)
                else:
                    br.node.tokens.extend(got)
                    br.node.logprobs.extend([None] * len(got))
                    br.node.sampled.extend([False] * len(got))

    def _child(self, parent: _Branch, c: int, tok: int, lp: float, top: list | None) -> None:
        job = parent.job
        node = new_child(parent.node, c, self.next_id[id(job)])
        self.next_id[id(job)] += 1
        kv = parent.kv.child(node.tokens, owner=id(job))
        if self.states is not None:
            self.states.forked(parent.kv)
        br = _Branch(job, node, kv, *job.program.child(parent, c, node))
        self.live.append(br)
        job.live += 1
        self._append(br, tok, lp, top)

    def _retire(self, br: _Branch) -> None:
        """The branch needs no more KV: drop its node's reference (freeing what nobody reads)."""
        self.live.remove(br)
        if self.states is not None:
            self.states.retired(br.kv, self._note_alloc)
        freed = unref(br.kv, self.pool)
        for node in freed:
            if node.owner in self.held:
                self.held[node.owner] -= node.freed_blocks
        self.scheduler.freed(freed)
        br.job.live -= 1
        if br.job.live == 0:
            self._finish_job(br.job)

    def _finish_job(self, job: Job) -> None:
        self.scheduler.finished(job)
        blocks = self.peak_held.pop(id(job), 0) + job.meta.get("prefix_blocks", 0)
        self.held.pop(id(job), None)
        finish_tree(job, blocks * self.pool.bytes_per_block)

    # driver ----------------------------------------------------------------------------------
    def step(self) -> bool:
        """One engine step; False when nothing is left to run."""
        self.admit()
        if self.waiting:
            self._take_observations(block=False)
        while not self.live and not self.prefills and self.waiting:  # only environments run
            self._take_observations(block=True)
        if not self.live and not self.prefills and self.scheduler.waiting:
            # nothing runs, so only prefixes held for waiting trees can be in the way
            self.scheduler.release_holds()
            self.admit()
        if not self.live and not self.prefills:
            if self.scheduler.waiting:
                raise RuntimeError("trees are waiting but none can start: the KV budget is full")
            return False
        try:
            step = self.plan()
            logits = self.forward(step)
            if step.branches:
                self.sample_and_commit(step, logits)
        except BaseException:
            self.broken = True  # the keys/values this step was writing are not to be reused
            raise
        for job in {id(br.job): br.job for br in step.branches}.values():
            job.tree.stats.forward_passes += 1
        if self.on_step is not None:
            self.on_step(self)
        return True

    def forget(self, jobs: Sequence[Job]) -> None:
        """Drop finished or cancelled `jobs` from the run's records (long-lived callers)."""
        gone = {id(j) for j in jobs}
        assert not any(id(b.job) in gone for b in self.live), "forget() of a running job"
        self.jobs = [j for j in self.jobs if id(j) not in gone]
        for key in gone:
            self.next_id.pop(key, None)

    def cancel(self, jobs: Sequence[Job]) -> None:
        """Stop `jobs` now and free their KV (the scheduler drops them if they have not started)."""
        doomed = {id(j) for j in jobs}
        for br in [b for b in self.waiting if id(b.job) in doomed]:
            self.waiting.remove(br)
            self.live.append(br)
        for br in [b for b in self.live if id(b.job) in doomed]:
            self._retire(br)
        self.scheduler.remove(jobs)

    def abort(self) -> None:
        """Return every block this run holds to the pool (or to its prefix cache; after a failed
        step the cache is flushed, since that step's writes may be torn)."""
        self.cancel(self.jobs)
        if self.broken and self.pool.cache is not None:
            self.scheduler.close()
            self.pool.cache.flush()

    def close(self) -> None:
        """Release what the scheduler still holds (prefix holds, cached blocks) and stop the
        trees' environment calls."""
        self.scheduler.close()
        for program in {id(j.program): j.program for j in self.jobs}.values():
            program.close()
