"""KV nodes: the engine's view of a tree, one node per segment of keys/values in the block pool.

A `KVNode` is a shared prefix (several prompts), a prompt, or a sampled segment of a tree node. Its
`refs` counts the live work at or below it (a branch still sampling here, a child node alive, a
scheduler holding a prefix for trees not yet admitted). When `refs` reaches zero the node's blocks
go back to the pool and its parent loses a reference, so a block lives exactly as long as some live
branch reads it. Forking a child costs one increment, whatever the path's length: children read
their ancestors' blocks in place. The pool's own per-block refcount counts holders of a block
(the node that wrote it, and the prefix cache when it keeps one).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .block_pool import BlockPool


@dataclass(eq=False)
class KVNode:
    tokens: list[int]  # the segment's token ids (for a tree node, the same list as Node.tokens)
    parent: KVNode | None = None
    start: int = 0  # absolute position of the first token
    blocks: list[int] = field(default_factory=list)
    stored: int = 0  # tokens whose keys/values are in the pool
    refs: int = 1
    owner: int = 0  # whose KV budget its blocks count against (a tree's or a shared prefix's)
    freed_blocks: int = 0  # blocks it gave back when its last reference went (per-tree stats)
    slot_cache: list[int] = field(default_factory=list, repr=False)  # step_paths.slot_ids
    # hybrid models (state_store.py): the blocks of its state slot once it forwards, whether that
    # state is still empty (no token seen on the path), and children yet to copy it after a fork
    state: list[int] | None = None
    state_fresh: bool = True
    state_readers: int | None = None

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)

    @property
    def pending(self) -> int:
        """Tokens not forwarded yet."""
        return len(self.tokens) - self.stored

    def path(self) -> list[KVNode]:
        """Nodes from the topmost ancestor down to this one."""
        out, node = [], self
        while node is not None:
            out.append(node)
            node = node.parent
        return out[::-1]

    def child(self, tokens: list[int], owner: int) -> KVNode:
        """A new node below this one (holding one reference on it)."""
        self.refs += 1
        return KVNode(tokens=tokens, parent=self, start=self.end, owner=owner)


def grow(node: KVNode, pool: BlockPool, tokens: int) -> int:
    """Make `node` hold blocks for its first `tokens` tokens; returns the blocks allocated."""
    need = pool.blocks_for(tokens) - len(node.blocks)
    if need > 0:
        node.blocks.extend(pool.allocate(need))
    return max(need, 0)


def unref(node: KVNode | None, pool: BlockPool) -> list[KVNode]:
    """Drop one reference; nodes left without any free their blocks and their parent's reference,
    walking up, unless the pool's prefix cache retains them (radix_cache.py: a retained node keeps
    its blocks and its parent). Returns the nodes that lost their last reference."""
    freed = []
    while node is not None:
        assert node.refs > 0, "KV node released more often than referenced"
        node.refs -= 1
        if node.refs:
            break
        node.freed_blocks = len(node.blocks)
        if node.state is not None:  # its state slot goes with it (counted with its blocks)
            node.freed_blocks += len(node.state)
            pool.release(node.state)
            node.state = None
        freed.append(node)
        if pool.cache is not None and pool.cache.retain(node):
            break
        pool.release(node.blocks)
        node.blocks = []
        node = node.parent
    return freed
