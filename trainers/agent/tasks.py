"""Agent tasks: prompts, the environment that plays each episode, and its reward, in a registry.

An agent task is a text `Task` (prompts as a pure function of (seed, step), one batched reward
call) plus an `Env`. The environment scores the episodes: `environment_reward` sums the rewards
it gave along each episode's path, per turn where it gives them, so an episode's return reaches
the leaf and the tree advantages spread it over the turns (0 where it gave none: an episode cut by
`max_turns` or `max_new_tokens` before it answered, or ended by a failing call).

- `toy_calc` (trainers/agent/toy_task.py): "a*b+c?" answered with two calculator calls by the toy
  policy, learned on this CPU in minutes.
- `gsm8k_calc` (trainers/agent/tools.py): GSM8K questions from a local JSONL file, answered by an
  instruct model that may call a calculator (`<calc>expr</calc>`) any number of turns.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rollout.agent import Env
from trees import Trajectory

from ..config import RunConfig
from ..policy import Task, step_rng
from ..text.tasks import check_gsm8k, gsm8k_task
from . import tools, toy_task


@dataclass(frozen=True)
class AgentTask(Task):
    env: Env | None = None


def environment_reward(outputs: Sequence[Trajectory], prompts: Sequence[Any]) -> list[float]:
    """Each episode's return: the sum of the rewards its environment gave, turn by turn, along the
    path (the final reward alone where the environment only scores the end; 0.0 where it gave
    none)."""
    del prompts
    return [
        sum(r for node in t.nodes for r in node.meta.get("turn_rewards", ())) for t in outputs
    ]


def toy_calc_task(cfg: RunConfig, tokenizer: Any) -> AgentTask:
    del tokenizer
    seed = cfg.train.seed

    def prompts(step: int, n: int) -> list[str]:
        return toy_task.make_prompts(step_rng(seed, step), n)

    return AgentTask(prompts=prompts, reward_fn=environment_reward, env=toy_task.CalculatorEnv())


def gsm8k_calc_task(cfg: RunConfig, tokenizer: Any) -> AgentTask:
    """The text gsm8k task's prompts (with the calculator's instructions as the system prompt,
    unless the config gives one) and its final-number reward, judged by the environment."""
    if not cfg.task.system_prompt:
        cfg = dataclasses.replace(
            cfg, task=dataclasses.replace(cfg.task, system_prompt=tools.SYSTEM_PROMPT)
        )
    base = gsm8k_task(cfg, tokenizer)
    env = tools.CalculatorToolEnv(base.reward_fn)
    return AgentTask(prompts=base.prompts, reward_fn=environment_reward, env=env)


AGENT_TASKS: dict[str, Callable[[RunConfig, Any], AgentTask]] = {
    "toy_calc": toy_calc_task,
    "gsm8k_calc": gsm8k_calc_task,
}


def check_agent_task(cfg: RunConfig) -> None:
    if cfg.task.name not in AGENT_TASKS:
        raise ValueError(
            f"task.name={cfg.task.name!r} is not an agent task; choose one of {sorted(AGENT_TASKS)}"
        )
    if cfg.task.name == "gsm8k_calc":
        check_gsm8k(cfg)


def build_agent_task(cfg: RunConfig, tokenizer: Any) -> AgentTask:
    check_agent_task(cfg)
    return AGENT_TASKS[cfg.task.name](cfg, tokenizer)
