"""Tree programs: what a branch does after each sampled token, per tree.

The engine (text_engine.py) runs every branch through one state machine: running (in the batch),
waiting (for its environment, out of the batch), finished. A tree's program decides the moves:
after a sampled token, continue, finish (with a reason) or wait (a turn ended: rollout/agent); when
its logits are ready, fork now or not; what a new child is to do. `TextProgram` is fixed-length
segments with optional entropy-guided forks (trees/spec.py); `rollout.agent.AgentProgram` adds
environment turns on top of it. A program also bounds the KV blocks its tree can hold, which
admission reserves up front (so an allocation never fails mid-run).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

from trees import Node, Tree
from trees.spec import TreeSpec

if TYPE_CHECKING:
    from .text_engine import _Branch

WAIT = "wait"  # after_token's answer when the branch leaves the batch for its environment


class Shape(NamedTuple):
    """What a new branch is to do: fork `forks` children once it holds `target` tokens (0 forks:
    a leaf, finished at `target`), with the program's own per-branch `state`."""

    target: int
    forks: int
    state: Any = None


class TextProgram:
    """Single-turn text trees: a node at depth d < depth forks `width[d]` children once it holds
    `segment_len[d-1]` tokens (or earlier where entropy-guided branching finds an uncertain
    token); leaves end at EOS, a stop string, or `max_new_tokens` on their path."""

    waits = False  # never has branches out of the batch

    def __init__(self, spec: TreeSpec) -> None:
        self.spec = spec

    def root(self, root: Node) -> Shape:
        return Shape(target=len(root.tokens), forks=self.spec.width[0])

    def child(self, parent: _Branch, index: int, node: Node) -> Shape:
        """The `index`-th child `node` of `parent`, which just forked."""
        spec, depth = self.spec, node.depth
        if depth < spec.depth:
            return Shape(target=spec.segment_len[depth - 1], forks=spec.width[depth])
        # a leaf fills its path up to max_new_tokens (more when nodes above forked early)
        above = sum(len(n.tokens) for n in parent.node.path()[1:])  # the root holds the prompt
        return Shape(target=spec.max_new_tokens - above, forks=0)

    def fork_due(self, br: _Branch) -> bool:
        return len(br.node.tokens) >= br.target

    def may_fork_early(self, br: _Branch) -> bool:
        """An inner node under entropy-guided branching, past its minimum length, not yet full."""
        spec, depth = self.spec, br.node.depth
        return (
            spec.branch_entropy is not None
            and 0 < depth < spec.depth
            and spec.min_len(depth) <= len(br.node.tokens) < br.target
        )

    def after_token(self, br: _Branch, tok: int) -> str | None:
        """The finish reason the newest token gives the branch, or None to go on."""
        params = br.job.params
        if tok in params.eos_ids:
            return "eos"
        if params.stop is not None and params.stop.hit(br.node):
            return "stop"
        if len(br.node.tokens) >= br.target and br.forks == 0:
            return "length"
        return None

    def answers(self, block: bool) -> list[tuple[_Branch, list[int] | str]]:
        """Waiting branches whose environment answered: observation ids, or a finish reason."""
        return []

    def finished(self, tree: Tree) -> None:
        """Called once when `tree` has no branch left (a program may add to its stats)."""

    def close(self) -> None:
        """The run is over: stop whatever the program runs besides the engine."""

    def worst_blocks(self, own_prompt_tokens: int, block_size: int) -> int:
        """KV blocks the tree holds at most: its own prompt part plus every node full, all alive."""
        blocks = -(-own_prompt_tokens // block_size)
        for d in range(1, self.spec.depth + 1):
            blocks += self.spec.nodes_at(d) * -(-self.spec.target(d) // block_size)
        return blocks
