"""The environment protocol of agent trees: `Env`, with the `Turn` it reads and the `Observation`
it answers.

An episode's state belongs to the environment and is opaque to the engine. The engine calls:

1. `start(prompt) -> state`: once per episode, before its first `step` (the prompt as the caller
   gave it: text or token ids).
2. `step(state, turn) -> Observation`: after every turn the model finishes. It may update `state`
   in place. The observation's tokens (or text, which the engine tokenizes) are appended to the
   branch as forwarded, never sampled, tokens; `done=True` ends the episode; `reward` is recorded
   on the node (`meta["turn_rewards"]`), and the one that comes with the observation ending the
   episode becomes the leaf's `reward`.
3. `fork(state) -> state`: where a node forks, each child but the last gets a fork of the parent's
   state and the last takes the parent's own. The protocol requires a copy that is independent of
   the original: later steps on one must not change the other. The default is `copy.deepcopy`;
   an environment whose state cannot be copied (a process, a sandbox) keeps the turns in its state
   and replays them in `fork`.

`start` and `step` run off the engine's thread (a thread pool, or one event loop when `step` is an
`async def`), so they may block or await; several branches call them at once, each with its own
state. `fork` runs on the engine's thread and should be cheap. A call that raises or outlives the
run's `env_timeout` ends only its branch (finish_reason "env_error" or "env_timeout", the cause in
`node.meta["env_error"]`). A `step` that returns something other than an `Observation` is a bug in
the environment: it stops the run with a TypeError.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


class EnvProtocolError(TypeError):
    """The environment answered something the protocol does not allow (a bug in it, which stops
    the run, unlike a failing call, which ends only its branch)."""


@dataclass(frozen=True)
class Turn:
    """A finished turn of the model: what `Env.step` reads."""

    tokens: tuple[int, ...]  # the ids the model sampled in this turn
    text: str | None  # their text (special tokens skipped); None without a tokenizer
    index: int  # 0 for the episode's first turn
    finish_reason: str  # "eos", "turn_stop" (a turn_stop string or id), or "length" (turn cap)


@dataclass(frozen=True)
class Observation:
    """The environment's answer to a turn. Give `tokens` or `text` (or neither: nothing is
    appended), `done` to end the episode, `reward` for this turn, `info` for the caller."""

    tokens: Sequence[int] | None = None
    text: str | None = None
    done: bool = False
    reward: float | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.tokens is not None and self.text is not None:
            raise EnvProtocolError("Observation: give tokens or text, not both")
        if self.tokens is not None and not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.tokens
        ):
            raise EnvProtocolError(
                f"Observation.tokens must be token ids (ints >= 0), got {self.tokens!r}"
            )
        if self.text is not None and not isinstance(self.text, str):
            raise EnvProtocolError(
                f"Observation.text must be a str, got {type(self.text).__name__}"
            )
        if self.reward is not None and (
            isinstance(self.reward, bool) or not isinstance(self.reward, (int, float))
        ):
            raise EnvProtocolError(
                f"Observation.reward must be a number or None, got {self.reward!r}"
            )


class Env:
    """Subclass and override `step` (plain or `async def`); `start` and `fork` have defaults."""

    def start(self, prompt: Any) -> Any:
        """A new episode's state for `prompt` (default: None, for stateless environments)."""
        return None

    def step(self, state: Any, turn: Turn) -> Observation:
        raise NotImplementedError(f"{type(self).__name__} must implement step(state, turn)")

    def fork(self, state: Any) -> Any:
        """An independent copy of `state` for a child branch."""
        return copy.deepcopy(state)
