"""verifiers trains against our service: a multi-turn `verifiers.v1` environment with a tool
(`calc_env`) runs end to end against `rollout.serve`, and its rollouts carry the token ids and
log-probs our model sampled, equal to the model's own teacher-forced log-probs.

The rollout takes the path a prime-rl training run takes (verifiers' `EnvServer` without its ZMQ
socket): `Env.run_slot` inside `Env.serving()`, with a `TrainClientConfig` client. The harness
calls the rollout's interception endpoint with chat requests; verifiers' `TrainClient` renders
each one to token ids with a `renderers` renderer, POSTs them to our `/inference/v1/generate`,
and reads back `choices[0].token_ids` and `choices[0].logprobs.content[i]` (`token` is
`"token_id:<id>"`); `GET /v1/models` gives it `max_model_len` for a pre-flight length check. The
trace stores every message once, as a node holding the tokens it adds; the path from the root to
a model call's node concatenates to exactly the prompt and completion that call saw.

Nothing is downloaded: the renderer's tokenizer is our tiny tokenizer saved to a folder, and the
renderer config is explicit (`DefaultRendererConfig`: our ChatML template via
`apply_chat_template`; its `qwen3` tool parser looks for `<tool_call>` tokens, which the tiny
vocabulary lacks, so it never finds a call).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import NamedTuple

import httpx
import openai_fixtures as fx
import pytest
import verifiers.v1 as vf
import verifiers.v1.runtimes.subprocess as vf_subprocess
from calc_env import CalcHarnessConfig, CalcTaskset
from openai_fixtures import NAME, assert_teacher_forced
from renderers import DefaultRendererConfig
from verifiers.v1 import graph
from verifiers.v1.graph import MessageNode
from verifiers.v1.utils.loaders import load_environment

from rollout.tiny import tiny_tokenizer

service, reference = fx.service, fx.reference  # this module's fixtures

TEMPERATURE = 0.8
MAX_TOKENS = 5
TURNS = 3


class CallTokens(NamedTuple):
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]


def call_tokens(trace: vf.Trace, node_id: int) -> CallTokens:
    """What the model call that committed the sampled node `node_id` saw and sampled."""
    path: list[MessageNode] = []
    while node_id is not None:
        path.append(trace.nodes[node_id])
        node_id = trace.nodes[node_id].parent
    ids = [t for node in reversed(path) for t in node.token_ids]
    node = path[0]
    n = sum(node.mask)
    # NOTE: a sampled node holds the generation-prompt scaffold, then the completion.
    assert node.mask == [False] * (len(node.mask) - n) + [True] * n, node.mask
    return CallTokens(ids[: len(ids) - n], ids[len(ids) - n :], node.logprobs)


def run_episode(base_url: str, model: str, tokenizer_dir: Path) -> vf.Episode:
    """One episode of the first `calc_env` task, as verifiers' env server runs one."""
    config = vf.SingleAgentEnvConfig(
        taskset=vf.TasksetConfig(id="calc_env"),
        agent=vf.AgentConfig(harness=CalcHarnessConfig(turns=TURNS), runtime=vf.SubprocessConfig()),
    )
    ctx = vf.ModelContext(
        model=model,
        client=vf.TrainClientConfig(
            base_url=f"{base_url}/v1",
            api_key_var="ROLLOUT_TEST_NO_API_KEY",  # unset: verifiers sends "EMPTY"
            renderer=DefaultRendererConfig(tool_parser="qwen3"),
            renderer_model_name=str(tokenizer_dir),
        ),
        sampling=vf.SamplingConfig(temperature=TEMPERATURE, max_tokens=MAX_TOKENS),
    )
    env = load_environment(config)
    assert isinstance(env.taskset, CalcTaskset)

    async def main() -> vf.Episode:
        async with env.serving():
            (slot,) = env.slots(next(iter(env.taskset)))
            return await env.run_slot(slot, ctx)

    return asyncio.run(main())


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No hub access, and verifiers' per-rollout runtime folder under `tmp_path`."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(vf_subprocess, "CACHE_DIR", tmp_path / "verifiers")
    return tmp_path


def test_train_client_rollout_carries_our_token_ids_and_logprobs(service, reference, offline):
    tokenizer_dir = offline / "tokenizer"
    tiny_tokenizer().save_pretrained(tokenizer_dir)
    (card,) = httpx.get(f"{service.url}/v1/models").raise_for_status().json()["data"]
    assert card["id"] == NAME and card["max_model_len"] == 512, card  # the pre-flight reads it
    episode = run_episode(service.url, NAME, tokenizer_dir)
    errors = [e.message for e in episode.errors] + [
        e.message for t in episode.traces for e in t.errors
    ]
    assert episode.ok, f"episode failed: {errors}"
    (trace,) = episode.traces

    # 1. Every model turn is a call with a sampled node; a tool result precedes every later one.
    assert len(trace.calls) == TURNS == trace.num_turns, trace.transcript
    for turn, call in enumerate(trace.calls):
        assert call.error is None and call.node is not None, call
        messages = graph.path(trace, call.node)
        assert messages[-1].role == "assistant" and trace.nodes[call.node].sampled
        if turn:
            assert messages[-2].role == "tool" and messages[-3].role == "assistant", messages

        # 2. Its completion ids and log-probs are present and are our model's, teacher-forced.
        prompt_ids, completion_ids, logprobs = call_tokens(trace, call.node)
        assert completion_ids and len(logprobs) == len(completion_ids), (turn, call)
        assert (len(prompt_ids), len(completion_ids)) == (
            call.usage.prompt_tokens,
            call.usage.completion_tokens,
        ), call.usage  # what our server answered: prompt_token_ids and choices[0].token_ids
        assert_teacher_forced(reference, prompt_ids, completion_ids, logprobs, TEMPERATURE)

    # 3. The reward and the tool metric are computed.
    data = trace.task.data
    assert trace.rewards["correct"] is not None
    assert trace.rewards["correct"].score == float(trace.last_reply == str(data.a + data.b))
    assert trace.metrics["tool_results"] == TURNS - 1
