"""An LRU cache of whole prompt blocks, the prefix caching of vLLM and SGLang (our baseline policy).

A cached block is keyed by its tokens and the entry of the block before it, so a lookup walks a
prompt block by block and stops at the first miss; keys are exact (no hashing of token content).
The cache holds one pool reference per block. Recency is kept so that the deepest blocks of the
least recently used prompt go first: evicting a chain's first block would orphan the rest.
"""

from __future__ import annotations

from collections import OrderedDict

from .block_pool import BlockPool


class LRUPrefixCache:
    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        # (previous entry id, block tokens) -> (entry id, block); order = eviction order
        self.entries: OrderedDict[tuple[int, tuple[int, ...]], tuple[int, int]] = OrderedDict()
        self.next_id = 1

    def _walk(self, ids: list[int], num_blocks: int) -> list[tuple[int, tuple[int, ...]]]:
        keys, prev, bs = [], 0, self.pool.block_size
        for j in range(num_blocks):
            key = (prev, tuple(ids[j * bs : (j + 1) * bs]))
            hit = self.entries.get(key)
            if hit is None:
                break
            keys.append(key)
            prev = hit[0]
        return keys

    def _touch(self, keys: list[tuple[int, tuple[int, ...]]]) -> None:
        """Most recent last; within a chain the first block is the most recent of all."""
        for key in reversed(keys):
            self.entries.move_to_end(key)

    def lookup(self, ids: list[int], max_tokens: int) -> list[int]:
        """Cached blocks holding the longest block-aligned prefix of `ids` (<= max_tokens)."""
        keys = self._walk(ids, max(0, max_tokens) // self.pool.block_size)
        self._touch(keys)
        return [self.entries[k][1] for k in keys]

    def insert(self, ids: list[int], blocks: list[int]) -> None:
        """Cache the full blocks of a stored prompt (blocks[j] holds tokens j*bs .. (j+1)*bs)."""
        bs, prev, keys = self.pool.block_size, 0, []
        for j in range(min(len(ids) // bs, len(blocks))):
            key = (prev, tuple(ids[j * bs : (j + 1) * bs]))
            hit = self.entries.get(key)
            if hit is None:
                self.pool.share([blocks[j]])
                hit = (self.next_id, blocks[j])
                self.next_id += 1
                self.entries[key] = hit
            keys.append(key)
            prev = hit[0]
        self._touch(keys)

    def evict_one(self) -> bool:
        """Give up the least recently used block that only the cache holds; False if none."""
        for key, (_, block) in self.entries.items():
            if self.pool.refcount[block] == 1:
                del self.entries[key]
                self.pool.release([block])
                return True
        return False

    def clear(self) -> None:
        for _, block in self.entries.values():
            self.pool.release([block])
        self.entries.clear()
