"""The prefix cache that outlives a request: finished KV nodes stay in the pool as a radix tree.

When a KV node's last reference goes (its branch finished, its tree was cancelled, its shared
prefix's last reader retired), the node is retained instead of freed: it keeps its blocks and its
reference on its parent, so a retained subtree is whole and each retained node is a path of exact
token ids from position 0. A later request whose prompt extends such a path starts from it and
computes only its new tokens: turn k+1 of a conversation (turn k's prompt + answer + observation)
forwards only what turn k did not. This is SGLang's RadixAttention, on our KV nodes:

- token-granular reuse: a match that ends inside a node reuses its first m tokens through a *view*
  (a node with the same parent and start, holding the first blocks of the source and one more
  reference on each; the view's readers read only its m slots, and new tokens go to a fresh block
  below it, so nothing is ever written into a shared block);
- one pool, one budget: retained blocks are pool blocks; admission evicts them, least recently used
  first, when a tree needs the room (`evict_one`); only nodes nobody references (refs == 0, so no
  running branch reads them and no retained child hangs below them) can go, leaf-first by
  construction;
- the stale-KV rule: `flush()` drops everything (a weight update); a step that fails flushes too,
  since the keys/values it was writing are not trustworthy.

The index holds retained nodes and their ancestors (prompt segments, shared prefixes, inner tree
nodes, all fixed once they have children), and the prompts of running trees once prefilled
(`publish`), keyed by first token. A node is retained with its tokens
cut to those stored (a leaf's last sampled token was never forwarded), so for every indexed node
`stored == len(tokens)`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from .block_pool import BlockPool
from .kv_nodes import KVNode, unref


@dataclass(frozen=True)
class Match:
    """The longest cached prefix of a prompt: `node` is matched whole (None: nothing, or only
    part of a root), and `partial` (if any) matches its first `partial_len` tokens after it."""

    node: KVNode | None
    partial: KVNode | None
    partial_len: int

    @property
    def length(self) -> int:
        """Tokens of the prompt the match covers."""
        base = self.node.end if self.node is not None else 0
        return base + (self.partial_len if self.partial is not None else 0)


@dataclass
class CacheStats:
    lookups: int = 0
    hits: int = 0  # lookups that reused at least one token
    tokens_reused: int = 0
    evicted_blocks: int = 0
    flushes: int = 0


class RadixCache:
    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.roots: dict[int, list[KVNode]] = {}
        self.kids: dict[int, dict[int, list[KVNode]]] = {}  # id(node) -> first token -> children
        self.indexed: set[int] = set()
        self.evictable: OrderedDict[int, KVNode] = OrderedDict()  # LRU first
        # blocks of the evictable nodes, kept as a count: the service reads it from another thread
        self.evictable_blocks = 0
        self.stats = CacheStats()

    # retention (called by kv_nodes.unref) ----------------------------------------------------
    def retain(self, node: KVNode) -> bool:
        """Keep `node` (refs just reached 0) as an evictable leaf; False if it holds no KV."""
        if node.stored == 0:
            self._unindex(node)
            return False
        if len(node.tokens) != node.stored:
            node.tokens = node.tokens[: node.stored]  # a copy: the tree's own list is untouched
            keep = self.pool.blocks_for(node.stored)
            self.pool.release(node.blocks[keep:])
            node.blocks = node.blocks[:keep]
        for n in node.path():
            self._index(n)
        self.evictable[id(node)] = node
        self.evictable_blocks += len(node.blocks)
        return True

    def publish(self, node: KVNode) -> None:
        """Index a live node whose keys are all stored and fixed (a prompt just prefilled), so a
        request that arrives while it still runs starts from it rather than computing it again."""
        for n in node.path():
            self._index(n)

    def revive(self, node: KVNode) -> None:
        """One more reference on `node` (a new reader starts below it)."""
        if self.evictable.pop(id(node), None) is not None:
            self.evictable_blocks -= len(node.blocks)
        node.refs += 1

    def _index(self, node: KVNode) -> None:
        if id(node) in self.indexed:
            return
        assert node.stored == len(node.tokens) > 0, "only whole, fixed segments are indexed"
        table = self.roots if node.parent is None else self.kids.setdefault(id(node.parent), {})
        table.setdefault(node.tokens[0], []).append(node)
        self.indexed.add(id(node))

    def _unindex(self, node: KVNode) -> None:
        if id(node) not in self.indexed:
            return
        self.indexed.discard(id(node))
        table = self.roots if node.parent is None else self.kids.get(id(node.parent), {})
        siblings = table.get(node.tokens[0], [])
        siblings.remove(node)
        if not siblings:
            del table[node.tokens[0]]
        self.kids.pop(id(node), None)

    # lookup ----------------------------------------------------------------------------------
    def lookup(self, ids: list[int], limit: int) -> Match:
        """The longest cached prefix of `ids[:limit]`; touches it (most recently used)."""
        self.stats.lookups += 1
        node, pos, table, match = None, 0, self.roots, None
        while match is None and pos < limit:
            best, best_len = None, 0
            for cand in table.get(ids[pos], ()):
                m = _common(cand.tokens, ids, pos, limit)
                if m > best_len:
                    best, best_len = cand, m
            if best is None:
                break
            if best_len < len(best.tokens):
                match = Match(node, best, best_len)
            else:
                node, pos, table = best, pos + best_len, self.kids.get(id(best), {})
        if match is None:
            match = Match(node, None, 0)
        for n in (match.partial, match.node):
            if n is not None and id(n) in self.evictable:
                self.evictable.move_to_end(id(n))
        if match.length:
            self.stats.hits += 1
            self.stats.tokens_reused += match.length
        return match

    def pin(self, match: Match) -> None:
        """Hold what `match` reuses, so that evicting for room cannot take it."""
        for n in (match.node, match.partial):
            if n is not None:
                self.revive(n)

    def attach(self, match: Match) -> KVNode | None:
        """The node a new reader starts below (a view for a partial match), holding one reference
        for that reader; turns the pins of `pin(match)` into that reference."""
        if match.partial is None:
            return match.node  # its pin is the reader's reference
        src, m = match.partial, match.partial_len
        blocks = src.blocks[: self.pool.blocks_for(m)]
        self.pool.share(blocks)
        view = KVNode(
            tokens=src.tokens[:m],
            parent=match.node,
            start=src.start,
            blocks=blocks,
            stored=m,
            owner=id(src),
        )
        # the view's reference on its parent is the parent's pin; the source loses its pin
        unref(src, self.pool)
        return view

    def unpin(self, match: Match) -> None:
        """Undo `pin` (the tree did not start after all)."""
        for n in (match.partial, match.node):
            if n is not None:
                unref(n, self.pool)

    # eviction --------------------------------------------------------------------------------
    def evict_one(self) -> bool:
        """Free the least recently used unreferenced node; False when there is none."""
        if not self.evictable:
            return False
        _, node = self.evictable.popitem(last=False)
        self.evictable_blocks -= len(node.blocks)
        assert node.refs == 0, "evicting a node that is still read"
        self._unindex(node)
        self.stats.evicted_blocks += len(node.blocks)
        self.pool.release(node.blocks)
        node.blocks = []
        if node.parent is not None:
            unref(node.parent, self.pool)  # it may become an evictable leaf in turn
        return True

    def flush(self) -> int:
        """Evict everything unreferenced (a weight update; a failed step). Returns the blocks."""
        before = self.pool.used_blocks
        while self.evict_one():
            pass
        self.stats.flushes += 1
        return before - self.pool.used_blocks


def _common(tokens: list[int], ids: list[int], pos: int, limit: int) -> int:
    n, cap = 0, min(len(tokens), limit - pos)
    while n < cap and tokens[n] == ids[pos + n]:
        n += 1
    return n
