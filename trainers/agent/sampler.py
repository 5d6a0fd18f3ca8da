"""What an agent run samples with: multi-turn trees from the in-process engine and the task's
environment (`rollout.agent`), costed in policy-forward tokens and environment calls.

The environment scores each episode (its last observation's reward, trainers/agent/tasks.py), so
`decode` hands the reward function the trajectory itself. Remote sampling is not offered: an
environment is a Python object in this process, which a service in another cannot call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rollout import Engine
from rollout.agent import Env
from trees import Trajectory, Tree

from ..config import RolloutConfig
from ..text.samplers import TextSampler
from .config import AgentConfig


class AgentSampler(TextSampler):
    """Agent trees: each node a turn (or, with `branch_entropy`, forked after an observation)."""

    def __init__(
        self, engine: Engine, tokenizer: Any, rollout: RolloutConfig, agent: AgentConfig, env: Env
    ) -> None:
        super().__init__(engine, tokenizer, rollout)
        self.agent, self.env = agent, env

    @staticmethod
    def _segment_caps(r: RolloutConfig) -> tuple[int, ...]:
        """No caps: agent nodes fork after turns, not at a segment length (`fork_early_frac`, the
        text metric these caps feed, is dropped below)."""
        return (0,) * (r.depth - 1)

    def sample(self, prompts: Sequence[Any], seed: int, step: int) -> list[Tree]:
        r, a = self.rollout, self.agent
        entropy = {} if r.branch_entropy is None else dict(
            segment_len=r.segment_len, branch_entropy=r.branch_entropy,
            min_segment_len=r.min_segment_len,
        )
        return self.engine.sample_tree(
            list(prompts), r.depth, r.width, max_new_tokens=r.max_new_tokens,
            temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, seed=seed, env=self.env,
            max_turns=a.max_turns, turn_stop=a.turn_stop or None,
            max_turn_tokens=a.max_turn_tokens, env_timeout=a.env_timeout, **entropy,
        )

    def decode(self, trajectory: Trajectory) -> Trajectory:
        return trajectory

    def costs(self, trees: Sequence[Tree]) -> list[float]:
        """The text costs, then environment calls made and saved, turns summed over episodes,
        episodes, episodes ended by a failing or slow environment call, and the tokens the policy
        sampled (each once, however many episodes share it)."""
        leaves = [leaf for t in trees for leaf in t.leaves()]
        sampled = sum(sum(n.sampled) for t in trees for n in t.nodes() if n.sampled is not None)
        turns = sum(n.meta.get("env_calls", 0) for leaf in leaves for n in leaf.path())
        failed = sum(leaf.finish_reason in ("env_error", "env_timeout") for leaf in leaves)
        return [
            *super().costs(trees),
            float(sum(t.stats.env_calls for t in trees)),
            float(sum(t.stats.env_calls_saved for t in trees)),
            float(turns),
            float(len(leaves)),
            float(failed),
            float(sampled),
        ]

    def cost_metrics(self, summed: Sequence[float]) -> dict[str, float]:
        *text, calls, saved, turns, episodes, failed, sampled = summed
        metrics = super().cost_metrics(text)
        metrics.pop("fork_early_frac", None)  # a text-tree notion: segment caps
        metrics.update(
            env_calls=calls,
            env_calls_saved=saved,
            turns_per_episode=turns / max(episodes, 1.0),
            env_failures=failed,
            sampled_tokens=sampled,
        )
        return metrics
