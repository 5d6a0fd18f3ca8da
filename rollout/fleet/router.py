"""Which replica a request goes to: prefix affinity with a load-balance fallback (sglang-router's
`cache_aware` policy), or round-robin / random as baselines.

Prefix sharing pays only when requests that share a prefix land on the engine that holds it. The
front keeps, per replica, an approximate radix tree of the prompts it sent there: a set of hashes
of each prompt's leading chunks (`chunk` tokens or characters, 16 by default), chained so that
chunk i's hash covers everything before it. A request's match on a replica is how many of its
leading chunks that replica has seen; it goes to the best match. Why hashes of chunk prefixes
rather than an exact token trie of the replica's cache: the front sees requests, not the replicas'
caches (which evict on their own), so any front-side tree is an estimate anyway; chained hashes
make one lookup a dict probe per chunk, bound memory by an LRU cap per replica, and need no
tokenizer in the front (text prompts are keyed by their characters, as sglang-router does).

Load balance comes first: when the busiest replica's in-flight requests exceed the idlest's by
more than `balance_abs` and by a factor `balance_rel`, the request goes to the idlest replica
whatever it matches, so one hot system prompt cannot pile a whole stream onto one engine. A
request with no match anywhere (a new prefix) also goes to the least loaded replica, which then
becomes its home.
"""

from __future__ import annotations

import json
import random
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

POLICIES = ("prefix", "round-robin", "random")


def routing_key(path: str, body: dict[str, Any]) -> tuple:
    """The request's prompt as a tuple of token ids or characters; () when it has none.

    A batch (several prompts in one request) is keyed by its first prompt: the whole request
    goes to one replica. Chat messages are keyed by their tools and then role and content in
    order, so turn k+1 of a conversation extends turn k's key."""
    if path.endswith("/sample"):
        prompts = body.get("prompts") or []
        return _as_key(prompts[0]) if prompts else ()
    if path.endswith("/completions") and "messages" in body:
        return tuple(_chat_text(body))
    if path.endswith("/completions"):
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of prompts
        return _as_key(prompt)
    if path.endswith("/generate"):
        return _as_key(body.get("token_ids"))
    return ()


def _as_key(prompt: Any) -> tuple:
    if isinstance(prompt, str):
        return tuple(prompt)
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return tuple(prompt)
    return ()


def _chat_text(body: dict[str, Any]) -> str:
    parts = [json.dumps(body["tools"], sort_keys=True)] if body.get("tools") else []
    for message in body.get("messages") or []:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, list):  # content parts: their text
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        parts.append(f"<{message.get('role')}>{content if isinstance(content, str) else ''}\n")
    return "".join(parts)


class Router:
    def __init__(
        self,
        replicas: int,
        policy: str = "prefix",
        *,
        seed: int = 0,
        chunk: int = 16,
        balance_abs: int = 8,
        balance_rel: float = 1.5,
        max_entries: int = 1 << 16,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"routing policy {policy!r}: expected one of {POLICIES}")
        if not isinstance(replicas, int) or replicas < 1:
            raise ValueError(f"replicas={replicas!r}: expected an int >= 1")
        if chunk < 1 or balance_abs < 0 or balance_rel < 1 or max_entries < 1:
            raise ValueError("router tuning: chunk >= 1, balance_abs >= 0, balance_rel >= 1")
        self.replicas, self.policy = replicas, policy
        self.chunk, self.balance_abs, self.balance_rel = chunk, balance_abs, balance_rel
        self.max_entries = max_entries
        self.seen: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(replicas)]
        self.rng = random.Random(seed)
        self.next = 0

    def _hashes(self, key: tuple) -> list[int]:
        """Chained hashes of the key's whole leading chunks (a final partial chunk counts too)."""
        out, h = [], 0
        for i in range(0, len(key), self.chunk):
            h = hash((h, key[i : i + self.chunk]))
            out.append(h)
        return out

    def match(self, replica: int, key: tuple) -> int:
        """Leading chunks of `key` that `replica` has been sent (an estimate of its cache)."""
        seen, n = self.seen[replica], 0
        for h in self._hashes(key):
            if h not in seen:
                break
            n += 1
        return n

    def choose(self, key: tuple, loads: Sequence[int], alive: Sequence[bool]) -> int:
        """The replica for a request with routing key `key`, given in-flight `loads`."""
        live = [r for r in range(self.replicas) if alive[r]]
        if not live:
            raise RuntimeError("no replica is alive")
        if self.policy == "random":
            return self.rng.choice(live)
        if self.policy == "round-robin":
            for _ in range(self.replicas):
                r, self.next = self.next, (self.next + 1) % self.replicas
                if alive[r]:
                    return r
        idlest = min(live, key=lambda r: (loads[r], r))
        busiest, least = max(loads[r] for r in live), loads[idlest]
        if busiest - least > self.balance_abs and busiest > self.balance_rel * least:
            return idlest
        best = max(live, key=lambda r: (self.match(r, key), -loads[r], -r))
        return best if self.match(best, key) else idlest

    def record(self, replica: int, key: tuple) -> None:
        """`replica` was sent `key`: it holds that prefix now (until its cache evicts it)."""
        seen = self.seen[replica]
        for h in self._hashes(key):
            seen[h] = None
            seen.move_to_end(h)
        while len(seen) > self.max_entries:
            seen.popitem(last=False)

    def forget(self, replica: int) -> None:
        """`replica` restarted: its cache is empty."""
        self.seen[replica].clear()
