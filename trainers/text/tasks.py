"""Text tasks: where prompts come from and how completions are rewarded, in a registry.

Each builds a `Task` (trainers/policy.py): prompts as a pure function of (seed, step), so resumed
runs see the same prompts, and one batched reward call per step. `toy_sort` asks the toy policy
to sort digits (trainers/text/toy_task.py).

`gsm8k` reads a local JSONL file (`question`, `answer` with the final number after "####"), so the
project never downloads anything; the reward is 1.0 when the completion's final number (after
"####" if present, else the last number) equals the reference, else 0.0.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..policy import Task, step_rng
from .toy_task import SORT_REWARDS, make_prompts


def check_toy_reward(name: str) -> None:
    if name not in SORT_REWARDS:
        raise ValueError(f"task.reward={name!r}: toy_sort rewards are {sorted(SORT_REWARDS)}")


def toy_sort_task(cfg: RunConfig, tokenizer: Any) -> Task:
    del tokenizer
    digits, seed = cfg.task.num_digits, cfg.train.seed
    check_toy_reward(cfg.task.reward)

    def prompts(step: int, n: int) -> list[str]:
        return make_prompts(step_rng(seed, step), n, digits)

    return Task(prompts=prompts, reward_fn=SORT_REWARDS[cfg.task.reward])


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> str | None:
    """The number after the last "####", else the last number in `text`, commas removed."""
    tail = text.rsplit("####", 1)[-1] if "####" in text else text
    found = _NUMBER.findall(tail)
    return found[-1].replace(",", "").rstrip(".") if found else None


@dataclass(frozen=True)
class Gsm8kReward:
    """1.0 when a completion's final number equals its prompt's reference answer, else 0.0."""

    answers: dict[str, str]  # rendered prompt -> reference number

    def __call__(self, outputs: Sequence[str], prompts: Sequence[Any]) -> list[float]:
        scores = []
        for out, prompt in zip(outputs, prompts, strict=True):
            got, want = final_number(out), self.answers.get(str(prompt))
            same = got is not None and bool(want) and float(got) == float(want)
            scores.append(1.0 if same else 0.0)
        return scores


def _render(tokenizer: Any, system: str, question: str) -> str:
    instruction = f"{question}\nThink step by step, then give the final answer after ####."
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": instruction}
        ]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{system}\n{instruction}\n" if system else f"{instruction}\n"


def check_gsm8k(cfg: RunConfig) -> None:
    if not cfg.task.data_path or not Path(cfg.task.data_path).is_file():
        raise ValueError(
            f"task.data_path={cfg.task.data_path!r}: the gsm8k task needs a local JSONL file with "
            "'question' and 'answer' fields (e.g. GSM8K's train.jsonl; see the config's header)"
        )


def gsm8k_task(cfg: RunConfig, tokenizer: Any) -> Task:
    check_gsm8k(cfg)
    path = Path(cfg.task.data_path)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    answers = {
        _render(tokenizer, cfg.task.system_prompt, row["question"]): final_number(row["answer"])
        or ""
        for row in rows
    }
    items = list(answers)
    seed = cfg.train.seed

    def prompts(step: int, n: int) -> list[str]:
        return step_rng(seed, step).sample(items, min(n, len(items)))

    return Task(prompts=prompts, reward_fn=Gsm8kReward(answers))


TASKS: dict[str, Callable[[RunConfig, Any], Task]] = {
    "toy_sort": toy_sort_task,
    "gsm8k": gsm8k_task,
}


def check_text_task(cfg: RunConfig) -> None:
    """The task's options and local files, checked before any model loads."""
    if cfg.task.name == "toy_sort":
        check_toy_reward(cfg.task.reward)
    elif cfg.task.name == "gsm8k":
        check_gsm8k(cfg)


def build_task(cfg: RunConfig, tokenizer: Any) -> Task:
    if cfg.task.name not in TASKS:
        raise ValueError(f"task.name={cfg.task.name!r} is unknown; choose one of {sorted(TASKS)}")
    return TASKS[cfg.task.name](cfg, tokenizer)
