"""The toy agent task: "a*b+c?" with a calculator tool, learned by a tiny Llama on this CPU.

The ideal episode has three turns, each a node boundary of an agent tree:

    prompt  "12*34+5?"
    turn 1  "c12*34]"   -> observation "=408|"
    turn 2  "c408+5]"   -> observation "=413|"
    turn 3  "a413" EOS  -> done, reward 1.0 (0.0 for a wrong number)

The operands run up to 30, products up to 900, which a 2-layer model cannot multiply in its head:
it has to copy them into a call and copy the tool's answer onward. The reward is binary, only at
the end, as in RL with verifiable rewards; a malformed call answers "e|" and wastes a turn. The
policy is pretrained by teacher forcing with the loss on its own turns only (prompt and
observation tokens are context, never targets), on a mix like the traces an agent's SFT data
holds: most (`SHORTCUT_RATE`) stop after the first tool result and answer with the product,
forgetting the addition ("a408" EOS, reward 0), the rest are ideal. Long enough that the policy
copies reliably (the copying is what takes a 2-layer model long to learn, at a step that varies
with the seed), it starts at about (1 - SHORTCUT_RATE) of the reward, and RL's job is the decision
after the first observation: call again or answer. That is where per-turn and after-observation
forks put their siblings. Everything is seeded and deterministic.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from transformers import LlamaForCausalLM

from rollout.agent import Env, Observation, Turn

from ..text.toy_task import toy_llama

PAD, EOS = "<pad>", "<eos>"
CALL, ANSWER, TURN_STOP, OBS, OBS_END, ERROR = "c", "a", "]", "=", "|", "e"
VOCAB = [PAD, EOS, *"0123456789", "+", "*", "?", CALL, ANSWER, TURN_STOP, OBS, OBS_END, ERROR]

MAX_TURNS = 4  # the ideal episode needs 3: one slack turn to recover from a malformed call
MAX_TURN_TOKENS = 12  # the longest ideal turn is "c900+30]" (8 tokens), with slack
MAX_NEW_TOKENS = 48  # the longest ideal episode after its prompt is 34 tokens
PRETRAIN_STEPS = 300  # copies reliably on seeds 0-3 (shorter runs learn it on some seeds only)
SHORTCUT_RATE = 0.7  # pretraining traces that answer after the first tool result
OPERANDS, ADDEND = (2, 30), (1, 30)  # a, b and c of "a*b+c?"

_PROMPT = re.compile(r"(\d+)\*(\d+)\+(\d+)\?")
_CALL = re.compile(r"c(\d+)([+*])(\d+)\]")
_ANSWER = re.compile(r"a(\d+)")


class CalcTokenizer:
    """Character tokenizer for the calculator task, with the call/decode surface samplers use."""

    pad_token_id = 0
    eos_token_id = 1
    vocab_size = len(VOCAB)

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text, add_special_tokens)}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Ids of `text`, one per character (there is no BOS, so `add_special_tokens` adds none)."""
        bad = sorted(set(text) - set(VOCAB))
        if bad:
            raise ValueError(f"calc tokenizer: characters {bad} are outside the vocabulary {VOCAB}")
        return [VOCAB.index(c) for c in text]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        specials = {self.pad_token_id, self.eos_token_id} if skip_special_tokens else set()
        return "".join(VOCAB[i] for i in ids if i not in specials)


# the task -------------------------------------------------------------------------------------
def make_prompts(rng: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(n):
        a, b, c = rng.randint(*OPERANDS), rng.randint(*OPERANDS), rng.randint(*ADDEND)
        out.append(f"{a}*{b}+{c}?")
    return out


def operands(prompt: str) -> tuple[int, int, int]:
    """(a, b, c) of the prompt "a*b+c?"."""
    match = _PROMPT.fullmatch(prompt)
    if match is None:
        raise ValueError(f"prompt {prompt!r}: expected 'a*b+c?' with a, b, c non-negative ints")
    a, b, c = map(int, match.groups())
    return a, b, c


def answer(prompt: str) -> int:
    a, b, c = operands(prompt)
    return a * b + c


def ideal_turns(prompt: str, shortcut: bool = False) -> list[str]:
    """The model's turns of the ideal episode (the last one is followed by EOS), or with
    `shortcut` of the one that answers the product after the first call (reward 0)."""
    a, b, c = operands(prompt)
    if shortcut:
        return [f"c{a}*{b}]", f"a{a * b}"]
    return [f"c{a}*{b}]", f"c{a * b}+{c}]", f"a{a * b + c}"]


class Trace(NamedTuple):
    """A whole episode's ids, and which of them the model samples (its turns and EOS)."""

    ids: list[int]
    sampled: list[bool]


def ideal_trace(prompt: str, tok: CalcTokenizer, shortcut: bool = False) -> Trace:
    """Prompt, then each ideal (or `shortcut`) turn and the calculator's answer to it, then EOS."""
    ids, sampled = tok.encode(prompt), [False] * len(prompt)
    env = CalculatorEnv()
    state = env.start(prompt)
    for i, text in enumerate(ideal_turns(prompt, shortcut)):
        turn_ids = tok.encode(text)
        obs = env.step(state, Turn(tuple(turn_ids), text, i, "turn_stop"))
        obs_ids = [tok.eos_token_id] if obs.done else tok.encode(obs.text or "")
        ids += turn_ids + obs_ids
        sampled += [True] * len(turn_ids) + [obs.done] * len(obs_ids)  # EOS is the model's
    return Trace(ids, sampled)


# the environment ------------------------------------------------------------------------------
class CalculatorEnv(Env):
    """Answers "c<int>+<int>]" and "c<int>*<int>]" with "=<value>|", anything but a call or a
    final "a<int>" with "e|", and scores the final answer 1.0 if right, else 0.0."""

    def start(self, prompt: Any) -> dict[str, int]:
        text = prompt if isinstance(prompt, str) else CalcTokenizer().decode(prompt)
        return {"answer": answer(text), "calls": 0, "errors": 0}

    def step(self, state: dict[str, int], turn: Turn) -> Observation:
        text = turn.text or ""
        if (call := _CALL.fullmatch(text)) is not None:
            x, op, y = int(call[1]), call[2], int(call[3])
            state["calls"] += 1
            return Observation(text=f"={x * y if op == '*' else x + y}|")
        if (final := _ANSWER.fullmatch(text)) is not None:
            reward = float(int(final[1]) == state["answer"])
            return Observation(done=True, reward=reward, info={"calls": state["calls"]})
        state["errors"] += 1
        return Observation(text=f"{ERROR}{OBS_END}")


# the policy -----------------------------------------------------------------------------------
def toy_agent_model(seed: int = 0, attn_implementation: str = "sdpa") -> LlamaForCausalLM:
    """The untrained policy: the toy tiny Llama over this vocabulary, 64 positions (the longest
    prompt, 9 tokens, plus MAX_NEW_TOKENS)."""
    tok = CalcTokenizer
    return toy_llama(len(VOCAB), tok.eos_token_id, tok.pad_token_id, 64, seed, attn_implementation)


def trace_batch(traces: Sequence[Trace], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T] and labels [B, T]: -100 on prompt, observation and padding tokens.
    NOTE: right padding needs no attention mask in a causal model (no real token sees a pad)."""
    width = max(len(t.ids) for t in traces)
    ids = torch.full((len(traces), width), pad_id)
    labels = torch.full((len(traces), width), -100)
    for row, t in enumerate(traces):
        n = len(t.ids)
        ids[row, :n] = torch.tensor(t.ids)
        labels[row, :n] = torch.where(torch.tensor(t.sampled), ids[row, :n], -100)
    return ids, labels


def pretrain(
    model: LlamaForCausalLM, steps: int, seed: int = 0, batch: int = 64,
    shortcut_rate: float = SHORTCUT_RATE,
) -> LlamaForCausalLM:
    """Teacher-force `steps` batches of episodes, a `shortcut_rate` share of them stopping after
    the first tool result (loss on the model's own tokens only)."""
    tok = CalcTokenizer()
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        traces = [
            ideal_trace(p, tok, shortcut=rng.random() < shortcut_rate)
            for p in make_prompts(rng, batch)
        ]
        ids, labels = trace_batch(traces, tok.pad_token_id)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # unclipped, it spikes at ~300
        opt.step()
    opt.zero_grad(set_to_none=True)  # leave no gradients behind for the RL optimizer
    return model.eval()


def build_toy_agent_policy(
    pretrain_steps: int = PRETRAIN_STEPS, seed: int = 0, attn_implementation: str = "sdpa"
) -> tuple[LlamaForCausalLM, CalcTokenizer]:
    """A seeded policy, pretrained for `pretrain_steps` steps, and its tokenizer."""
    model = toy_agent_model(seed, attn_implementation)
    return pretrain(model, pretrain_steps, seed), CalcTokenizer()
