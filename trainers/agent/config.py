"""The `agent:` section of a run config: the turns of `kind: agent` runs.

Only `kind: agent` reads it (`agent.max_turns=6` works as a dotted override); the tree shape stays
in `rollout:` (depth, width; `branch_entropy` forks at the first uncertain token after an
observation, within `segment_len` tokens of it), and the environment comes with the task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


def _need(cond: bool, key: str, value: object, fix: str) -> None:
    if not cond:
        raise ValueError(f"{key}={value!r}: {fix}")


@dataclass(frozen=True)
class AgentConfig:
    max_turns: int = 4  # turns per episode at most (every tree level is at least one)
    max_turn_tokens: int | None = None  # tokens a turn samples at most (None: rollout's cap)
    turn_stop: list[str] = field(default_factory=list)  # strings that end a turn (a tool call)
    env_timeout: float = 30.0  # seconds an environment call may take before its branch ends

    def __post_init__(self) -> None:
        _need(self.max_turns >= 1, "agent.max_turns", self.max_turns, "use an int >= 1")
        _need(
            self.max_turn_tokens is None or self.max_turn_tokens >= 1,
            "agent.max_turn_tokens",
            self.max_turn_tokens,
            "use an int >= 1, or null for rollout.max_new_tokens",
        )
        _need(all(self.turn_stop), "agent.turn_stop", self.turn_stop, "use non-empty strings")
        _need(
            math.isfinite(self.env_timeout) and self.env_timeout > 0,
            "agent.env_timeout",
            self.env_timeout,
            "use a positive number of seconds",
        )
