"""Recurrent state per KV node, kept in the block pool: hybrid models in the cascade engine.

Hybrid models mix attention layers with recurrent, convolution or linear-attention layers whose
state has a fixed size, whatever the sequence length (state_layout.py). The attention layers share
keys/values through the cascade as in any model; the state is per path, so each KV node that
forwards tokens holds one state slot: the state after its last stored token, at every stateful
layer. A node's first forward starts from a copy of its parent's slot (a prompt below a shared
prefix, a child below its forked parent), a root from no state; nothing of the prefix is
recomputed.

The slot lives in the pool itself: a few blocks, allocated and budgeted like KV blocks, whose
key and value rows in every layer hold the state bytes (`placement`). No attention layer reads
these blocks, so the state costs the budget exactly its blocks and nothing outside the pool is
allocated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .block_pool import BlockPool
from .kv_nodes import KVNode
from .state_layout import StateLayout, StateSpec

Note = Callable[[int, int], None]  # (owner, blocks allocated; negative: released)


class Chunk(NamedTuple):
    """The part of a state in one plane: slot blocks [first, last) of plane `plane`, holding
    the state's next `nbytes` bytes from the start of block `first`."""

    plane: int
    first: int
    last: int
    nbytes: int


def placement(
    layout: StateLayout, cell: int, planes: int
) -> tuple[dict[StateSpec, list[Chunk]], int]:
    """Where each state lives in a slot, and the slot's blocks. A slot of S blocks offers
    `planes` x S cells of `cell` bytes (plane p: the key or value rows of one layer, cell j: its
    rows in the slot's j-th block); states fill the cells in order, plane after plane, each from
    a cell of its own, so no two share one."""
    cells = [-(-s.nbytes // cell) for s in layout.specs]
    per_plane = max(1, -(-sum(cells) // planes))  # S: the slot's blocks
    place: dict[StateSpec, list[Chunk]] = {}
    at = 0
    for spec, n in zip(layout.specs, cells, strict=True):
        chunks = []
        for plane in range(at // per_plane, (at + n - 1) // per_plane + 1):
            lo, hi = max(at, plane * per_plane), min(at + n, (plane + 1) * per_plane)
            nbytes = min((hi - lo) * cell, spec.nbytes - (lo - at) * cell)
            chunks.append(Chunk(plane, lo - plane * per_plane, hi - plane * per_plane, nbytes))
        place[spec], at = chunks, at + n
    return place, per_plane


@dataclass
class StateStep:
    """Where one step's tokens meet state slots (read by state_mixers.py)."""

    store: StateStore
    decode_rows: torch.Tensor | None  # [n] positions in the row of one-token continuations
    decode_slots: torch.Tensor | None  # [n, blocks_per_slot] their slots
    pieces: list[tuple[int, int, torch.Tensor, bool]]  # (start, length, slot [1, b], fresh)


class StateStore:
    """State slots in the pool's blocks. A slot is a list of `blocks_per_slot` block ids; each
    state occupies the cells `placement` gives it, in the key and value rows of any layer.

    A KV node gets its slot at its first forward (a copy of its parent's, `plan`), keeps it while
    it may forward again, and gives it back when it finishes (`retired`) or, after a fork, once
    its branch is retired and every child has copied it or finished without forwarding
    (`forked` counts them); a node freed meanwhile frees it (kv_nodes).
    """

    def __init__(self, pool: BlockPool, layout: StateLayout) -> None:
        self.pool, self.layout = pool, layout
        # the planes: each layer's key rows, then its value rows, as [blocks, bytes of a block]
        self.planes = [
            t[layer].view(pool.num_blocks, -1).view(torch.uint8)
            for layer in range(pool.num_layers)
            for t in (pool.k, pool.v)
        ]
        cell = self.planes[0].shape[-1]
        self.place, self.blocks_per_slot = placement(layout, cell, len(self.planes))
        self.used_planes = sorted({ch.plane for chunks in self.place.values() for ch in chunks})

    # slots of KV nodes -------------------------------------------------------------------------
    def plan(self, planned: list[tuple[KVNode, int, int]], note: Note) -> StateStep:
        """The step's `planned` (node, first query, queries): slots for first forwards (copies of
        the parent's), decode rows batched, every other node its own piece."""
        copies, done = [], []
        rows, slots, pieces = [], [], []
        for kv, start, q_len in planned:
            if kv.state is None:
                kv.state = self.pool.allocate(self.blocks_per_slot)
                note(kv.owner, self.blocks_per_slot)
                parent = kv.parent
                if parent is not None and parent.stored:
                    assert parent.state is not None, "a parent's state went before its children"
                    copies.append((parent.state, kv.state))
                    kv.state_fresh = parent.state_fresh
                    self._read(parent, note, done)
            if q_len == 1 and not kv.state_fresh:
                rows.append(start)
                slots.append(kv.state)
            else:
                pieces.append((start, q_len, self.index([kv.state]), kv.state_fresh))
            kv.state_fresh = False  # after this step's forward its path has a past
        self.copy(copies)
        for parent in done:  # after the copies: a released slot may be allocated again
            self.release(parent, note)
        dev = self.planes[0].device
        decode_rows = torch.tensor(rows, device=dev) if rows else None
        return StateStep(self, decode_rows, self.index(slots) if rows else None, pieces)

    def forked(self, parent: KVNode) -> None:
        """One more child will copy `parent`'s state at its first forward (the parent's own
        branch counts as a reader too, until it retires: children are made one by one)."""
        parent.state_readers = (parent.state_readers or 1) + 1

    def retired(self, kv: KVNode, note: Note) -> None:
        """`kv`'s branch is done: its slot goes unless children are still to copy it; a node
        that never forwarded is one reader fewer of its parent's."""
        if kv.state is None:
            if kv.parent is not None:
                self._read(kv.parent, note)
        elif kv.state_readers is None:
            self.release(kv, note)
        else:
            self._read(kv, note)

    def _read(self, kv: KVNode, note: Note, done: list[KVNode] | None = None) -> None:
        """One reader of `kv`'s state fewer; the last frees it (into `done`, to free later)."""
        if kv.state_readers is None:
            return
        kv.state_readers -= 1
        if kv.state_readers == 0:
            if done is None:
                self.release(kv, note)
            else:
                done.append(kv)

    def release(self, kv: KVNode, note: Note) -> None:
        if kv.state is not None:
            self.pool.release(kv.state)
            note(kv.owner, -len(kv.state))
            kv.state = None

    def copy(self, pairs: list[tuple[list[int], list[int]]]) -> None:
        """Copy each (source slot, destination slot): children start from their parent's state."""
        if not pairs:
            return
        src = torch.tensor([b for s, _ in pairs for b in s], device=self.planes[0].device)
        dst = torch.tensor([b for _, d in pairs for b in d], device=self.planes[0].device)
        for p in self.used_planes:
            self.planes[p].index_copy_(0, dst, self.planes[p].index_select(0, src))

    def index(self, slots: list[list[int]]) -> torch.Tensor:
        """[n, blocks_per_slot] block ids of `slots` on the pool's device."""
        return torch.tensor(slots, dtype=torch.int64, device=self.planes[0].device)

    def gather(self, spec: StateSpec, slots: torch.Tensor) -> torch.Tensor:
        """The state of `slots` [n, blocks_per_slot] at `spec`: [n, *spec.shape] (a copy)."""
        n = slots.shape[0]
        parts = []
        for ch in self.place[spec]:
            rows = self.planes[ch.plane].index_select(0, slots[:, ch.first : ch.last].reshape(-1))
            parts.append(rows.view(n, -1)[:, : ch.nbytes])
        raw = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return raw.contiguous().view(spec.dtype).view(n, *spec.shape)

    def scatter(self, spec: StateSpec, slots: torch.Tensor, state: torch.Tensor) -> None:
        """Write `state` [n, *spec.shape] into `slots` [n, blocks_per_slot] at `spec`."""
        n, cell = slots.shape[0], self.planes[0].shape[-1]
        raw = state.contiguous().view(n, -1).view(torch.uint8)
        done = 0
        for ch in self.place[spec]:
            width = ch.nbytes
            cells = raw[:, done : done + width]
            if width < (ch.last - ch.first) * cell:  # the last cell's tail belongs to this state
                cells = torch.nn.functional.pad(cells, (0, (ch.last - ch.first) * cell - width))
            ids = slots[:, ch.first : ch.last].reshape(-1)
            self.planes[ch.plane].index_copy_(0, ids, cells.reshape(-1, cell))
            done += width
