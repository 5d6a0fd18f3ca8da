"""What the rollout service counts, and the checks on uploaded weights.

Counters are written by the engine thread and read by `/stats` handlers; each is a plain int or
float updated in one statement, so a reader sees a value that was true a moment ago, which is all
a dashboard needs (no lock on the hot path). Throughput is measured over a sliding window of recent
steps so an idle server reports 0 tokens/s, not its lifetime average.

Uploaded state dicts are checked against the model before anything waits on them: unknown names,
wrong shapes, non-floating values and NaN or inf entries are refused with the first few offending
names, so a trainer that sends the wrong checkpoint learns it at once and the served policy is
untouched.
"""

from __future__ import annotations

import collections
import time
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file

from trees import Tree

from ..engine.block_pool import BlockPool
from ..engine.radix_cache import CacheStats

WINDOW_S = 10.0  # seconds of steps the tokens/s figure averages over


class ServiceStats:
    def __init__(self) -> None:
        self.started = time.monotonic()
        self.steps = 0
        self.tokens_forwarded = 0  # all model input tokens, shared prefixes included
        self.trees_done = 0
        self.requests_done = 0
        self.tree_tokens_forwarded = 0  # summed over finished trees
        self.unique_tokens = 0
        self.prefix_tokens_reused = 0
        self.prompt_tokens = 0
        self.rejected = 0  # 503 answers
        self.timed_out = 0
        self.cancelled = 0
        self.failed = 0
        self.updates = 0
        self._window: collections.deque[tuple[float, int]] = collections.deque()
        self._tree_times: collections.deque[float] = collections.deque(maxlen=64)

    def note_step(self, tokens: int) -> None:
        now = time.monotonic()
        self.steps += 1
        self.tokens_forwarded += tokens
        self._window.append((now, tokens))
        while self._window and self._window[0][0] < now - WINDOW_S:
            self._window.popleft()

    def note_trees(self, trees: list[Tree], seconds: float) -> None:
        self.requests_done += 1
        self.trees_done += len(trees)
        now = time.monotonic()
        for tree in trees:
            self.tree_tokens_forwarded += tree.stats.tokens_forwarded
            self.unique_tokens += tree.stats.unique_tokens
            self.prefix_tokens_reused += tree.stats.prefix_tokens_reused
            self.prompt_tokens += len(tree.prompt_ids)
            self._tree_times.append(now)

    def note_error(self, error: Exception) -> None:
        if isinstance(error, TimeoutError):
            self.timed_out += 1
        elif isinstance(error, ConnectionAbortedError):
            self.cancelled += 1
        else:
            self.failed += 1

    def tokens_per_s(self) -> float:
        now = time.monotonic()
        recent = [n for t, n in self._window if t >= now - WINDOW_S]
        return sum(recent) / WINDOW_S if recent else 0.0

    def retry_after(self, excess_trees: int) -> float:
        """Seconds until about `excess_trees` trees finish, from the recent finishing rate."""
        times = self._tree_times
        if len(times) < 2 or times[-1] <= times[0]:
            return 1.0
        rate = (len(times) - 1) / (times[-1] - times[0])
        return float(min(max(excess_trees / rate, 1.0), 30.0))

    def snapshot(
        self,
        *,
        queued_trees: int,
        pending_trees: int,
        running_trees: int,
        pool: BlockPool,
        policy_version: int,
        max_queue: int,
    ) -> dict[str, Any]:
        reused, prompt = self.prefix_tokens_reused, self.prompt_tokens
        return {
            "policy_version": policy_version,
            "queue_depth": queued_trees,
            "pending_trees": pending_trees,
            "running_trees": running_trees,
            "max_queue": max_queue,
            "tokens_per_s": self.tokens_per_s(),
            "kv_used_blocks": pool.used_blocks,
            "kv_total_blocks": pool.num_blocks,
            "kv_used_bytes": pool.used_blocks * pool.bytes_per_block,
            "kv_total_bytes": pool.num_blocks * pool.bytes_per_block,
            "steps": self.steps,
            "tokens_forwarded": self.tokens_forwarded,
            "unique_tokens": self.unique_tokens,
            "prefix_tokens_reused": reused,
            "prefix_sharing_ratio": reused / prompt if prompt else 0.0,
            "trees_done": self.trees_done,
            "requests_done": self.requests_done,
            "rejected": self.rejected,
            "timed_out": self.timed_out,
            "cancelled": self.cancelled,
            "failed": self.failed,
            "weight_updates": self.updates,
            "uptime_s": time.monotonic() - self.started,
            **cache_stats(pool),
        }


def check_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Refuse a state dict that would not load into `model` exactly (names, shapes, dtypes)."""
    if not isinstance(state_dict, dict) or not state_dict:
        raise ValueError("the weight update is empty: send at least one tensor of the model")
    own = model.state_dict()
    unknown = [k for k in state_dict if k not in own]
    if unknown:
        raise ValueError(
            f"{len(unknown)} tensors are not in the served model, e.g. {unknown[:3]}; "
            f"its names look like {list(own)[:3]}"
        )
    bad = [
        f"{k}: {tuple(v.shape)} (model {tuple(own[k].shape)})"
        for k, v in state_dict.items()
        if not isinstance(v, torch.Tensor) or v.shape != own[k].shape
    ]
    if bad:
        raise ValueError(f"{len(bad)} tensors have the wrong shape: {bad[:3]}")
    odd = [k for k, v in state_dict.items() if v.is_floating_point() != own[k].is_floating_point()]
    if odd:
        raise ValueError(f"tensors {odd[:3]} have dtypes that do not match the model's")
    # NOTE: one NaN in a weight makes every later step fail ("non-finite logits"): refused here,
    # before anything waits on the update, so the served policy is untouched
    poisoned = [
        k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()
    ]
    if poisoned:
        raise ValueError(
            f"{len(poisoned)} tensors contain NaN or inf, e.g. {poisoned[:3]}: the policy was not "
            "updated; check the trainer's loss and gradients before pushing these weights"
        )


def read_safetensors(data: bytes | None = None, path: str | None = None) -> dict[str, torch.Tensor]:
    """A state dict from safetensors bytes (an upload) or a file on the server's disk."""
    try:
        if path is not None:
            return load_file(path)
        return load_safetensors_bytes(data or b"")
    except FileNotFoundError as exc:
        raise ValueError(f"path={path!r}: no such file on the server") from exc
    except Exception as exc:  # safetensors raises its own error types for malformed data
        raise ValueError(f"not a safetensors file ({type(exc).__name__}: {exc})") from exc


def cache_stats(pool: BlockPool) -> dict[str, int]:
    """The radix prefix cache's counters (zeros when the pool has none)."""
    cache = pool.cache
    st = cache.stats if cache is not None else CacheStats()
    return {
        "cache_lookups": st.lookups,
        "cache_hits": st.hits,
        "cache_tokens_reused": st.tokens_reused,
        "cache_evictable_blocks": cache.evictable_blocks if cache is not None else 0,
        "cache_evicted_blocks": st.evicted_blocks,
        "cache_flushes": st.flushes,
    }
