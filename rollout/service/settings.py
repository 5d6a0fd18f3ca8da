"""What one served engine is built from: `WorkerSettings`, shared by `python -m rollout.serve` and
every replica of a fleet (rollout/fleet/replica.py), so both build the same engine from the same
flags. `load_model` reads `--model` (see cli.py).

The settings are plain data, checked when made (a bad --kv-budget or a prefix cache without the
global scheduler is a `ValueError` naming the flag before any model loads); `build_worker()` then
loads the model and wraps the engine in a (not yet started) `ServiceWorker`. A fleet ships the
settings to its replicas as they are: they pickle, the model does not.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..api import Engine
from ..engine.state_layout import state_layout
from ..tiny import BENCH_LLAMA, FAMILIES, tiny_model, tiny_tokenizer
from .worker import ServiceWorker

SCHEDULERS = ("global", "fcfs-lru")
DTYPES = ("float32", "bfloat16", "float16")
_SUFFIX = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_bytes(text: str) -> int:
    """'512M', '8G' or a plain number of bytes."""
    s = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = _SUFFIX.get(s[-1:], 1)
    try:
        value = int(float(s[:-1] if s[-1:] in _SUFFIX else s) * scale)
    except ValueError:
        raise ValueError(
            f"--kv-budget {text!r}: expected bytes such as 268435456, 256M or 8G"
        ) from None
    if value <= 0:
        raise ValueError(f"--kv-budget {text!r}: expected a positive size")
    return value


def load_model(spec: str, dtype: str = "float32") -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer or None) for `--model`."""
    if spec.startswith("tiny:"):
        family = spec.removeprefix("tiny:")
        if family == "bench":
            return tiny_model("llama", **BENCH_LLAMA), tiny_tokenizer(BENCH_LLAMA["vocab_size"])
        if family not in FAMILIES:
            raise ValueError(
                f"--model {spec}: expected tiny:<family> with family in {FAMILIES} or tiny:bench"
            )
        return tiny_model(family), tiny_tokenizer()
    path = Path(spec)
    if not path.is_dir():
        raise ValueError(
            f"--model {spec}: not a folder; pass a local Hugging Face model folder or tiny:<family>"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    has_tokenizer = any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
        return model, AutoTokenizer.from_pretrained(path) if has_tokenizer else None
    except (OSError, ValueError) as exc:  # no config.json, unknown architecture, bad weights
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"--model {spec}: not a loadable Hugging Face model folder ({first})"
        ) from exc


@dataclass(frozen=True)
class WorkerSettings:
    """One engine and its worker. `prefix_cache=None` means on with policy "global", except for
    hybrid models (their reused KV would lack the recurrent state: rollout.Engine)."""

    model: str  # a local Hugging Face model folder, or tiny:<family>
    kv_budget: int = 256 << 20  # bytes
    dtype: str = "float32"
    block_size: int = 16
    max_step_tokens: int = 4096
    policy: str = "global"  # the engine's scheduler
    prefix_cache: bool | None = None
    max_queue: int = 256
    gather_window: float = 0.1

    def __post_init__(self) -> None:
        if not isinstance(self.kv_budget, int) or self.kv_budget <= 0:
            raise ValueError(f"kv_budget={self.kv_budget!r}: expected a positive number of bytes")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype}: expected one of {DTYPES}")
        if self.policy not in SCHEDULERS:
            raise ValueError(f"--policy {self.policy}: expected one of {SCHEDULERS}")
        if self.prefix_cache and self.policy != "global":
            raise ValueError(
                "--prefix-cache needs --policy global (fcfs-lru has its own LRU cache)"
            )
        if not isinstance(self.max_queue, int) or self.max_queue < 1:
            raise ValueError(f"--max-queue {self.max_queue}: expected an int >= 1 (trees)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> WorkerSettings:
        """The settings of parsed `python -m rollout.serve` arguments."""
        return cls(
            model=args.model,
            kv_budget=parse_bytes(args.kv_budget),
            dtype=args.dtype,
            block_size=args.block_size,
            max_step_tokens=args.max_step_tokens,
            policy=args.policy,
            prefix_cache=args.prefix_cache,
            max_queue=args.max_queue,
            gather_window=args.gather_window,
        )

    @property
    def uses_prefix_cache(self) -> bool:
        return self.policy == "global" if self.prefix_cache is None else self.prefix_cache

    def build_worker(self) -> ServiceWorker:
        """Load the model and build the engine and its (not yet started) worker."""
        model, tokenizer = load_model(self.model, self.dtype)
        prefix_cache = self.uses_prefix_cache
        if self.prefix_cache is None and state_layout(model) is not None:
            prefix_cache = False
        engine = Engine(
            model,
            tokenizer,
            kv_budget=self.kv_budget,
            block_size=self.block_size,
            max_step_tokens=self.max_step_tokens,
            policy=self.policy,
            prefix_cache=prefix_cache,
        )
        return ServiceWorker(engine, max_queue=self.max_queue, gather_window=self.gather_window)
