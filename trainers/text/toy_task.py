"""The toy task: sort a string of digits, learned by a tiny Llama on this CPU in minutes.

Prompt "3141592>" asks for the sorted digits "1123459" then EOS. The reward is verifiable: by
default dense, the fraction of answer positions that are right (a wrong length costs the missing or
extra positions); `task.reward=exact` makes it binary (1 only for the exact answer). The policy is
a 2-layer Llama over a 13-token vocabulary, built from a config and pretrained here by teacher
forcing for a few hundred steps (seconds), deliberately short so that it starts part-way and RL
has room to improve it. Everything is seeded: the same config gives the same weights, which lets a
resumed run rebuild its frozen reference exactly.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

PAD, EOS, SEP = "<pad>", "<eos>", ">"
VOCAB = [PAD, EOS, SEP, *"0123456789"]


class ToyTokenizer:
    """Character tokenizer for the toy task, with the call/decode surface samplers use."""

    pad_token_id = 0
    eos_token_id = 1
    vocab_size = len(VOCAB)

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text)}

    def encode(self, text: str) -> list[int]:
        bad = sorted(set(text) - set(VOCAB))
        if bad:
            raise ValueError(f"toy tokenizer: characters {bad} are outside the vocabulary {VOCAB}")
        return [VOCAB.index(c) for c in text]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        specials = {0, 1} if skip_special_tokens else set()
        return "".join(VOCAB[i] for i in ids if i not in specials)


def make_prompts(rng: random.Random, n: int, num_digits: int) -> list[str]:
    return ["".join(rng.choice("0123456789") for _ in range(num_digits)) + SEP for _ in range(n)]


def answer(prompt: str) -> str:
    return "".join(sorted(prompt.rstrip(SEP)))


def sort_reward(outputs: Sequence[str], prompts: Sequence[Any]) -> list[float]:
    """Fraction of positions equal to the sorted digits; length mismatches count as wrong."""
    scores = []
    for out, prompt in zip(outputs, prompts, strict=True):
        want = answer(str(prompt))
        hits = sum(a == b for a, b in zip(out, want, strict=False))
        scores.append(hits / max(len(want), len(out), 1))
    return scores


def exact_sort_reward(outputs: Sequence[str], prompts: Sequence[Any]) -> list[float]:
    """1.0 when the output is exactly the sorted digits, else 0.0: the binary reward of RL with
    verifiable rewards (as on GSM8K), where a group whose leaves all agree carries no signal."""
    return [float(out == answer(str(p))) for out, p in zip(outputs, prompts, strict=True)]


SORT_REWARDS = {"positions": sort_reward, "exact": exact_sort_reward}


def toy_llama(
    vocab_size: int, eos_id: int, pad_id: int, positions: int, seed: int = 0,
    attn_implementation: str = "sdpa",
) -> LlamaForCausalLM:
    """A seeded untrained tiny Llama: 2 layers, hidden 64, GQA 4/2 heads, fp32 (the toy tasks'
    policies: this one and trainers/agent/toy_task.py)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=positions,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        attn_implementation=attn_implementation,
    )
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = eos_id
    return model


def toy_model(seed: int = 0, attn_implementation: str = "sdpa") -> LlamaForCausalLM:
    """The untrained toy policy over the 13-token vocabulary, 64 positions."""
    tok = ToyTokenizer
    return toy_llama(len(VOCAB), tok.eos_token_id, tok.pad_token_id, 64, seed, attn_implementation)


def pretrain(
    model: LlamaForCausalLM, steps: int, num_digits: int, seed: int = 0, batch: int = 64
) -> LlamaForCausalLM:
    """Teacher-force `steps` batches of sorted answers (loss on answer tokens and EOS only)."""
    tok = ToyTokenizer()
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        prompts = make_prompts(rng, batch, num_digits)
        seqs = [tok.encode(p) + tok.encode(answer(p)) + [tok.eos_token_id] for p in prompts]
        ids = torch.tensor(seqs)
        labels = ids.clone()
        labels[:, : num_digits + 1] = -100  # prompt digits and ">" are not trained
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)  # leave no gradients behind for the RL optimizer
    return model.eval()


def build_toy_policy(
    pretrain_steps: int, num_digits: int, seed: int = 0, attn_implementation: str = "sdpa"
) -> tuple[LlamaForCausalLM, ToyTokenizer]:
    """A seeded toy policy, pretrained for `pretrain_steps` steps, and its tokenizer."""
    model = toy_model(seed, attn_implementation)
    return pretrain(model, pretrain_steps, num_digits, seed), ToyTokenizer()
