"""Choices from trees: each prompt's leaves, in tree order, written as OpenAI choices.

A choice is one root-to-leaf path: its tokens, log-probs and top alternatives are those of the
nodes along the path, concatenated (for a depth-1 tree, the leaf's own). Indices run over the
prompts in order, so with n choices per prompt choice `i * n + j` is prompt i's j-th (OpenAI's
numbering); a tree whose branch stopped before forking has fewer leaves, and later indices shift.

Text follows OpenAI and vLLM: special tokens skipped (unless `skip_special_tokens` is false);
the text is cut before the first stop string, and the EOS or stop token id that ended a choice
is not written; `include_stop_str_in_output` keeps both. Token ids and log-probs always keep
every sampled token. While a choice is still streaming, text that could be the start of a stop
string, or an incomplete UTF-8 character, is held back until the next step decides it.
Log-probs of -inf (a masked token among the alternatives) are written as vLLM's -9999.0, since
JSON has no infinity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from trees import Tree

from .convert import Output

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}  # engine -> OpenAI
NEG_INF = -9999.0


@dataclass(frozen=True)
class Choice:
    index: int
    prompt: int  # which prompt of the request
    tokens: list[int]
    logprobs: list[float]
    top: list[list[tuple[int, float]]] | None
    finish: str | None  # the engine's "eos" | "stop" | "length"; None while running
    path: list[int]  # node ids from the root to the leaf
    segment_lens: list[int]  # tokens of each node on the path (the root's: the prompt's)


def leaf_choices(trees: list[Tree]) -> list[Choice]:
    out = []
    for p, tree in enumerate(trees):
        for leaf in tree.leaves():
            nodes = leaf.path()
            sampled = nodes[1:]
            tops = [n.top_logprobs for n in sampled]
            out.append(
                Choice(
                    index=len(out),
                    prompt=p,
                    tokens=[t for n in sampled for t in n.tokens],
                    logprobs=[lp for n in sampled for lp in n.logprobs],
                    top=None if None in tops else [row for t in tops for row in t],
                    finish=leaf.finish_reason,
                    path=[n.id for n in nodes],
                    segment_lens=[len(n.tokens) for n in nodes],
                )
            )
    return out


def _finite(lp: float) -> float:
    return lp if math.isfinite(lp) else NEG_INF


class Writer:
    """Writes text and log-probs for one request (its tokenizer and `Output`)."""

    def __init__(self, tokenizer: Any, out: Output) -> None:
        self.tokenizer, self.out = tokenizer, out
        self._strs: dict[int, str] = {}

    # text ------------------------------------------------------------------------------------
    def text(self, tokens: list[int], finish: str | None) -> str:
        """The text of a choice's tokens, finished (`finish` set) or still running (None)."""
        out = self.out
        if finish == "eos" and not out.keep_stop:
            tokens = tokens[:-1]  # the EOS / stop token id is not written
        text = self.tokenizer.decode(tokens, skip_special_tokens=out.skip_special)
        if finish == "stop":
            return cut_at_stop(text, out.stop, out.keep_stop)
        if finish is None:
            if out.stop:  # hold back what may be the start of a stop string
                text = text[: max(len(text) - max(map(len, out.stop)) + 1, 0)]
            text = text.rstrip("\ufffd")  # an incomplete UTF-8 character
        return text

    def token_str(self, token: int) -> str:
        """How a log-prob entry names `token` (its text, or "token_id:<id>" when asked)."""
        if self.out.ids_as_tokens or self.tokenizer is None:
            return f"token_id:{token}"
        return self._decoded(token)

    def _decoded(self, token: int) -> str:
        if token not in self._strs:
            self._strs[token] = self.tokenizer.decode([token])
        return self._strs[token]

    def text_len(self, tokens: list[int]) -> int:
        """Characters of the tokens' own decoded texts (completions' text offsets)."""
        if self.tokenizer is None:
            return 0
        return sum(len(self._decoded(t)) for t in tokens)

    # log-probs -------------------------------------------------------------------------------
    def chat_logprobs(
        self, tokens: list[int], lps: list[float], top: list | None
    ) -> dict[str, Any] | None:
        """{"content": [{token, logprob, bytes, top_logprobs}]} (chat and generate routes)."""
        if not self.out.logprobs:
            return None

        def entry(t: int, lp: float) -> dict[str, Any]:
            s = self.token_str(t)
            return {"token": s, "logprob": _finite(lp), "bytes": list(s.encode())}

        rows = top if top is not None else [[] for _ in tokens]
        content = [
            {**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in row]}
            for t, lp, row in zip(tokens, lps, rows, strict=True)
        ]
        return {"content": content}

    def legacy_logprobs(
        self, tokens: list[int], lps: list[float], top: list | None, offset: int = 0
    ) -> dict[str, Any] | None:
        """Completions' {"tokens", "token_logprobs", "top_logprobs", "text_offset"}: each
        top_logprobs dict holds the alternatives and the sampled token (OpenAI's legacy shape);
        text offsets count each token's own decoded text from `offset`."""
        if not self.out.logprobs:
            return None
        rows = top if top is not None else [[] for _ in tokens]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += self.text_len([t])
        return {
            "tokens": [self.token_str(t) for t in tokens],
            "token_logprobs": [_finite(lp) for lp in lps],
            "top_logprobs": [
                {self.token_str(a): _finite(alp) for a, alp in [*row, (t, lp)]}
                for t, lp, row in zip(tokens, lps, rows, strict=True)
            ],
            "text_offset": offsets,
        }

    # choices ---------------------------------------------------------------------------------
    def tree_fields(self, c: Choice) -> dict[str, Any]:
        return {"tree_path": c.path, "tree_segment_lens": c.segment_lens} if self.out.tree else {}

    def completion(self, c: Choice, prompt_ids: list[int]) -> dict[str, Any]:
        ids = {"prompt_token_ids": prompt_ids, "token_ids": c.tokens} if self.out.token_ids else {}
        return {
            "index": c.index,
            "text": self.text(c.tokens, c.finish),
            "logprobs": self.legacy_logprobs(c.tokens, c.logprobs, c.top),
            "finish_reason": FINISH.get(c.finish or ""),
            **ids,
            **self.tree_fields(c),
        }

    def chat(self, c: Choice) -> dict[str, Any]:
        message = {"role": "assistant", "content": self.text(c.tokens, c.finish)}
        return {
            "index": c.index,
            "message": message,
            "logprobs": self.chat_logprobs(c.tokens, c.logprobs, c.top),
            "finish_reason": FINISH.get(c.finish or ""),
            **({"token_ids": c.tokens} if self.out.token_ids else {}),
            **self.tree_fields(c),
        }

    def generate(self, c: Choice) -> dict[str, Any]:
        return {
            "index": c.index,
            "logprobs": self.chat_logprobs(c.tokens, c.logprobs, c.top),
            "finish_reason": FINISH.get(c.finish or ""),
            "token_ids": c.tokens,
            **self.tree_fields(c),
        }


def cut_at_stop(text: str, stop: tuple[str, ...], keep: bool) -> str:
    """`text` before its first stop string (through it when `keep`); all of it if none."""
    hits = [(i, s) for s in stop if (i := text.find(s)) >= 0]
    if not hits:
        return text
    i, s = min(hits)
    return text[: i + len(s)] if keep else text[:i]


def usage(prompts: list[list[int]], choices: list[Choice], trees: list[Tree]) -> dict[str, Any]:
    """OpenAI's usage: each prompt counted once, every choice's tokens (shared tree prefixes
    once per choice that holds them), and in `prompt_tokens_details.cached_tokens` the prompt
    tokens read from KV computed before (a shared prefix, the prefix cache), as vLLM reports."""
    prompt = sum(map(len, prompts))
    completion = sum(len(c.tokens) for c in choices)
    cached = sum(t.stats.prefix_tokens_reused for t in trees)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
