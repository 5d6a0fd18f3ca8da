"""Agent-tree options, checked at the door (before any work): each error names the argument."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..engine.stop import StopStrings
from .env import Env

# `Engine.make_jobs` arguments of agent trees: in-process only (an environment is a Python object
# of the caller's process, which no service in another process can call)
AGENT_ARGS = frozenset(
    {"env", "max_turns", "turn_stop", "max_turn_tokens", "env_timeout", "env_workers"}
)


@dataclass(frozen=True)
class AgentOptions:
    env: Env
    max_turns: int
    max_turn_tokens: int
    turn_stop: StopStrings | None  # strings that end a turn
    turn_stop_ids: frozenset[int]  # token ids that end a turn
    env_timeout: float  # seconds per environment call
    env_workers: int  # threads running plain (not async) environment calls


def agent_options(
    env: Any,
    max_turns: Any,
    turn_stop: Any,
    max_turn_tokens: Any,
    env_timeout: Any,
    env_workers: Any,
    *,
    depth: int,
    max_new_tokens: int,
    tokenizer: Any,
    decode: Callable[[list[int]], str],
) -> AgentOptions:
    """Validated options for `sample_tree(..., env=env)` (see rollout/agent/program.py)."""
    if not callable(getattr(env, "step", None)):
        raise TypeError(
            f"env={type(env).__name__}: an environment needs a step(state, turn) method; "
            "subclass rollout.Env"
        )
    for name in ("start", "fork"):
        if not callable(getattr(env, name, None)):
            raise TypeError(
                f"env={type(env).__name__} has no {name}() method; subclass rollout.Env for the "
                "defaults"
            )
    if inspect.iscoroutinefunction(env.fork):
        raise TypeError(f"{type(env).__name__}.fork must be a plain function (it runs between "
                        "engine steps); only start and step may be async")
    if isinstance(max_turns, bool) or not isinstance(max_turns, int) or max_turns < 1:
        raise ValueError(f"max_turns={max_turns!r}: expected an int >= 1 (turns per episode)")
    if max_turns < depth:
        raise ValueError(
            f"max_turns={max_turns} < depth={depth}: every level of an agent tree is at least one "
            "turn; raise max_turns or lower depth"
        )
    if max_turn_tokens is None:
        max_turn_tokens = max_new_tokens
    if isinstance(max_turn_tokens, bool) or not isinstance(max_turn_tokens, int) or (
        max_turn_tokens < 1
    ):
        raise ValueError(f"max_turn_tokens={max_turn_tokens!r}: expected an int >= 1, or None")
    strings, ids = _turn_stop(turn_stop, tokenizer)
    if isinstance(env_timeout, bool) or not isinstance(env_timeout, (int, float)) or not (
        math.isfinite(env_timeout) and env_timeout > 0
    ):
        raise ValueError(f"env_timeout={env_timeout!r}: expected a positive number of seconds")
    if isinstance(env_workers, bool) or not isinstance(env_workers, int) or env_workers < 1:
        raise ValueError(f"env_workers={env_workers!r}: expected an int >= 1")
    return AgentOptions(
        env,
        max_turns,
        max_turn_tokens,
        StopStrings(strings, decode) if strings else None,
        ids,
        float(env_timeout),
        env_workers,
    )


def _turn_stop(turn_stop: Any, tokenizer: Any) -> tuple[tuple[str, ...], frozenset[int]]:
    if turn_stop is None:
        return (), frozenset()
    items = [turn_stop] if isinstance(turn_stop, (str, int)) else turn_stop
    if not isinstance(items, Sequence) or not all(
        (isinstance(x, str) and x) or (isinstance(x, int) and not isinstance(x, bool) and x >= 0)
        for x in items
    ):
        raise ValueError(
            f"turn_stop={turn_stop!r}: expected non-empty strings and/or token ids (ints >= 0), "
            "e.g. ['</tool_call>']"
        )
    strings = tuple(x for x in items if isinstance(x, str))
    if strings and tokenizer is None:
        raise ValueError("turn_stop strings need a tokenizer to read the text: pass tokenizer=")
    return strings, frozenset(x for x in items if isinstance(x, int))


def spec_segment_len(
    env: Any, segment_len: Any, branch_entropy: Any, **agent_args: Any
) -> int | Sequence[int]:
    """The `segment_len` the tree spec takes. Text trees: the caller's (default 32). Agent trees
    fork at turn boundaries, where segment lengths do not apply (the spec gets 1s), unless
    `branch_entropy` is set: then it bounds the tokens after an observation where a fork may
    happen (default 32). Agent arguments without `env` are refused."""
    if env is None:
        given = [name for name, value in agent_args.items() if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} without env=: they apply to agent trees only")
        return 32 if segment_len is None else segment_len
    if segment_len is not None and branch_entropy is None:
        raise ValueError(
            "segment_len with env=: agent trees fork at turn boundaries; segment_len only "
            "bounds the tokens after an observation where an entropy fork may happen (set "
            "branch_entropy too), or drop it"
        )
    if segment_len is None:
        return 32 if branch_entropy is not None else 1
    return segment_len
