"""The text tree engine: all live branches of all trees advance together, one model forward a step.

A step reads plan -> forward -> sample -> commit:
  plan     every live branch contributes the tokens it has not forwarded yet (a prompt chunk when
           prefilling, one token when decoding); new keys/values get slots in the block pool; the
           cascade-attention plan maps each query to its path of segments (prompt, node, ...)
  forward  the user's model on one packed row with explicit positions; cascade attention reads
           every ancestor segment in place from the pool
  sample   one draw per branch, or `width` draws (one per child) where a node's segment is full
  commit   the one host sync of the step: append tokens, fork, finish, release blocks

Each tree node owns a KV segment that starts on a fresh block; a block's refcount is the number of
live branches whose path reads it. Trees are admitted while the worst case of the admitted ones
fits the pool, so the pool is never exceeded; finished branches return their blocks at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tree_kernels.plan import Row, Segment, plan_cascade

from trees import Node, Tree, branch_key
from trees.spec import TreeSpec

from .attention_adapter import PoolCache, StepContext
from .block_pool import BlockPool
from .sampling import sample


def worst_case_blocks(spec: TreeSpec, prompt_len: int, block_size: int) -> int:
    """KV blocks one tree holds at most: every node full (no early EOS), all alive at once."""
    blocks = -(-prompt_len // block_size)
    for d in range(1, spec.depth + 1):
        blocks += spec.nodes_at(d) * -(-spec.target(d) // block_size)
    return blocks


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_ids: frozenset[int] = frozenset()


@dataclass
class _KV:
    """A node's KV segment: its blocks, how many tokens are stored, its first absolute position."""

    blocks: list[int] = field(default_factory=list)
    stored: int = 0
    start: int = 0


@dataclass
class _Branch:
    """A node that still forwards or samples tokens."""

    tree: int
    node: Node
    target: int  # tokens this node holds when full
    forks: int  # children to fork when full; 0 for leaves


@dataclass
class _StepPlan:
    ctx: StepContext
    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    logit_rows: torch.Tensor  # [R] index into T of each query whose logits we sample from
    branches: list[_Branch]  # the branch behind each logit row


class TreeRun:
    """The state of one batch of trees being sampled on a pool; `run()` drives it to the end."""

    def __init__(
        self,
        model: torch.nn.Module,
        pool: BlockPool,
        prompts_ids: list[list[int]],
        prompts: list,
        spec: TreeSpec,
        params: SamplingParams,
        seed: int,
        max_step_tokens: int,
        attn_impl: str,
        policy_version: int = 0,
    ) -> None:
        self.model, self.pool, self.spec, self.params = model, pool, spec, params
        self.max_step_tokens = max_step_tokens
        self.attn_impl = attn_impl
        self.kv: dict[Node, _KV] = {}
        self.live: list[_Branch] = []
        self.next_id: list[int] = []
        self.trees: list[Tree] = []
        seed_key = branch_key(seed & ((1 << 62) - 1), 0x5EED)
        for i, (ids, prompt) in enumerate(zip(prompts_ids, prompts, strict=True)):
            root = Node(id=0, depth=0, key=branch_key(seed_key, i), tokens=list(ids))
            self.trees.append(Tree(root=root, prompt=prompt, policy_version=policy_version))
            self.next_id.append(1)
        self.waiting = list(range(len(self.trees)))  # trees not admitted yet, in caller order
        self.reserved: dict[int, int] = {}  # admitted tree -> worst-case blocks
        self.device = pool.k.device

    # admission ------------------------------------------------------------------------------
    def admit(self) -> None:
        """Start waiting trees, in order, while the worst case of all admitted trees fits."""
        while self.waiting:
            i = self.waiting[0]
            need = worst_case_blocks(
                self.spec, len(self.trees[i].root.tokens), self.pool.block_size
            )
            if sum(self.reserved.values()) + need > self.pool.num_blocks and self.reserved:
                return
            self.waiting.pop(0)
            self.reserved[i] = need
            root = self.trees[i].root
            self.kv[root] = _KV()
            self.live.append(_Branch(i, root, target=len(root.tokens), forks=self.spec.width[0]))

    # plan ------------------------------------------------------------------------------------
    def plan(self) -> _StepPlan:
        """Queries of all live branches: decode tokens first, then prompt chunks up to budget."""
        budget = self.max_step_tokens
        ordered = sorted(self.live, key=lambda b: len(b.node.tokens) - self.kv[b.node].stored)
        segments: list[Segment] = []
        seg_of: dict[Node, int] = {}
        rows, ids, pos, slots, logit_rows, logit_branches = [], [], [], [], [], []
        for br in ordered:
            node, kv = br.node, self.kv[br.node]
            q_len = min(len(node.tokens) - kv.stored, max(budget, 1))
            if q_len <= 0 or (budget <= 0 and rows):
                continue
            budget -= q_len
            self._grow(kv, kv.stored + q_len)
            bs = self.pool.block_size
            for j in range(kv.stored, kv.stored + q_len):
                slots.append(kv.blocks[j // bs] * bs + j % bs)
            ids.extend(node.tokens[kv.stored : kv.stored + q_len])
            pos.extend(range(kv.start + kv.stored, kv.start + kv.stored + q_len))
            kv.stored += q_len
            path = []
            for n in node.path():
                if n not in seg_of:
                    seg_of[n] = len(segments)
                    segments.append(Segment(self.kv[n].blocks, self.kv[n].stored))
                path.append(seg_of[n])
            rows.append(Row(q_start=len(ids) - q_len, q_len=q_len, path=path))
            self.trees[br.tree].stats.tokens_forwarded += q_len
            if kv.stored == len(node.tokens):
                logit_rows.append(len(ids) - 1)
                logit_branches.append(br)
        plan = plan_cascade(segments, rows, self.pool.block_size, device=self.device)

        def t(x: list[int]) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.int64, device=self.device)

        ctx = StepContext(self.pool, plan, t(slots), self.attn_impl)
        return _StepPlan(ctx, t(ids)[None], t(pos)[None], t(logit_rows), logit_branches)

    def _grow(self, kv: _KV, tokens: int) -> None:
        need = self.pool.blocks_for(tokens) - len(kv.blocks)
        if need > 0:
            kv.blocks.extend(self.pool.allocate(need))

    # forward ---------------------------------------------------------------------------------
    def forward(self, step: _StepPlan) -> torch.Tensor:
        """Logits [R, V] at the step's logit rows."""
        out = self.model(
            input_ids=step.input_ids,
            position_ids=step.position_ids,
            cache=PoolCache(),
            use_cache=True,
            logits_to_keep=step.logit_rows,
            tree_step=step.ctx,
        )
        logits = out.logits[0]
        if not bool(torch.isfinite(logits).all()):
            raise FloatingPointError(
                "the model produced non-finite logits (NaN or inf); check its weights and dtype"
            )
        return logits

    # sample + commit -------------------------------------------------------------------------
    def sample_and_commit(self, step: _StepPlan, logits: torch.Tensor) -> None:
        """Draw each branch's next token (or each new child's first) and apply them."""
        rows, keys, owners = [], [], []  # owners: (branch, child index or -1)
        for r, br in enumerate(step.branches):
            node = br.node
            if len(node.tokens) >= br.target:  # full: fork, one draw per child
                for c in range(br.forks):
                    rows.append(r)
                    keys.append(branch_key(branch_key(node.key, c), 0))
                    owners.append((br, c))
            else:
                rows.append(r)
                keys.append(branch_key(node.key, len(node.tokens)))
                owners.append((br, -1))
        if not rows:
            return
        p = self.params
        drawn = sample(
            logits[torch.tensor(rows, device=logits.device)],
            torch.tensor(keys, dtype=torch.int64, device=logits.device),
            p.temperature,
            p.top_k,
            p.top_p,
        )
        tokens, logprobs = drawn.tokens.tolist(), drawn.logprobs.tolist()  # the step's host sync
        forked: dict[int, list[_Branch]] = {}
        for (br, c), tok, lp in zip(owners, tokens, logprobs, strict=True):
            if c < 0:
                self._append(br, tok, lp)
            else:
                forked.setdefault(id(br), []).append(self._child(br, c, tok, lp))
        for br in step.branches:
            if id(br) in forked:
                br.node.finish_reason = "branch"
                self._retire(br)

    def _append(self, br: _Branch, tok: int, lp: float) -> None:
        br.node.tokens.append(tok)
        br.node.logprobs.append(lp)
        if tok in self.params.eos_ids:
            self._finish(br, "eos")
        elif len(br.node.tokens) >= br.target and br.forks == 0:
            self._finish(br, "length")

    def _child(self, parent: _Branch, c: int, tok: int, lp: float) -> _Branch:
        pnode = parent.node
        depth = pnode.depth + 1
        node = Node(
            id=self.next_id[parent.tree], depth=depth, key=branch_key(pnode.key, c), parent=pnode
        )
        self.next_id[parent.tree] += 1
        pnode.children.append(node)
        pkv = self.kv[pnode]
        self.kv[node] = _KV(start=pkv.start + pkv.stored)
        self.pool.share(self._path_blocks(pnode))
        forks = self.spec.width[depth] if depth < self.spec.depth else 0
        br = _Branch(parent.tree, node, target=self.spec.target(depth), forks=forks)
        self.live.append(br)
        self._append(br, tok, lp)
        return br

    def _path_blocks(self, node: Node) -> list[int]:
        return [b for n in node.path() for b in self.kv[n].blocks]

    def _finish(self, br: _Branch, reason: str) -> None:
        br.node.finish_reason = reason
        self._retire(br)

    def _retire(self, br: _Branch) -> None:
        """The branch needs no more KV: drop its references (its own blocks and its ancestors')."""
        self.live.remove(br)
        self.pool.release(self._path_blocks(br.node))
        if not any(b.tree == br.tree for b in self.live):
            self.reserved.pop(br.tree, None)

    # driver ----------------------------------------------------------------------------------
    def run(self) -> list[Tree]:
        start = time.perf_counter()
        self.pool.peak_used = self.pool.used_blocks
        try:
            with torch.inference_mode():
                self.admit()
                while self.live:
                    step = self.plan()
                    logits = self.forward(step)
                    self.sample_and_commit(step, logits)
                    for tree_idx in {br.tree for br in step.branches}:
                        self.trees[tree_idx].stats.forward_passes += 1
                    self.admit()
        except BaseException:
            self.abort()
            raise
        seconds = time.perf_counter() - start
        peak = self.pool.peak_used * self.pool.bytes_per_block
        for tree in self.trees:
            tree.stats.seconds = seconds
            tree.stats.peak_kv_bytes = peak
            tree.stats.unique_tokens = tree.unique_tokens()
        return self.trees

    def abort(self) -> None:
        """Return every block this run holds to the pool."""
        for br in list(self.live):
            self.live.remove(br)
            self.pool.release(self._path_blocks(br.node))
        self.reserved.clear()
