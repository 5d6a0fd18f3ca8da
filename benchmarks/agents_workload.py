"""The agents workload: N concurrent conversations of T turns, sent as token ids to
POST /v1/completions, and the count of tokens each turn adds that no earlier turn forwarded.

A conversation's turn t prompt is its turn t - 1 prompt + the model's answer + a synthetic tool
observation; turn 0 is a system prompt shared by every conversation + the first observation. The
system prompt and every observation are random token ids from one seeded RNG, so every server
gets the same inputs (the answers are sampled, so later prompts share lengths, not contents).

Design decisions:
- Two schedules. `lockstep`: turn t of every conversation is sent at once and turn t + 1 starts
  when all have answered, so the servers' counters read between turns give each turn's prefill
  exactly. `free`: each conversation sends its next turn as soon as its answer arrives (agents
  that do not wait for each other); a turn's prefill then comes from each response's
  `usage.prompt_tokens_details.cached_tokens` when the server returns it, else only totals.
- The goal line is computed, not assumed: `NewTokens` is a trie of every sequence whose KV some
  earlier request computed (its prompt + its answer but the last token, which is sampled and
  never forwarded), and a prompt's new tokens are those past its longest match. Requests of one
  turn count in conversation order, so the system prompt is new once, in conversation 0's turn 0.
- Every answer must be exactly `max_tokens` long (EOS ignored on both sides), or the run fails:
  otherwise the servers would be timed on different work.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

import httpx
from agents_servers import Work


@dataclass(frozen=True)
class Workload:
    clients: int = 8
    turns: int = 5
    system_tokens: int = 256
    observation_tokens: int = 32
    max_tokens: int = 32
    vocab_size: int = 4096
    schedule: str = "lockstep"

    def __post_init__(self) -> None:
        for name in ("clients", "turns", "system_tokens", "observation_tokens", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected an integer >= 1")
        if self.schedule not in ("lockstep", "free"):
            raise ValueError(f"schedule={self.schedule!r}: expected 'lockstep' or 'free'")

    @property
    def max_len(self) -> int:
        """The last turn's prompt plus its answer: the context length the servers need."""
        return self.system_tokens + self.turns * (self.observation_tokens + self.max_tokens)


@dataclass
class Conversation:
    """One agent's inputs (fixed up front) and its growing prompt."""

    index: int
    observations: list[list[int]]
    prompt: list[int]
    seed: int


@dataclass(frozen=True)
class Record:
    """One request as the client saw it."""

    client: int
    turn: int
    prompt: tuple[int, ...]
    answer: tuple[int, ...]
    cached_tokens: int | None  # usage.prompt_tokens_details.cached_tokens, when returned
    latency_s: float


@dataclass
class RunResult:
    """One pass of the workload on one server."""

    wall_s: float
    records: list[Record]
    turn_work: list[Work] = field(default_factory=list)  # per turn (lockstep only)
    total_work: Work | None = None  # over the whole pass


def conversations(w: Workload, seed: int) -> list[Conversation]:
    """The inputs of one pass: a shared system prompt, per-conversation observations."""
    rng = random.Random(seed)
    draw = lambda n: [rng.randrange(w.vocab_size) for _ in range(n)]  # noqa: E731
    system = draw(w.system_tokens)
    return [
        Conversation(c, [draw(w.observation_tokens) for _ in range(w.turns)], list(system),
                     seed * 1000 + c)
        for c in range(w.clients)
    ]  # fmt: skip


class NewTokens:
    """A trie of forwarded token sequences: `add` one, `new(prompt)` = tokens past its match."""

    def __init__(self) -> None:
        self.root: dict[int, dict] = {}

    def new(self, prompt: tuple[int, ...]) -> int:
        node, matched = self.root, 0
        for tok in prompt:
            if tok not in node:
                break
            node, matched = node[tok], matched + 1
        return len(prompt) - matched

    def add(self, seq: tuple[int, ...]) -> None:
        node = self.root
        for tok in seq:
            node = node.setdefault(tok, {})


def new_tokens_per_turn(records: list[Record], turns: int) -> list[int]:
    """Per turn, summed over conversations: prompt tokens no earlier request forwarded."""
    trie, out = NewTokens(), [0] * turns
    for r in sorted(records, key=lambda r: (r.turn, r.client)):
        out[r.turn] += trie.new(r.prompt)
        trie.add(r.prompt + r.answer[:-1])
    return out


async def _ask(http: httpx.AsyncClient, body: dict, conv: Conversation, turn: int, w: Workload):
    """Send one turn; return its Record and extend the conversation's prompt."""
    prompt = conv.prompt + conv.observations[turn]
    payload = dict(body, prompt=prompt, seed=conv.seed * 100 + turn)
    start = time.perf_counter()
    r = await http.post("/v1/completions", json=payload)
    latency = time.perf_counter() - start
    if r.status_code != 200:
        raise RuntimeError(f"POST /v1/completions answered {r.status_code}: {r.text[:500]}")
    reply = r.json()
    (choice,) = reply["choices"]
    answer = choice.get("token_ids")
    if answer is None:
        raise RuntimeError("the server returned no choices[0].token_ids (return_token_ids)")
    if len(answer) != w.max_tokens:
        raise RuntimeError(
            f"conversation {conv.index} turn {turn}: {len(answer)} tokens, expected "
            f"max_tokens={w.max_tokens} (finish_reason {choice.get('finish_reason')!r}): "
            "the server stopped early; EOS must be ignored on every server"
        )
    details = (reply.get("usage") or {}).get("prompt_tokens_details") or {}
    conv.prompt = prompt + list(answer)
    return Record(conv.index, turn, tuple(prompt), tuple(answer), details.get("cached_tokens"),
                  latency)  # fmt: skip


async def _lockstep(server, http, body, convs, w) -> RunResult:
    records, turn_work, wall = [], [], 0.0
    before = first = server.counters()
    for turn in range(w.turns):
        start = time.perf_counter()
        got = await asyncio.gather(*(_ask(http, body, c, turn, w) for c in convs))
        wall += time.perf_counter() - start  # counter reads between turns are not timed
        done = [len(r.answer) for r in got]
        after = server.settle(before, len(got), sum(done))
        turn_work.append(server.work(before, after, [len(r.prompt) for r in got], done))
        records += got
        before = after
    total = server.work(
        first, before, [len(r.prompt) for r in records], [len(r.answer) for r in records]
    )
    return RunResult(wall, records, turn_work, total)


async def _free(server, http, body, convs, w) -> RunResult:
    async def agent(conv: Conversation) -> list[Record]:
        return [await _ask(http, body, conv, t, w) for t in range(w.turns)]

    before = server.counters()
    start = time.perf_counter()
    per_agent = await asyncio.gather(*(agent(c) for c in convs))
    wall = time.perf_counter() - start
    records = [r for mine in per_agent for r in mine]
    done = [len(r.answer) for r in records]
    after = server.settle(before, len(records), sum(done))
    prompts = [len(r.prompt) for r in records]
    return RunResult(wall, records, [], server.work(before, after, prompts, done))


async def _run(server, w: Workload, seed: int, body: dict) -> RunResult:
    convs = conversations(w, seed)
    limits = httpx.Limits(max_connections=w.clients + 4, max_keepalive_connections=w.clients + 4)
    async with httpx.AsyncClient(base_url=server.url, timeout=3600, limits=limits) as http:
        schedule = _lockstep if w.schedule == "lockstep" else _free
        return await schedule(server, http, body, convs, w)


def run_workload(server, w: Workload, seed: int, body: dict) -> RunResult:
    """One pass of `w` on `server` (an agents_servers.Server); `body`: the request's fixed fields
    (model, max_tokens, temperature, ignore_eos, ...); each turn adds prompt and seed."""
    return asyncio.run(_run(server, w, seed, body))
