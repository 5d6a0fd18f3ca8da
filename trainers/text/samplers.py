"""What a text run samples with: token trees from the in-process engine or a rollout service.

Both implement the run loop's `Sampler` (trainers/policy.py) with costs in policy-forward tokens:
the tokens the engine forwarded, the tokens an exact engine needs (`Tree.kv_tokens`), and where
the trees forked (early entropy forks against the segment caps). After an optimizer step the
in-process engine drops every KV computed under the old weights; the remote sampler uploads the
new weights to the service instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rollout import Engine
from trees import Trajectory, Tree
from trees.spec import TreeSpec

from ..config import RolloutConfig
from ..policy import CostKeys


class TextSampler:
    """Token trees from `rollout.Engine` (prefix KV shared, dropped after every update)."""

    cost_keys = CostKeys("sample_tokens_forwarded", "train_tokens", "forward_tokens_total",
                         "tokens_per_s")

    def __init__(self, engine: Engine | None, tokenizer: Any, rollout: RolloutConfig) -> None:
        self.engine, self.tokenizer, self.rollout = engine, tokenizer, rollout
        self.source: Any = engine  # what samples: an Engine, or a rollout.Client (subclass)
        self.segment_caps = self._segment_caps(rollout)

    @staticmethod
    def _segment_caps(r: RolloutConfig) -> tuple[int, ...]:
        """The longest segment per inner level (the spec spreads one value over the levels)."""
        return TreeSpec.make(r.depth, r.width, r.segment_len, r.max_new_tokens,
                             r.branch_entropy, r.min_segment_len).segment_len

    @property
    def policy_version(self) -> int:
        return self.engine.policy_version

    def sample(self, prompts: Sequence[Any], seed: int, step: int) -> list[Tree]:
        r = self.rollout
        return self.source.sample_tree(
            list(prompts), r.depth, r.width, segment_len=r.segment_len,
            max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
            top_k=r.top_k, seed=seed, branch_entropy=r.branch_entropy,
            min_segment_len=r.min_segment_len)

    def decode(self, trajectory: Trajectory) -> str:
        return self.tokenizer.decode(trajectory.completion_ids, skip_special_tokens=True)

    def costs(self, trees: Sequence[Tree]) -> list[float]:
        """Forwarded tokens and those an exact engine forwards (`Tree.kv_tokens`), then where the
        trees forked: inner nodes (nodes with children, the root aside), how many of them forked
        before their `segment_len` (entropy forks), and their tokens."""
        inner = [n for t in trees for n in t.nodes() if n.children and n is not t.root]
        early = sum(len(n.tokens) < self.segment_caps[n.depth - 1] for n in inner)
        return [float(sum(t.stats.tokens_forwarded for t in trees)),
                float(sum(t.kv_tokens() for t in trees)),
                float(len(inner)), float(early), float(sum(len(n.tokens) for n in inner))]

    def cost_metrics(self, summed: Sequence[float]) -> dict[str, float]:
        forwarded, needed, inner, early, inner_tokens = summed
        metrics = {"sample_tokens_forwarded": forwarded, "sample_kv_tokens": needed,
                   "forwarded_per_kv_token": forwarded / max(needed, 1.0)}
        if inner:  # trees of depth >= 2: how far branches ran before forking, and why they forked
            metrics["fork_early_frac"] = early / inner
            metrics["inner_segment_len"] = inner_tokens / inner
        return metrics

    def policy_updated(self) -> int:
        return self.engine.policy_updated()


class RemoteTextSampler(TextSampler):
    """Token trees from a rollout service or fleet (`rollout.server`), for runs whose sampling
    lives elsewhere: every process of an `accelerate launch` run samples its own prompts there,
    and after each optimizer step the main process uploads the weights (one fleet-wide policy
    version) while the others wait for it, so no process samples from old weights. The weights
    also go up before the first sample: the service must serve the trainer's own policy."""

    def __init__(
        self, model: torch.nn.Module, tokenizer: Any, rollout: RolloutConfig, accelerator: Any
    ) -> None:
        from rollout import Client

        super().__init__(None, tokenizer, rollout)
        self.model, self.accelerator = model, accelerator
        self.source = self.client = Client(rollout.server, timeout=600)
        self.version: int | None = None

    @property
    def policy_version(self) -> int:
        return self.version if self.version is not None else self.client.policy_version

    def sample(self, prompts: Sequence[Any], seed: int, step: int) -> list[Tree]:
        if self.version is None:  # the service starts from the trainer's weights
            self.policy_updated()
        return super().sample(prompts, seed, step)

    def policy_updated(self) -> int:
        acc = self.accelerator
        if acc.is_main_process:
            self.client.update_weights(acc.unwrap_model(self.model).state_dict())
        acc.wait_for_everyone()
        self.version = self.client.policy_version
        return self.version
