"""The workloads of benchmarks/peers.py and their compute floor.

A workload is a branching schedule both engines can run: `n_prompts` random prompts of
`prompt_len` tokens; in round k every sequence forks `widths[k]` children that each sample exactly
`segments[k]` tokens. Ours runs it as one tree (depth = rounds); vLLM as one `generate` per round
(a flat group is one round with n = group size).

The floor is the time an ideal engine needs on this machine: the FLOPs of the unique tokens (each
prompt and each sampled token forwarded once; linear layers, attention over its whole prefix, and
the LM head once per sampled token) over the matmul rate measured in the same run. Norms,
activations, softmax and sampling are left out, so the floor is a lower bound.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from rollout.engine.packed_linear import available as packed_available


@dataclass(frozen=True)
class Workload:
    name: str
    n_prompts: int
    prompt_len: int
    widths: tuple[int, ...]  # children per sequence, per round
    segments: tuple[int, ...]  # tokens each child samples, per round

    @property
    def depth(self) -> int:
        return len(self.widths)

    @property
    def max_new_tokens(self) -> int:
        return sum(self.segments)

    def nodes_at(self, level: int) -> int:
        """Sequences sampled in round `level` (0-based), per prompt."""
        return math.prod(self.widths[: level + 1])

    @property
    def sampled_tokens(self) -> int:
        """Every token sampled, once (a tree's shared segments counted once)."""
        per_prompt = sum(self.nodes_at(k) * s for k, s in enumerate(self.segments))
        return self.n_prompts * per_prompt

    @property
    def leaf_tokens(self) -> int:
        """New tokens summed over the leaves' trajectories (what a trainer consumes)."""
        return self.n_prompts * math.prod(self.widths) * self.max_new_tokens

    def describe(self) -> str:
        shape = ", ".join(f"{w}x{s}" for w, s in zip(self.widths, self.segments, strict=True))
        return (
            f"{self.n_prompts} x {self.prompt_len}-token prompts, rounds (width x tokens): {shape}"
        )


def parse_workload(text: str) -> Workload:
    """NAME=PROMPTS:LEN:WxS[,WxS...], e.g. "small=2:1024:4x96" (2 prompts of 1024 tokens, one
    round of 4 children of 96 tokens each) or "deep=1:512:2x16,2x16,2x16"."""
    try:
        name, spec = text.split("=", 1)
        n, length, rounds = spec.split(":")
        pairs = [r.split("x") for r in rounds.split(",")]
        w = Workload(name, int(n), int(length), tuple(int(a) for a, _ in pairs),
                     tuple(int(b) for _, b in pairs))
    except ValueError:
        raise ValueError(
            f"--workload {text!r}: expected NAME=PROMPTS:LEN:WxS[,WxS...] (e.g. small=2:1024:4x96)"
        ) from None
    if not name.isidentifier() or min(w.n_prompts, w.prompt_len, *w.widths, *w.segments) < 1:
        raise ValueError(f"--workload {text!r}: a name, and every count >= 1")
    return w


def workloads(quick: bool) -> dict[str, Workload]:
    if quick:
        return {
            "flat": Workload("flat", 2, 64, (4,), (8,)),
            "tree": Workload("tree", 2, 64, (2, 2, 2), (4, 4, 4)),
            "long": Workload("long", 1, 256, (4,), (8,)),
        }
    return {
        "flat": Workload("flat", 2, 1024, (64,), (96,)),
        "tree": Workload("tree", 2, 1024, (4, 4, 4), (32, 32, 32)),
        "long": Workload("long", 1, 4096, (64,), (32,)),
    }


def _positions_sum(start: int, length: int) -> int:
    """Sum over positions start .. start+length-1 of the keys each attends to (position + 1)."""
    return length * (2 * start + length + 1) // 2


def floor_flops(cfg, w: Workload) -> dict[str, int]:
    """FLOPs of the unique tokens of `w` on a Llama-shaped `cfg` (2 FLOPs per multiply-add)."""
    h, inter, vocab, layers = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.vocab_size,
        cfg.num_hidden_layers,
    )
    head_dim = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    q_dim, kv_dim = cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim
    linear_per_token = 2 * layers * (h * q_dim + 2 * h * kv_dim + q_dim * h + 3 * h * inter)
    attn_per_key = 2 * 2 * layers * q_dim  # q.k and p.v, every head
    # Forwarded spans per prompt: the prompt, then each round's segments; a leaf's last token is
    # sampled but never forwarded (nothing comes after it).
    tokens, keys = w.prompt_len, _positions_sum(0, w.prompt_len)
    start = w.prompt_len
    for k, seg in enumerate(w.segments):
        fwd = seg - 1 if k == w.depth - 1 else seg
        tokens += w.nodes_at(k) * fwd
        keys += w.nodes_at(k) * _positions_sum(start, fwd)
        start += seg
    linear = w.n_prompts * tokens * linear_per_token
    attention = w.n_prompts * keys * attn_per_key
    lm_head = w.sampled_tokens * 2 * h * vocab
    return {
        "forwarded_tokens": w.n_prompts * tokens,
        "linear": linear,
        "attention": attention,
        "lm_head": lm_head,
        "total": linear + attention + lm_head,
    }


def matmul_gflops(dtype: torch.dtype, n: int = 2048, tries: int = 5) -> float:
    """Best-of-`tries` rate of an n x n x n product in `dtype`, GFLOP/s, at the current threads:
    the faster of torch.matmul (MKL) and oneDNN on a prepacked weight (what the engine's linear
    layers run, rollout/engine/packed_linear.py), so the floor is the best this machine reaches."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    products = [lambda: a @ b]
    if packed_available(dtype):
        w = torch.ops.mkldnn._reorder_linear_weight(b, n)
        products.append(lambda: torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], ""))
    best = math.inf
    for product in products:
        product()  # first touch of the output and the kernel's buffers
        for _ in range(tries):
            start = time.perf_counter()
            product()
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9
