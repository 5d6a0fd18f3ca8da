"""Token sampling for many branches at once, seeded per branch, without a host sync.

Randomness is counter-based: each draw's uniform is a hash of its branch key (splitmix64 finalizer
in int64 arithmetic), so a branch's draw depends only on its key, not on which other branches share
the batch or in what order an engine ran them. A draw is an exact inverse-CDF sample: the first
token whose cumulative probability exceeds u * total. One uniform and one cumulative sum per row,
instead of a noise value per vocabulary entry (Gumbel-max), keeps sampling cheap for large
vocabularies and batches.

Recorded log-probabilities are those of the tempered, unfiltered distribution,
log_softmax(logits / temperature): the quantity an RL trainer recomputes from its own forward.
top-k / top-p only restrict which tokens can be drawn. temperature == 0 means greedy decoding, with
log-probabilities at temperature 1. The top alternatives a caller may ask for (`top_logprobs`, for
the OpenAI routes) come from that same distribution, and only rows that ask for them pay the
`topk` and its extra host copy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from tree_kernels.fused_cpu import fused_available

from .stop import StopStrings

TopLogprobs = list[tuple[int, float]]  # (token id, log-prob), most likely first


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_ids: frozenset[int] = frozenset()
    top_logprobs: int = 0  # alternatives recorded per sampled token; 0 records none
    stop: StopStrings | None = None  # stop strings, checked as each token is appended


_M1 = -4658895280553007687  # 0xBF58476D1CE4E5B9 as a signed int64
_M2 = -7723592293110705685  # 0x94D049BB133111EB
_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def uniform_noise(keys: torch.Tensor, vocab: int = 1) -> torch.Tensor:
    """[R] int64 keys -> [R, vocab] fp32 uniforms in (0, 1), a pure function of (key, column)."""
    cols = torch.arange(vocab, device=keys.device, dtype=torch.int64)
    z = keys[:, None] * _GOLDEN + (cols[None, :] + 1) * _M2  # int64 arithmetic wraps
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    z = z ^ _shr(z, 31)
    top24 = _shr(z, 40).to(torch.float32)
    return (top24 + 0.5) / float(1 << 24)


class Sampled(NamedTuple):
    tokens: torch.Tensor  # [R] int64
    logprobs: torch.Tensor  # [R] fp32, log p(token) under log_softmax(logits / temperature)
    top_ids: torch.Tensor | None = None  # [R, k] int64, the k likeliest tokens, likeliest first
    top_logprobs: torch.Tensor | None = None  # [R, k] fp32, their log-probs (same distribution)


class Drawn(NamedTuple):
    """`draw_rows`' answer, in input order; `top[i]` is None where row i asked for none."""

    tokens: list[int]
    logprobs: list[float]
    top: list[TopLogprobs | None]


def filter_logprobs(logp: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set log-probs outside the top-k / nucleus to -inf. logp: [R, V] normalized log-probs."""
    if top_k and top_k < logp.shape[-1]:
        kth = torch.topk(logp, top_k, dim=-1).values[:, -1:]
        logp = logp.masked_fill(logp < kth, float("-inf"))
    if top_p < 1.0:
        sorted_lp, order = torch.sort(logp, dim=-1, descending=True)
        cum = torch.cumsum(sorted_lp.exp(), dim=-1)
        # keep a token if the mass strictly before it is < top_p (so the top token always stays)
        drop_sorted = (cum - sorted_lp.exp()) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logp = logp.masked_fill(drop, float("-inf"))
    return logp


def draw_inverse_cdf(allowed: torch.Tensor, logp: torch.Tensor,
                     keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's first token whose cumulative probability reaches u * total, u its key's
    uniform; and that token's log-prob. allowed: [R, V] fp32 log-probs the draw may pick (-inf
    where filtered out); logp: [R, V] what to report; keys: [R] int64. The CPU runs the native
    op (tree_kernels/sample_cpu.cpp) with these bits."""
    cdf = torch.cumsum(allowed.exp(), dim=-1)  # [R, V]; tokens outside top-k/top-p add 0
    u = uniform_noise(keys) * cdf[:, -1:]  # [R, 1]
    tokens = torch.searchsorted(cdf, u).clamp_(max=allowed.shape[-1] - 1)[:, 0]
    return tokens, logp.gather(-1, tokens[:, None])[:, 0]


def sample(
    logits: torch.Tensor,
    keys: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    top_logprobs: int = 0,
) -> Sampled:
    """One token per row. logits: [R, V] (any float dtype); keys: [R] int64 branch keys.
    top_logprobs > 0 also returns each row's `top_logprobs` likeliest tokens and log-probs."""
    logits = logits.float()
    if temperature == 0:
        logp = torch.log_softmax(logits, dim=-1)
        tokens = logp.argmax(dim=-1)
        chosen = logp.gather(-1, tokens[:, None])[:, 0]
    else:
        tempered = logits if temperature == 1.0 else logits / temperature  # x / 1.0 == x
        logp = torch.log_softmax(tempered, dim=-1)
        allowed = filter_logprobs(logp, top_k, top_p)
        if allowed.device.type == "cpu" and fused_available():
            tokens, chosen = torch.ops.tree_kernels_cpu.sample_rows(allowed, logp, keys)
        else:
            tokens, chosen = draw_inverse_cdf(allowed, logp, keys)
    if top_logprobs <= 0:
        return Sampled(tokens, chosen)
    top = torch.topk(logp, min(top_logprobs, logp.shape[-1]), dim=-1)  # sorted, likeliest first
    return Sampled(tokens, chosen, top.indices, top.values)


def draw_rows(
    logits: torch.Tensor, rows: list[int], keys: list[int], params: Sequence[SamplingParams]
) -> Drawn:
    """Draw one token per (logit row, branch key, parameters), rows grouped by their sampling
    parameters; the engine step's one host sync (groups that ask for top log-probs add one copy
    each). Returns tokens, log-probs and top alternatives in input order."""
    by_object: dict[int, list[int]] = {}  # trees share their parameters' object: group by it
    for i, p in enumerate(params):
        by_object.setdefault(id(p), []).append(i)
    groups: dict[tuple, list[int]] = {}
    for idx in by_object.values():
        p = params[idx[0]]
        groups.setdefault((p.temperature, p.top_k, p.top_p, p.top_logprobs), []).extend(idx)
    dev = logits.device
    order, drawn_tokens, drawn_logprobs = [], [], []
    top: list[TopLogprobs | None] = [None] * len(rows)
    for (temp, top_k, top_p, k), idx in groups.items():
        picked = [rows[i] for i in idx]
        every_row = picked == list(range(logits.shape[0]))  # a plain decode step: no gather
        drawn = sample(
            logits if every_row else logits[torch.tensor(picked, device=dev)],
            torch.tensor([keys[i] for i in idx], dtype=torch.int64, device=dev),
            temp,
            top_k,
            top_p,
            k,
        )
        order += idx
        drawn_tokens.append(drawn.tokens)
        drawn_logprobs.append(drawn.logprobs)
        if drawn.top_ids is not None:
            pairs = zip(drawn.top_ids.tolist(), drawn.top_logprobs.tolist(), strict=True)
            for i, (ids, lps) in zip(idx, pairs, strict=True):
                top[i] = list(zip(ids, lps, strict=True))
    tokens, logprobs = [0] * len(rows), [0.0] * len(rows)
    flat = zip(
        order, torch.cat(drawn_tokens).tolist(), torch.cat(drawn_logprobs).tolist(), strict=True
    )
    for i, tok, lp in flat:
        tokens[i], logprobs[i] = tok, lp
    # NaN or +inf anywhere in a row's logits makes that row's log-probs NaN (-inf entries, a
    # masked vocabulary, are legal): checking the drawn ones needs no pass over [R, V].
    if not all(map(math.isfinite, logprobs)):
        raise FloatingPointError(
            "the model produced non-finite logits (NaN or inf); check its weights and dtype"
        )
    return Drawn(tokens, logprobs, top)


def tempered_entropy(logits: torch.Tensor, temperatures: Sequence[float]) -> torch.Tensor:
    """[R] entropy in nats of each row's tempered distribution softmax(logits / T), the one a draw
    uses (T = 0 reads T = 1; top-k / top-p do not enter). logits: [R, V]."""
    temps = torch.tensor([t or 1.0 for t in temperatures], device=logits.device)
    logp = torch.log_softmax(logits.float() / temps[:, None], dim=-1)
    return -torch.where(logp > -math.inf, logp.exp() * logp, 0.0).sum(-1)
