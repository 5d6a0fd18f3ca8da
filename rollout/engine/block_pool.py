"""The KV block pool: preallocated key/value storage for all layers, in refcounted blocks.

Storage per layer is `[num_blocks * block_size, kv_heads, head_dim]` (a flat view of
`[num_blocks, block_size, kv_heads, head_dim]`), allocated once: fresh allocations on the hot path
are slow (page faults) and fragment memory. A block's refcount counts its holders: the KV node
that wrote it (kv_nodes.py; nodes count the live branches below them, so children read their
ancestors' blocks in place, never a copy), views of it in the radix cache of finished nodes
(`cache`, radix_cache.py), and the LRU cache of prompt blocks (prefix_cache.py) while it keeps
the block. NOTE: each tree node's segment starts on a fresh block, so a fork never needs
copy-on-write (the cost: under one block of slack per node).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from tree_kernels.cascade_cpu_native import NATIVE_DTYPES, native_op

if TYPE_CHECKING:
    from .radix_cache import RadixCache


class PoolExhausted(RuntimeError):
    """Raised when an allocation asks for more blocks than are free."""


class BlockPool:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"BlockPool: num_blocks={num_blocks}, block_size={block_size} must be >= 1"
            )
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (num_layers, num_blocks * block_size, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # each layer's views, made once (a decode step reads them per layer)
        self._layers = [(self.k[i], self.v[i]) for i in range(num_layers)]
        self.refcount = [0] * num_blocks
        # A min-heap: allocations take the lowest free ids, so a prompt prefilled into a pool
        # that is mostly free lands in consecutive blocks (the CPU attention path then reads it
        # in place, kernels/cascade_cpu_schedule.py) however scattered the last run left it.
        self._free = list(range(num_blocks))
        self.peak_used = 0
        self.cache: RadixCache | None = None  # retains KV nodes past their last reference

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block holds across all layers, keys and values."""
        per_layer = self.k[0, : self.block_size].numel() * self.k.element_size()
        return 2 * self.num_layers * per_layer

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """`n` fresh blocks, each with refcount 1."""
        if not self.can_allocate(n):
            raise PoolExhausted(
                f"asked for {n} KV blocks, {len(self._free)} of {self.num_blocks} free"
            )
        blocks = [heapq.heappop(self._free) for _ in range(n)]
        for b in blocks:
            self.refcount[b] = 1
        self.peak_used = max(self.peak_used, self.used_blocks)
        return blocks

    def share(self, blocks: Iterable[int]) -> None:
        """One more holder for each block (a cache entry, or a tree reusing cached blocks)."""
        for b in blocks:
            assert self.refcount[b] > 0, f"sharing free block {b}"
            self.refcount[b] += 1

    def release(self, blocks: Iterable[int]) -> None:
        """One holder fewer; blocks nobody holds go back to the pool."""
        for b in blocks:
            assert self.refcount[b] > 0, f"releasing free block {b}"
            self.refcount[b] -= 1
            if self.refcount[b] == 0:
                heapq.heappush(self._free, b)

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) of one layer, each [num_slots, kv_heads, head_dim]."""
        return self._layers[layer_idx]

    def write(self, layer_idx: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new keys/values [T, kv_heads, head_dim] at flat slot ids [T] (on the CPU, one
        native op for both, where it is built: kernels/cascade_cpu_native.cpp)."""
        if self.k.device.type == "cpu" and _native_write(self.k, k, v, slots):
            torch.ops.tree_kernels_cpu.write_kv(self.k, self.v, layer_idx, slots, k, v)
            return
        self.k[layer_idx].index_copy_(0, slots, k.to(self.k.dtype))
        self.v[layer_idx].index_copy_(0, slots, v.to(self.v.dtype))

    def write_states(self, layer_idx: int, slots: torch.Tensor, key_states: torch.Tensor,
                     value_states: torch.Tensor) -> None:
        """`write` for keys/values in a model's own layout, [1, kv_heads, T, head_dim] (the
        native op reads that layout as it is: no views made per layer)."""
        if self.k.device.type == "cpu" and _native_write(self.k, key_states, value_states, slots):
            torch.ops.tree_kernels_cpu.write_kv(
                self.k, self.v, layer_idx, slots, key_states, value_states
            )
            return
        self.write(layer_idx, slots, key_states[0].transpose(0, 1), value_states[0].transpose(0, 1))


def _native_write(pool: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  slots: torch.Tensor) -> bool:
    return (
        pool.dtype in NATIVE_DTYPES
        and k.dtype in NATIVE_DTYPES
        and v.dtype == k.dtype
        and k.device.type == "cpu"
        and slots.dtype == torch.int64
        and slots.is_contiguous()
        and k.stride(-1) == 1
        and v.stride(-1) == 1
        and native_op() is not None
    )
