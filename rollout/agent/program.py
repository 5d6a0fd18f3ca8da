"""The agent tree program: a node is one turn, and the environment answers between turns.

A branch samples until its turn ends (EOS, a `turn_stop` string or id, `max_turn_tokens`, or the
path's `max_new_tokens`), then leaves the batch while `Env.step` runs (calls.py). The answer's
tokens are appended to the same node as forwarded, never sampled, tokens (`Node.sampled` False, no
log-prob), and the branch rejoins. Where the tree forks:
- per turn (Tree-GRPO, the default): an inner node holds one turn and its observation, and forks
  `width[d]` children as soon as the observation is forwarded; each child draws its own first
  token of the next turn. Leaves hold every turn left to the episode.
- at the first uncertain token after an observation (ARPO, `branch_entropy=h`): an inner node
  runs until an observation has been appended, then forks at the first token whose distribution
  has entropy >= h, within `segment_len[d-1]` tokens of the observation (forking there at the
  latest). `min_segment_len` counts that token too: 1, the default, lets the observation's very
  first token fork.
An episode ends when the environment says done ("done"), after `max_turns` turns ("max_turns"),
when the path holds `max_new_tokens` tokens after the prompt, sampled and observed ("length"), or
when a call fails ("env_error", "env_timeout"). The environment sees every turn, the last one too,
so it can score it; each turn's reward is kept in `node.meta["turn_rewards"]`, and the one
given with the observation that ends the episode becomes the leaf's `reward`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from trees import Node, Tree
from trees.spec import TreeSpec

from ..engine.programs import WAIT, Shape, TextProgram
from .calls import UNSTARTED, EnvCalls
from .env import EnvProtocolError, Turn
from .options import AgentOptions

if TYPE_CHECKING:
    from ..engine.text_engine import _Branch

NEVER = sys.maxsize  # a target no node reaches: it forks when its program says, not by length


@dataclass
class Episode:
    """One branch's place in its episode (copied for each child at a fork)."""

    env_state: Any = UNSTARTED
    turns: int = 0  # turns finished on the path
    turn_tokens: list[int] = field(default_factory=list)  # sampled so far in the current turn
    path_tokens: int = 0  # tokens after the prompt on the path, sampled and observed
    window: int | None = None  # ARPO: where the node's latest observation ends


class AgentProgram(TextProgram):
    """Turns, environment calls and forks for every tree of one `sample_tree` call."""

    waits = True

    def __init__(
        self, spec: TreeSpec, options: AgentOptions, tokenizer: Any, vocab_size: int,
        decode: Callable[[list[int]], str] | None,
    ) -> None:
        """`decode`: the engine's ids -> text (special tokens skipped), for `Turn.text`; None
        without a tokenizer."""
        super().__init__(spec)
        self.options, self.vocab_size, self.decode = options, vocab_size, decode
        self.calls = EnvCalls(
            options.env, None if tokenizer is None else _encoder(tokenizer), options.env_timeout,
            options.env_workers,
        )

    # shapes ----------------------------------------------------------------------------------
    def root(self, root: Node) -> Shape:
        return Shape(target=len(root.tokens), forks=self.spec.width[0], state=Episode())

    def child(self, parent: _Branch, index: int, node: Node) -> Shape:
        node.sampled = []
        ep: Episode = parent.state
        own = index == parent.forks - 1 or ep.env_state is UNSTARTED  # the last child takes it
        state = ep.env_state if own else self.options.env.fork(ep.env_state)
        child = Episode(state, ep.turns, list(ep.turn_tokens), ep.path_tokens)
        forks = self.spec.width[node.depth] if node.depth < self.spec.depth else 0
        return Shape(target=NEVER, forks=forks, state=child)

    def may_fork_early(self, br: _Branch) -> bool:
        ep: Episode = br.state
        if self.spec.branch_entropy is None or ep.window is None or br.forks == 0:
            return False
        start = ep.window + self.spec.min_len(br.node.depth) - 1
        return start <= len(br.node.tokens) < br.target

    # turns -----------------------------------------------------------------------------------
    def after_token(self, br: _Branch, tok: int) -> str | None:
        ep, opts, params = br.state, self.options, br.job.params
        ep.turn_tokens.append(tok)
        ep.path_tokens += 1
        if params.stop is not None and params.stop.hit(br.node):
            return "stop"  # the caller's stop strings end the episode, as in text trees
        if tok in params.eos_ids:
            reason = "eos"
        elif tok in opts.turn_stop_ids or (
            opts.turn_stop is not None and opts.turn_stop.hit_tokens(ep.turn_tokens)
        ):
            reason = "turn_stop"
        elif (
            len(ep.turn_tokens) >= opts.max_turn_tokens
            or ep.path_tokens >= self.spec.max_new_tokens
        ):
            reason = "length"
        else:
            return None
        text = None if self.decode is None else self.decode(ep.turn_tokens)
        turn = Turn(tuple(ep.turn_tokens), text, ep.turns, reason)
        ep.turns += 1
        ep.turn_tokens = []
        br.node.meta["env_calls"] = br.node.meta.get("env_calls", 0) + 1
        self.calls.submit(br, ep.env_state, br.job.tree.prompt, turn)
        return WAIT

    def answers(self, block: bool) -> list[tuple[_Branch, list[int] | str]]:
        out = []
        for ans in self.calls.answers(block):
            br, node = ans.key, ans.key.node
            if ans.error is not None:
                node.meta["env_error"] = ans.detail
                out.append((br, ans.error))
                continue
            out.append((br, self._observe(br, ans.state, ans.observation, ans.ids)))
        return out

    def _observe(self, br: _Branch, state: Any, obs: Any, ids: list[int]) -> list[int] | str:
        """The observation's ids to append, or the reason the episode ends here."""
        ep, node = br.state, br.node
        ep.env_state = state
        if obs.reward is not None:
            node.meta.setdefault("turn_rewards", []).append(float(obs.reward))
        if obs.info:
            node.meta.setdefault("env_info", []).append(obs.info)
        bad = [t for t in ids if t >= self.vocab_size]
        if bad:
            raise EnvProtocolError(
                f"{type(self.options.env).__name__}: observation ids {bad[:5]} are outside the "
                f"model's vocabulary [0, {self.vocab_size})"
            )
        if obs.done:
            reason = "done"
        elif ep.turns >= self.options.max_turns:
            reason = "max_turns"
        elif ep.path_tokens + len(ids) >= self.spec.max_new_tokens:  # no room for another turn
            node.meta["observation_dropped"] = len(ids)
            reason = "length"
        else:
            ep.path_tokens += len(ids)
            end = len(node.tokens) + len(ids)
            if br.forks and self.spec.branch_entropy is None:
                br.target = end  # per turn: fork once the observation is forwarded
            elif br.forks:
                ep.window = end
                br.target = end + self.spec.segment_len[node.depth - 1]
            return ids
        if obs.reward is not None:
            node.reward = float(obs.reward)  # the episode ends here: the leaf's reward
        return reason

    # bookkeeping -----------------------------------------------------------------------------
    def finished(self, tree: Tree) -> None:
        """Environment calls made, and those a flat run of the same leaves would add."""
        calls = sum(n.meta.get("env_calls", 0) for n in tree.nodes())
        flat = sum(n.meta.get("env_calls", 0) for leaf in tree.leaves() for n in leaf.path())
        tree.stats.env_calls, tree.stats.env_calls_saved = calls, flat - calls

    def close(self) -> None:
        self.calls.close()

    def worst_blocks(self, own_prompt_tokens: int, block_size: int) -> int:
        """Each leaf's path holds at most `max_new_tokens` tokens after the prompt, and each node
        on it may start a block of its own (nodes never share a block)."""
        per_leaf = -(-self.spec.max_new_tokens // block_size) + self.spec.depth
        return -(-own_prompt_tokens // block_size) + self.spec.num_leaves * per_leaf


def _encoder(tokenizer: Any) -> Any:
    return lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"])
