"""A calculator tool for instruct models: `<calc>expression</calc>` in a turn, answered inline.

The model writes its reasoning and may call the calculator; `</calc>` ends the turn (the run's
`agent.turn_stop`), the environment evaluates the expression (numbers, + - * / ** and brackets,
nothing else: a syntax tree walk, never `eval`) and appends `<result>value</result>` to the same
assistant message, and the model goes on. A turn without a call is the final answer: the episode
ends and is scored by the text task's reward (GSM8K: the final number against the reference).
"""

from __future__ import annotations

import ast
import operator
from typing import Any

from rollout import RewardFunction
from rollout.agent import Env, Observation, Turn

SYSTEM_PROMPT = (
    "You can use a calculator: write <calc>expression</calc> (numbers, + - * / ** and brackets) "
    "and its result appears as <result>value</result>. Think step by step, use the calculator "
    "for arithmetic, then give the final answer after ####."
)
TURN_STOP = "</calc>"
_OPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.Pow: operator.pow, ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}
MAX_EXPRESSION = 200  # characters
MAX_POWER = 64  # exponents above it are refused (no 9**9**9)


def evaluate(expression: str) -> float:
    """The value of an arithmetic expression; ValueError for anything else."""
    if len(expression) > MAX_EXPRESSION:
        raise ValueError("expression too long")

    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > MAX_POWER:
                raise ValueError("exponent too large")
            return _OPS[type(node.op)](left, right)
        raise ValueError(f"not arithmetic: {ast.dump(node)[:60]}")

    try:
        return walk(ast.parse(expression.replace(",", ""), mode="eval"))
    except (SyntaxError, ZeroDivisionError, OverflowError) as err:
        raise ValueError(str(err)) from None


def format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"


class CalculatorToolEnv(Env):
    """Answers `<calc>` calls; a turn without one ends the episode, scored by `answer_reward`."""

    def __init__(self, answer_reward: RewardFunction) -> None:
        self.answer_reward = answer_reward

    def start(self, prompt: Any) -> dict[str, Any]:
        return {"prompt": prompt, "text": "", "calls": 0}

    def step(self, state: dict[str, Any], turn: Turn) -> Observation:
        text = turn.text or ""
        state["text"] += text
        if turn.finish_reason == "turn_stop" and "<calc>" in text:
            expression = text.rsplit("<calc>", 1)[1].removesuffix(TURN_STOP)
            state["calls"] += 1
            try:
                result = format_number(evaluate(expression))
            except ValueError as err:
                result = f"error: {err}"
            answer = f"<result>{result}</result>"
            state["text"] += answer
            return Observation(text=answer)
        reward = self.answer_reward([state["text"]], [state["prompt"]])[0]
        return Observation(done=True, reward=float(reward), info={"calls": state["calls"]})
