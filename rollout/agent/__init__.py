"""Agent trees: an environment (`Env`) answers each turn, the tree forks at turn boundaries or at
the first uncertain token after an observation, and observation tokens are forwarded, never
sampled. `sample_tree(..., env=env, max_turns=...)` runs them (program.py)."""

from __future__ import annotations

from .env import Env, EnvProtocolError, Observation, Turn

__all__ = ["Env", "EnvProtocolError", "Observation", "Turn"]
