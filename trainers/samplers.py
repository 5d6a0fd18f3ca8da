"""What the run loop samples with: a text engine or a flow-matching pipeline, behind one protocol.

The run loop (trainers/train.py) only asks a sampler for this process's trees, how to decode a
leaf for the reward, what the trees cost, and to forget the old policy after an optimizer step.
Costs are counted in the sampler's own unit (`CostKeys`): policy-forward tokens for text, network
function evaluations (NFE, transformer calls per latent) for flow trees, so a benchmark can plot
reward against either without knowing which kind ran. `costs` returns per-process sums (costs and
any counters the sampler reports beside them); `cost_metrics` turns the sums over all processes
into the logged metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from rollout import Engine
from rollout.flow import SlidingWindow, leaf_image, sample_flow_tree
from rollout.flow.pipeline import FlowPipeline
from trees import Trajectory, Tree
from trees.spec import TreeSpec

from .config import RolloutConfig
from .flow_config import FlowConfig


@dataclass(frozen=True)
class CostKeys:
    """Metric names: the sampler's per-step cost, the trainer's, the running total, the rate."""

    sample: str
    train: str
    total: str
    rate: str


class Sampler(Protocol):
    cost_keys: CostKeys
    policy_version: int

    def sample(self, prompts: Sequence[Any], seed: int, step: int) -> list[Tree]: ...
    def decode(self, trajectory: Trajectory) -> Any: ...
    def costs(self, trees: Sequence[Tree]) -> list[float]: ...
    def cost_metrics(self, summed: Sequence[float]) -> dict[str, float]: ...
    def policy_updated(self) -> int: ...


class TextSampler:
    """Token trees from `rollout.Engine` (prefix KV shared, dropped after every update)."""

    cost_keys = CostKeys("sample_tokens_forwarded", "train_tokens", "forward_tokens_total",
                         "tokens_per_s")

    def __init__(self, engine: Engine | None, tokenizer: Any, rollout: RolloutConfig) -> None:
        self.engine, self.tokenizer, self.rollout = engine, tokenizer, rollout
        self.source: Any = engine  # what samples: an Engine, or a rollout.Client (subclass)
        r = rollout
        # the longest segment per inner level (the spec spreads one value over the levels)
        self.segment_caps = TreeSpec.make(r.depth, r.width, r.segment_len, r.max_new_tokens,
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


class FlowSampler:
    """Flow-matching trees (Dynamic-TreeRPO's sliding-window SDE tree) from a pipeline."""

    cost_keys = CostKeys("sample_nfe", "train_nfe", "nfe_total", "nfe_per_s")

    def __init__(self, pipe: FlowPipeline, rollout: RolloutConfig, flow: FlowConfig) -> None:
        self.pipe, self.rollout, self.flow = pipe, rollout, flow
        self.policy_version = 0
        self.window: tuple[int, int] | SlidingWindow | None = (
            SlidingWindow(flow.window_size, stride=flow.window_stride) if flow.window_size
            else tuple(flow.sde_window) if flow.sde_window is not None else None)

    def sample(self, prompts: Sequence[Any], seed: int, step: int) -> list[Tree]:
        f = self.flow
        trees = sample_flow_tree(
            list(prompts), self.rollout.depth, self.rollout.width, self.pipe,
            num_inference_steps=f.num_inference_steps, sde_window=self.window,
            noise_levels=f.noise_levels, guidance_scale=f.guidance_scale, seed=seed,
            sde=f.sde, train_step=step)
        for tree in trees:
            tree.policy_version = self.policy_version
        return trees

    def decode(self, trajectory: Trajectory) -> torch.Tensor:
        return leaf_image(trajectory)

    def costs(self, trees: Sequence[Tree]) -> list[float]:
        return [float(sum(t.stats.nfe for t in trees))]

    def cost_metrics(self, summed: Sequence[float]) -> dict[str, float]:
        return {"sample_nfe": summed[0]}

    def policy_updated(self) -> int:
        self.policy_version += 1
        return self.policy_version
