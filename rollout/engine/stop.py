"""Stop strings: a branch ends, with finish_reason "stop", at the token that completes one.

Stop strings are text, the engine samples ids, so each appended token decodes only the tail of its
branch: the last `window` tokens of the root-to-node path (prompt excluded), across node
boundaries, so a stop string that spans a fork is found too. A string that was not in the text one
token earlier must end in the newest token, so a window a little longer than the longest string
suffices; the slack covers tokens that decode to no text (skipped special tokens, partial UTF-8
bytes). The cost is one tail decode per appended token, paid only by trees that have stop strings.

OpenAI semantics for what the caller sees (vLLM does the same; rollout/service/openai/choices.py
writes it): the text is cut before the first stop string, while token ids and log-probs keep every
sampled token, up to and including the one that completed it, since those are what the policy
sampled and what a trainer scores.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from trees import Node

SLACK_TOKENS = 8  # window slack for tokens that decode to no text


@dataclass(frozen=True)
class StopStrings:
    """Non-empty stop strings and the tokenizer decode that turns ids into the caller's text."""

    strings: tuple[str, ...]
    decode: Callable[[list[int]], str] = field(compare=False, repr=False)

    def __post_init__(self) -> None:
        assert self.strings and all(self.strings), f"empty stop strings: {self.strings!r}"

    @property
    def window(self) -> int:
        """Tokens decoded per check: enough for the longest string, one char per token."""
        return 2 * max(map(len, self.strings)) + SLACK_TOKENS

    def hit(self, node: Node) -> bool:
        """Whether the text of `node`'s path, ending with its newest token, holds a stop string."""
        return self.hit_tokens(tail_tokens(node, self.window))

    def hit_tokens(self, ids: list[int]) -> bool:
        """Whether the text of `ids`, ending with the newest token, holds a stop string."""
        text = self.decode(ids[-self.window :])
        return any(s in text for s in self.strings)


def tail_tokens(node: Node, n: int) -> list[int]:
    """The last `n` sampled tokens of the path to `node` (fewer near the prompt)."""
    parts: list[list[int]] = []
    while node is not None and node.depth > 0 and n > 0:
        part = node.tokens[-n:]
        parts.append(part)
        n -= len(part)
        node = node.parent
    return [t for part in reversed(parts) for t in part]
