"""Hand-built trees and tiny models shared by the trainer tests."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from trainers.checkpoint import latest_checkpoint
from trees import Node, Tree


def spec_node(tokens: list[int], *children: Any, reward: float | None = None) -> dict[str, Any]:
    """A node spec: `tokens`, then child specs; leaves carry a reward."""
    return {"tokens": tokens, "children": list(children), "reward": reward}


def build_tree(prompt: list[int], *children: dict[str, Any], logprobs: bool = False) -> Tree:
    """A Tree from node specs; ids in creation order (depth-first), fake log-probs if asked."""
    counter = iter(range(10_000))
    root = Node(id=next(counter), depth=0, tokens=list(prompt))

    def attach(parent: Node, spec: dict[str, Any]) -> None:
        node = Node(id=next(counter), depth=parent.depth + 1, parent=parent, tokens=spec["tokens"])
        node.logprobs = [-1.0] * len(node.tokens) if logprobs else []
        node.reward = spec["reward"]
        node.finish_reason = "branch" if spec["children"] else "eos"
        parent.children.append(node)
        for child in spec["children"]:
            attach(node, child)

    for child in children:
        attach(root, child)
    return Tree(root=root, prompt=list(prompt))


def random_tree(
    rng: random.Random, vocab: int, widths: list[int], seg: list[int], prompt_len: int
) -> Tree:
    """A random tree of token ids: level d forks widths[d] children of seg[d] tokens (ragged:
    some branches stop early, mimicking EOS)."""

    def grow(level: int) -> dict[str, Any]:
        tokens = [rng.randrange(vocab) for _ in range(max(1, seg[level] - rng.randrange(2)))]
        stop = level + 1 == len(widths) or rng.random() < 0.2
        kids = [] if stop else [grow(level + 1) for _ in range(widths[level + 1])]
        return spec_node(tokens, *kids, reward=None if kids else rng.random())

    prompt = [rng.randrange(vocab) for _ in range(prompt_len)]
    return build_tree(prompt, *[grow(0) for _ in range(widths[0])], logprobs=True)


def tiny_llama(vocab: int = 32, seed: int = 0, attn: str = "sdpa"):
    """A 2-layer Llama with GQA, fp32, random weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(cfg).eval()


ROOT = Path(__file__).resolve().parents[1]


def kill_run_after_step_3(preset: str, ckpt: Path, output_dir: Path, overrides: list[str]) -> int:
    """Start `python -m trainers.train` on configs/<preset>.yaml in a subprocess, SIGKILL it once
    checkpoint step_3 exists, and return the step of the last checkpoint it left."""
    cmd = [sys.executable, "-m", "trainers.train", "--config", f"configs/{preset}.yaml",
           "--no-wandb", "train.steps=100000", f"checkpoint.dir={ckpt}",
           f"output_dir={output_dir}", "log.progress=false", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (ckpt / "step_3.pt").exists():
        assert proc.poll() is None and time.time() < deadline, "the run died before step 3"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return int(latest_checkpoint(ckpt).stem.split("_")[1])
