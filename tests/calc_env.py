"""A calculator environment for `verifiers.v1`: the task needs `add(a, b)`, the reward is whether
the final reply is the sum, and every rollout has one model turn more than it has tool results.

verifiers loads plugins by module name (a taskset or harness id names an importable module that
exports the class through `__all__`), so this file is the plugin `calc_env`: `CalcTaskset` yields
`CalcTask`s, and `CalcHarness` is the taskset's default harness (verifiers picks the harness a
taskset module exports). Design decisions:
- The harness runs its agent loop in-process. verifiers allows this ("the interception is the
  contract, not the process"): every model call still goes through the rollout's interception
  endpoint and is recorded on the trace. That avoids the built-in `null` harness, which runs a
  uv script (and so installs its dependencies), and MCP tool servers, which run as subprocesses.
- The harness owns the tool, as the built-in `bash` harness owns `bash`, and calls it itself
  after every assistant turn but the last. A tiny random model never writes a valid tool call,
  and a scheduled call gives each rollout a tool result between model turns whatever the model
  says. Each call gets an id of its own (`add-<turn>`), and the assistant message goes back into
  the history exactly as the model sent it.
"""

from __future__ import annotations

from collections.abc import Iterator

import verifiers.v1 as vf
from openai import AsyncOpenAI
from pydantic import Field

__all__ = ["CalcHarness", "CalcTaskset"]

ADD_TOOL = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "a + b",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}

PAIRS = ((2, 3), (17, 25))


def add(a: int, b: int) -> int:
    return a + b


class CalcData(vf.TaskData):
    a: int
    b: int


class CalcTask(vf.Task[CalcData, vf.State]):
    @vf.reward
    async def correct(self, trace: vf.Trace) -> float:
        """1.0 when the final reply is the sum and nothing else."""
        return float(trace.last_reply == str(add(self.data.a, self.data.b)))

    @vf.metric
    async def tool_results(self, trace: vf.Trace) -> float:
        return float(len(trace.tool_messages))


class CalcTaskset(vf.Taskset[CalcTask]):
    def load(self) -> Iterator[CalcTask]:
        for a, b in PAIRS:
            prompt = f"What is {a} + {b}? Use the add tool."
            yield CalcTask(CalcData(prompt=prompt, a=a, b=b), self.config.task)


class CalcHarnessConfig(vf.HarnessConfig):
    id: str = "calc_env"
    turns: int = Field(3, ge=1)
    """Model calls per rollout; the harness calls `add` between consecutive ones."""


class CalcHarness(vf.Harness[CalcHarnessConfig]):
    """A chat loop over the interception endpoint with `add` as its one tool."""

    NEEDS_CONTAINER = False
    EXECUTES_CODE = False

    async def launch(
        self,
        ctx: vf.ModelContext,
        trace: vf.Trace,
        runtime: vf.Runtime,
        endpoint: str,
        secret: str,
        mcp_urls: dict[str, str],
        data: vf.TaskData,
    ) -> vf.ProgramResult:
        _, prompt = self.resolve_text_prompt(data)
        messages: list[dict] = [{"role": "user", "content": prompt}]
        client = AsyncOpenAI(base_url=endpoint, api_key=secret, max_retries=0)
        try:
            for turn in range(self.config.turns):
                completion = await client.chat.completions.create(
                    model=ctx.model, messages=messages, tools=[ADD_TOOL]
                )
                reply = completion.choices[0].message
                messages.append(reply.model_dump(exclude_none=True))
                if turn + 1 < self.config.turns:
                    messages.append(self._scheduled_add(turn, data))
        finally:
            await client.close()
        return vf.ProgramResult(exit_code=0, stdout=reply.content or "", stderr="")

    def _scheduled_add(self, turn: int, data: vf.TaskData) -> dict:
        """The tool message for the harness's own `add(a, b)` call after model turn `turn`."""
        result = add(data.a, data.b)  # type: ignore[attr-defined]  # CalcData rides the wire
        return {
            "role": "tool",
            "tool_call_id": f"add-{turn}",
            "name": "add",
            "content": str(result),
        }
