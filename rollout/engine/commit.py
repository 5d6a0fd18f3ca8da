"""The commit both engines share: which draws a step makes, drawing them, recording a drawn token,
and closing a finished tree's stats.

The cascade engine (text_engine.py) and the native path (native_run.py) differ in how they get a
step's logits, never in what they do with them, so a family both can run samples the same tokens
from one seed: per branch one draw keyed by its node and length, or, where its program says the
node forks now (full, or uncertain under entropy-guided branching), one draw per child keyed by
the child's path. Randomness stays counter-based (sampling.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from trees import Node, branch_key

from .sampling import Drawn, TopLogprobs, draw_rows, tempered_entropy


class Draw(NamedTuple):
    """One token to draw: from logit row `row`, seeded by `key`, for `branch`'s node (`child`
    None) or for its `child`-th new child."""

    row: int
    key: int
    branch: Any  # the engine's branch (text_engine._Branch or native_run._Branch)
    child: int | None


def uncertain_rows(branches: Sequence[Any], logits: torch.Tensor) -> set[int]:
    """Logit rows of branches that fork early: entropy-guided branching, where the entropy of
    the next token's distribution (the tempered one the draw uses; T = 0 reads T = 1, and
    top-k / top-p do not enter) is at least the tree's `branch_entropy` nats."""
    candidates = [r for r, br in enumerate(branches) if br.job.program.may_fork_early(br)]
    if not candidates:
        return set()
    temps = [branches[r].job.params.temperature for r in candidates]
    entropy = tempered_entropy(logits[candidates], temps).tolist()
    return {
        r
        for r, h in zip(candidates, entropy, strict=True)
        if h >= branches[r].job.spec.branch_entropy
    }


def step_draws(branches: Sequence[Any], logits: torch.Tensor) -> list[Draw]:
    """The step's draws, branch by branch: the next token, or one first token per child."""
    uncertain = uncertain_rows(branches, logits)
    draws = []
    for r, br in enumerate(branches):
        node = br.node
        if br.job.program.fork_due(br) or r in uncertain:  # fork, one draw per child
            draws += [Draw(r, branch_key(branch_key(node.key, c), 0), br, c)
                      for c in range(br.forks)]
        else:
            draws.append(Draw(r, branch_key(node.key, len(node.tokens)), br, None))
    return draws


def draw(logits: torch.Tensor, draws: list[Draw]) -> Drawn:
    """Sample every draw of the step from its logit row with its branch's parameters."""
    return draw_rows(
        logits, [d.row for d in draws], [d.key for d in draws],
        [d.branch.job.params for d in draws],
    )


def finish_tree(job: Any, peak_kv_bytes: int) -> None:
    """A tree with no branch left: its token counts, its KV peak and its program's stats."""
    tree, stats = job.tree, job.tree.stats
    stats.unique_tokens = tree.unique_tokens()
    stats.tokens_saved = tree.flat_tokens() - stats.unique_tokens
    stats.kv_tokens = tree.kv_tokens()
    stats.peak_kv_bytes = peak_kv_bytes
    job.program.finished(tree)
    job.meta["done"] = True


def record(node: Node, tok: int, lp: float, top: TopLogprobs | None) -> None:
    """Append a sampled token, its log-prob (and its alternatives) to `node`."""
    node.tokens.append(tok)
    node.logprobs.append(lp)
    if node.sampled is not None:
        node.sampled.append(True)
    if top is not None:
        node.top_logprobs = node.top_logprobs or []
        node.top_logprobs.append(top)


def new_child(parent: Node, index: int, node_id: int) -> Node:
    """The `index`-th child of `parent`, numbered `node_id`, linked into the tree."""
    node = Node(
        id=node_id, depth=parent.depth + 1, key=branch_key(parent.key, index), parent=parent
    )
    parent.children.append(node)
    return node
