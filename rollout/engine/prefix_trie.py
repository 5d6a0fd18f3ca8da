"""A radix trie of the batch's prompts, and the shared prefixes worth computing once (BatchLLM).

BatchLLM builds a prefix tree over all requests and, because its attention kernel takes a single
shared prefix, flattens it into one level with a small dynamic program. Our cascade attention reads
any chain of segments, so we keep the trie's multi-level structure: a system prompt, a few-shot
header below it and a question below that are three segments, each computed once. A shared node is
kept when the tokens it saves, (sharers - 1) * length, reach `min_saved_tokens`; a node not worth
keeping is merged into its children (its tokens recomputed by each). Each prompt keeps at least
its last token to itself, since the logits that start its tree come from its own last position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(eq=False)
class TrieNode:
    """An edge label `tokens` and the prompts (batch indices) whose prefix passes through it."""

    tokens: list[int]
    prompts: list[int] = field(default_factory=list)
    children: dict[int, TrieNode] = field(default_factory=dict)  # first token -> child
    parent: TrieNode | None = None


def build_trie(prompts: Sequence[Sequence[int]]) -> TrieNode:
    """Radix trie of `prompt[:-1]` for every prompt (each keeps its last token to itself)."""
    root = TrieNode(tokens=[])
    for i, prompt in enumerate(prompts):
        node, rest = root, list(prompt[:-1])
        node.prompts.append(i)
        while rest:
            child = node.children.get(rest[0])
            if child is None:
                child = TrieNode(tokens=rest, prompts=[i], parent=node)
                node.children[rest[0]] = child
                break
            n = _common(child.tokens, rest)
            if n < len(child.tokens):
                _split(child, n)
            child.prompts.append(i)
            node, rest = child, rest[n:]
    return root


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _split(node: TrieNode, n: int) -> None:
    """Cut `node`'s edge after n tokens: node keeps the head, a new child takes the tail."""
    tail = TrieNode(
        tokens=node.tokens[n:], prompts=list(node.prompts), children=node.children, parent=node
    )
    for c in tail.children.values():
        c.parent = tail
    node.tokens = node.tokens[:n]
    node.children = {tail.tokens[0]: tail}


@dataclass(frozen=True)
class SharedPrefix:
    """A segment computed once for several prompts. `parent` is the index of the shared prefix
    above it in the returned list, or None; `start` is its first token's position."""

    tokens: tuple[int, ...]
    start: int
    parent: int | None
    prompts: tuple[int, ...]


@dataclass(frozen=True)
class PrefixPlan:
    shared: tuple[SharedPrefix, ...]  # parents before children
    prompt_prefix: tuple[int | None, ...]  # per prompt: its deepest shared prefix, or None


def plan_prefixes(prompts: Sequence[Sequence[int]], min_saved_tokens: int = 64) -> PrefixPlan:
    """The shared prefixes worth keeping (see the module doc), as a forest of segments."""
    root = build_trie(prompts)
    shared: list[SharedPrefix] = []
    owner: list[int | None] = [None] * len(prompts)
    # Depth-first; `pending` carries the tokens of dropped ancestors down into the next kept node.
    stack: list[tuple[TrieNode, int | None, list[int], int]] = [
        (c, None, [], 0) for c in root.children.values()
    ]
    while stack:
        node, parent, pending, start = stack.pop()
        tokens = pending + node.tokens
        sharers = len(node.prompts)
        if sharers >= 2 and (sharers - 1) * len(tokens) >= min_saved_tokens:
            shared.append(SharedPrefix(tuple(tokens), start, parent, tuple(sorted(node.prompts))))
            here, carry, nxt = len(shared) - 1, [], start + len(tokens)
            for p in node.prompts:
                owner[p] = here
        else:
            here, carry, nxt = parent, tokens, start
        for child in node.children.values():
            stack.append((child, here, carry, nxt))
    # Parents come before children in DFS order already; keep that order stable for callers.
    return PrefixPlan(shared=tuple(shared), prompt_prefix=tuple(owner))
