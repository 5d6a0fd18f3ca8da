"""Admission policies: which trees start when, and which prefix KV they start from.

Both policies keep the KV pool inside its budget the same way: every owner of KV (a tree, a shared
prefix) reserves its worst case when it starts, and a tree starts only when

    blocks in use + growth still reserved by running owners + the tree's worst case <= budget

so an allocation never fails mid-run; work waits instead. With a hybrid model each node also
holds a state slot of `state_blocks` blocks (state_store.py) while it forwards, counted alike.

- `GlobalPrefixScheduler` (BatchLLM, the default): a prefix trie over all waiting prompts picks the
  shared prefixes worth keeping (prefix_trie.py); trees that share a top-level prefix form a group;
  groups run in order of decode ratio (expected decode tokens over prefill tokens), largest first,
  so decode-heavy work starts early and later prefills mix with its decode steps. Each shared
  prefix is computed once; the scheduler holds it until the last tree that uses it has started,
  then the trees' references alone keep it, and it is freed with the last of them. A tree that
  arrives while a shared prefix of its prompt is still alive (a later service request with the
  same system prompt) starts from that prefix instead of computing it again, if it is still alive
  when the tree starts (nothing holds it for the tree, so waiting never pins blocks).
- `FCFSLRUScheduler` (what vLLM and SGLang do; the baseline): trees start in arrival order and
  reuse whole prompt blocks from an LRU prefix cache that lives in the same budget; the cache gives
  up least recently used blocks when a tree needs room, and an evicted prefix is recomputed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from trees import Tree
from trees.spec import TreeSpec

from .block_pool import BlockPool
from .kv_nodes import KVNode, unref
from .prefix_cache import LRUPrefixCache
from .prefix_trie import plan_prefixes
from .programs import TextProgram
from .radix_cache import Match

POLICIES = ("global", "fcfs-lru")


@dataclass(eq=False)
class Job:
    """One tree to sample, and what the engine tracks about it."""

    index: int  # position in the caller's batch
    tree: Tree
    spec: TreeSpec
    params: Any  # text_engine.SamplingParams
    live: int = 0  # branches still running or waiting for their environment
    root_kv: KVNode | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    program: Any = None  # what its branches do (programs.py); None: TextProgram(spec)

    def __post_init__(self) -> None:
        if self.program is None:
            self.program = TextProgram(self.spec)

    @property
    def prompt_ids(self) -> list[int]:
        return self.tree.root.tokens

    def decode_tokens(self) -> int:
        """Tokens the tree samples if no branch stops early (with entropy-guided branching, an
        upper bound: see TreeSpec.max_tokens_per_level); orders groups, reserves nothing."""
        return sum(self.spec.max_tokens_per_level())

    def max_nodes(self) -> int:
        """Tree nodes it can create (root included): each holds one state slot of a hybrid
        model at most once (state_store.py)."""
        return sum(self.spec.nodes_at(d) for d in range(self.spec.depth + 1))


def own_worst_blocks(job: Job, own_prompt_tokens: int, block_size: int, state_blocks: int) -> int:
    """Blocks of a tree's own nodes at most: their KV, and one state slot per node (hybrids)."""
    kv = job.program.worst_blocks(own_prompt_tokens, block_size)
    return kv + state_blocks * job.max_nodes()


def tree_blocks(spec: TreeSpec, own_prompt_tokens: int, block_size: int) -> int:
    """KV blocks a text tree holds at most: its own prompt part plus every node full, all alive."""
    return TextProgram(spec).worst_blocks(own_prompt_tokens, block_size)


@dataclass(frozen=True)
class Admission:
    job: Job
    root: KVNode  # the tree's own prompt segment, below its shared prefix if it has one
    new_prefixes: tuple[KVNode, ...]  # shared prefixes created for it, still to be prefilled


class Budget:
    """Reserved-growth bookkeeping (see the module doc). Owners are ids of jobs or prefix nodes."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.reserved: dict[int, int] = {}
        self.allocated: dict[int, int] = {}

    def growth(self) -> int:
        return sum(max(0, r - self.allocated[o]) for o, r in self.reserved.items())

    def fits(self, need: int) -> bool:
        return self.pool.used_blocks + self.growth() + need <= self.pool.num_blocks

    def reserve(self, owner: int, blocks: int) -> None:
        self.reserved[owner] = blocks
        self.allocated[owner] = 0

    def note_alloc(self, owner: int, n: int) -> None:
        if owner in self.allocated:
            self.allocated[owner] += n

    def drop(self, owner: int) -> None:
        self.reserved.pop(owner, None)
        self.allocated.pop(owner, None)


class GlobalPrefixScheduler:
    name = "global"

    def __init__(self, pool: BlockPool, min_saved_tokens: int = 64) -> None:
        self.pool = pool
        self.budget = Budget(pool)
        self.state_blocks = 0  # blocks of one state slot (hybrid models; set by the run)
        self.min_saved_tokens = min_saved_tokens
        self.waiting: list[Job] = []
        self.chains: dict[int, list[tuple[int, ...]]] = {}  # id(job) -> prefix keys, top down
        # id(job) -> (chain re-rooted on a live prefix, that prefix's key): used while it lives
        self.rerooted: dict[int, tuple[list[tuple[int, ...]], tuple[int, ...]]] = {}
        self.live: dict[tuple[int, ...], KVNode] = {}  # prefix key (all tokens to its end) -> node
        self.key_of: dict[int, tuple[int, ...]] = {}  # id(prefix node) -> key
        self.holds: dict[tuple[int, ...], int] = {}  # waiting trees that will read a prefix
        self.held: set[tuple[int, ...]] = set()  # live prefixes the scheduler keeps a reference on

    def add(self, jobs: Sequence[Job]) -> None:
        """Queue `jobs`; re-plan shared prefixes and group order over everything waiting."""
        self._forget_cached()
        self.waiting.extend(jobs)
        plan = plan_prefixes([j.prompt_ids for j in self.waiting], self.min_saved_tokens)
        self.chains, self.holds, self.rerooted = {}, {}, {}
        groups: dict[object, list[Job]] = {}
        for i, job in enumerate(self.waiting):
            chain, idx = [], plan.prompt_prefix[i]
            while idx is not None:
                sp = plan.shared[idx]
                chain.append(tuple(job.prompt_ids[: sp.start + len(sp.tokens)]))
                idx = sp.parent
            chain.reverse()
            self.chains[id(job)] = chain
            rerooted = self._on_live_prefix(job.prompt_ids, chain)
            if rerooted is not None:
                self.rerooted[id(job)] = rerooted
            for key in chain:
                self.holds[key] = self.holds.get(key, 0) + 1
            groups.setdefault(chain[0] if chain else id(job), []).append(job)
        # Groups whose shared prefix is already live go first (its held blocks must not block a
        # newer group); then by decode ratio, largest first.
        ordered = sorted(
            groups.values(),
            key=lambda members: (self._has_live_prefix(members[0]), self._decode_ratio(members)),
            reverse=True,
        )
        self.waiting = [j for members in ordered for j in members]
        for key, n in self.holds.items():  # keep live prefixes alive for the new waiters
            if n and key in self.live and key not in self.held:
                self.live[key].refs += 1
                self.held.add(key)
        for key in [k for k in self.held if not self.holds.get(k)]:  # no waiter reads it any more
            self.held.discard(key)
            self.freed(unref(self.live[key], self.pool))

    def _on_live_prefix(
        self, prompt: list[int], chain: list[tuple[int, ...]]
    ) -> tuple[list[tuple[int, ...]], tuple[int, ...]] | None:
        """`chain` re-rooted on the deepest live prefix that `prompt` extends (its own chain, then
        the planned keys that go past it), and that prefix's key; None when there is none. A tree
        that arrives while trees reading a shared prefix still run (a later service request with
        the same system prompt) then computes none of it. The reuse is soft: nothing holds that
        prefix for the waiting tree (so it never pins blocks or jumps the queue), and the tree
        falls back to its planned chain if the prefix is freed before it starts."""
        best = max(
            (k for k in self.live if len(k) < len(prompt) and tuple(prompt[: len(k)]) == k),
            key=len,
            default=None,
        )
        if best is None:
            return None
        live_chain, node = [], self.live[best]
        while node is not None and id(node) in self.key_of:  # above: a radix-cache node, if any
            live_chain.append(self.key_of[id(node)])
            node = node.parent
        return live_chain[::-1] + [k for k in chain if len(k) > len(best)], best

    def _chain(self, job: Job) -> list[tuple[int, ...]]:
        """The prefix chain `job` starts from: re-rooted while its live prefix lives, or planned."""
        rerooted = self.rerooted.get(id(job))
        if rerooted is not None and rerooted[1] in self.live:
            return rerooted[0]
        return self.chains[id(job)]

    def remove(self, jobs: Sequence[Job]) -> None:
        """Forget waiting `jobs` (never started) and re-plan the rest."""
        gone = {id(j) for j in jobs}
        self.waiting, keep = [], [j for j in self.waiting if id(j) not in gone]
        self.add(keep)

    def _has_live_prefix(self, job: Job) -> bool:
        chain = self.chains[id(job)]
        return bool(chain) and chain[0] in self.live

    def _decode_ratio(self, members: list[Job]) -> float:
        """Expected decode tokens over prefill tokens (each shared segment counted once)."""
        segments: dict[tuple[int, ...], int] = {}
        prefill = 0
        for job in members:
            chain = self.chains[id(job)]
            prefill += self._own_tokens(job)
            for prev, key in zip([(), *chain], chain, strict=False):
                segments[key] = len(key) - len(prev)
        prefill += sum(segments.values())
        return sum(j.decode_tokens() for j in members) / max(prefill, 1)

    def _own_tokens(self, job: Job, chain: list[tuple[int, ...]] | None = None) -> int:
        chain = self.chains[id(job)] if chain is None else chain
        return len(job.prompt_ids) - (len(chain[-1]) if chain else 0)

    def worst_case(self, job: Job) -> int:
        """Blocks `job` needs with its whole prefix chain, when nothing is running."""
        need, prev = self._own_need(job, self._own_tokens(job)), 0
        for key in self.chains[id(job)]:
            need += self._prefix_need(len(key) - prev)
            prev = len(key)
        return need

    def _own_need(self, job: Job, own_prompt_tokens: int) -> int:
        return own_worst_blocks(job, own_prompt_tokens, self.pool.block_size, self.state_blocks)

    def _prefix_need(self, tokens: int) -> int:
        return self.pool.blocks_for(tokens) + self.state_blocks

    def admit(self) -> list[Admission]:
        """Start waiting trees, in order, while they fit (evicting cached KV to make room)."""
        out, cache = [], self.pool.cache
        while self.waiting:
            self._forget_cached()  # evicting for the tree before may have emptied some
            job = self.waiting[0]
            chain = self._chain(job)
            hit = self._cached(job, chain)
            if hit is not None:
                cache.pin(hit)  # before evicting anything
            base = hit.length if hit is not None else self._live_base(chain)[1]
            deepest = max(base, len(chain[-1]) if chain else 0)
            own = self._own_need(job, len(job.prompt_ids) - deepest)
            need, prev = own, base
            for key in chain:
                if len(key) > base:
                    need += self._prefix_need(len(key) - prev)
                    prev = len(key)
            while not self.budget.fits(need) and cache is not None and cache.evict_one():
                pass
            if not self.budget.fits(need):
                if hit is not None:
                    cache.unpin(hit)
                break
            self.waiting.pop(0)
            out.append(self._start(job, own, hit))
        return out

    def _forget_cached(self) -> None:
        """Drop live prefixes that lost their last reference to a cache eviction below them (the
        radix cache retains them in turn; they are found through it, not through `live`)."""
        if self.pool.cache is not None:
            self.freed([n for n in self.live.values() if n.refs == 0])

    def _cached(self, job: Job, chain: list[tuple[int, ...]]) -> Match | None:
        """With a radix cache: where the tree starts, its match or the deepest live prefix of its
        chain, whichever is longer (pinned by the caller: evicting for room can empty a live
        prefix too). None without a cache, or when the tree starts from nothing."""
        cache = self.pool.cache
        if cache is None:
            return None
        ids = job.prompt_ids
        hit = cache.lookup(ids, limit=len(ids) - 1)  # the tree's root keeps its last token
        live, length = self._live_base(chain)
        if hit.length > length:
            return hit
        return Match(live, None, 0) if live is not None else None

    def _live_base(self, chain: list[tuple[int, ...]]) -> tuple[KVNode | None, int]:
        """The deepest live prefix of the chain, and its length (None, 0 when there is none)."""
        for key in reversed(chain):
            if key in self.live:
                return self.live[key], len(key)
        return None, 0

    def _start(self, job: Job, own_blocks: int, hit: Match | None) -> Admission:
        chain = self._chain(job)
        if hit is not None:  # holds one reference (the pin), dropped once its child holds one
            parent, base = self.pool.cache.attach(hit), hit.length
        else:
            parent, base = self._live_base(chain)
        pinned = parent if hit is not None else None
        new: list[KVNode] = []
        for key in [k for k in chain if len(k) > base]:
            start = parent.end if parent else 0
            node = KVNode(tokens=list(key[start:]), parent=parent, start=start)
            node.owner = id(node)
            if parent is not None:
                parent.refs += 1
            self.live[key], self.key_of[id(node)] = node, key
            self.held.add(key)  # refs = 1: the scheduler's hold for trees still waiting
            self.budget.reserve(id(node), self._prefix_need(len(node.tokens)))
            new.append(node)
            parent = node
        own = job.prompt_ids[parent.end if parent else 0 :]
        if parent is None:
            root = KVNode(tokens=list(own), owner=id(job))
        else:
            root = parent.child(list(own), owner=id(job))
        if pinned is not None:
            unref(pinned, self.pool)
        self.budget.reserve(id(job), own_blocks)
        for key in self.chains[id(job)]:  # the holds were counted on the planned chain
            self.holds[key] -= 1
            if self.holds[key] == 0 and key in self.held:  # its last tree started: drop the hold
                self.held.discard(key)
                self.freed(unref(self.live[key], self.pool))
        return Admission(job, root, tuple(new))

    def freed(self, nodes: list[KVNode]) -> None:
        for node in nodes:
            key = self.key_of.pop(id(node), None)
            if key is not None:
                self.live.pop(key, None)
                self.budget.drop(id(node))

    def prefilled(self, job: Job) -> None:
        """The tree's prompt is stored: with a radix cache, later arrivals may start from it."""
        if self.pool.cache is not None:
            assert job.root_kv is not None
            self.pool.cache.publish(job.root_kv)

    def finished(self, job: Job) -> None:
        self.budget.drop(id(job))

    def release_holds(self) -> None:
        """Let go of every prefix held for waiting trees; they recompute what is freed. The run
        calls this when nothing runs and the queue still cannot start: the prefixes held for
        several groups can fill a tight pool between them, and waiting would then never end."""
        for key in list(self.held):
            self.held.discard(key)
            self.freed(unref(self.live[key], self.pool))

    def close(self) -> None:
        """Drop the holds on prefixes whose trees never started (cancelled or failed runs)."""
        self.waiting = []
        self.release_holds()


class FCFSLRUScheduler:
    name = "fcfs-lru"

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.budget = Budget(pool)
        self.state_blocks = 0  # blocks of one state slot (hybrid models; set by the run)
        self.cache = LRUPrefixCache(pool)
        self.waiting: list[Job] = []

    def add(self, jobs: Sequence[Job]) -> None:
        self.waiting.extend(jobs)

    def remove(self, jobs: Sequence[Job]) -> None:
        gone = {id(j) for j in jobs}
        self.waiting = [j for j in self.waiting if id(j) not in gone]

    def worst_case(self, job: Job) -> int:
        return own_worst_blocks(job, len(job.prompt_ids), self.pool.block_size, self.state_blocks)

    def admit(self) -> list[Admission]:
        out = []
        while self.waiting:
            job = self.waiting[0]
            ids = job.prompt_ids
            reuse = self.cache.lookup(ids, max_tokens=len(ids) - 1)
            self.pool.share(reuse)  # hold them before evicting anything
            need = self.worst_case(job) - len(reuse)
            while not self.budget.fits(need) and self.cache.evict_one():
                pass
            if not self.budget.fits(need):
                self.pool.release(reuse)
                break
            self.waiting.pop(0)
            bs = self.pool.block_size
            root = KVNode(
                tokens=list(ids), blocks=list(reuse), stored=len(reuse) * bs, owner=id(job)
            )
            self.budget.reserve(id(job), need)
            out.append(Admission(job, root, ()))
        return out

    def freed(self, nodes: list[KVNode]) -> None:
        pass

    def prefilled(self, job: Job) -> None:
        assert job.root_kv is not None
        self.cache.insert(job.prompt_ids, job.root_kv.blocks)

    def finished(self, job: Job) -> None:
        self.budget.drop(id(job))

    def release_holds(self) -> None:
        """Nothing to release: the LRU cache gives up blocks by itself when a tree needs room."""

    def close(self) -> None:
        self.waiting = []
        self.cache.clear()


def make_scheduler(policy: str, pool: BlockPool) -> GlobalPrefixScheduler | FCFSLRUScheduler:
    if policy == "global":
        return GlobalPrefixScheduler(pool)
    if policy == "fcfs-lru":
        return FCFSLRUScheduler(pool)
    raise ValueError(f"policy={policy!r}: expected one of {POLICIES}")
