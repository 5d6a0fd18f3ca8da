"""Streaming (`stream: true`): the chunks of each choice concatenate to the answer the same seeded
request gets without streaming, and a caller that goes away mid-stream cancels its request."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

import httpx
import openai
import openai_fixtures as fx
from openai_fixtures import NAME

service, client = fx.service, fx.client  # this module's fixtures

CHAT = [{"role": "user", "content": "Tell me a story."}]


def test_streamed_completions_concatenate_to_the_non_streamed_answer(client):
    free = client.completions.create(model=NAME, prompt="Once", max_tokens=12, seed=9)
    stop = free.choices[0].text[6:9]  # ends one choice early, and is held back while streaming
    body = dict(
        model=NAME,
        prompt=["Once", "Twice"],
        n=2,
        max_tokens=12,
        seed=9,
        logprobs=1,
        stop=stop,
        extra_body={"return_token_ids": True},
    )
    whole = client.completions.create(**body)
    text, ids, lps, finish = defaultdict(str), defaultdict(list), defaultdict(list), {}
    prompt_ids, usage = {}, None
    for chunk in client.completions.create(
        **body, stream=True, stream_options={"include_usage": True}
    ):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text[c.index] += c.text
            ids[c.index] += c.model_extra["token_ids"]
            lps[c.index] += c.logprobs.token_logprobs
            if "prompt_token_ids" in c.model_extra:
                prompt_ids[c.index] = c.model_extra["prompt_token_ids"]
            if c.finish_reason is not None:
                finish[c.index] = c.finish_reason
    assert whole.choices[0].finish_reason == "stop"
    for c in whole.choices:
        assert text[c.index] == c.text
        assert ids[c.index] == c.model_extra["token_ids"]
        assert lps[c.index] == c.logprobs.token_logprobs
        assert finish[c.index] == c.finish_reason
        assert prompt_ids[c.index] == c.model_extra["prompt_token_ids"]
    assert usage == whole.usage


def test_streamed_chat_concatenates_to_the_non_streamed_answer(service):
    body = dict(
        model=NAME,
        messages=CHAT,
        n=2,
        max_tokens=8,
        seed=5,
        logprobs=True,
        top_logprobs=2,
        extra_body={"return_token_ids": True},
    )

    async def main():
        async with openai.AsyncOpenAI(base_url=service.url + "/v1", api_key="x") as aclient:
            whole = await aclient.chat.completions.create(**body)
            chunks = [c async for c in await aclient.chat.completions.create(**body, stream=True)]
            return whole, chunks

    whole, chunks = asyncio.run(main())
    content, ids, entries, roles = defaultdict(str), defaultdict(list), defaultdict(list), {}
    for chunk in chunks:
        assert chunk.object == "chat.completion.chunk"
        for c in chunk.choices:
            roles.setdefault(c.index, c.delta.role)  # the first chunk of a choice names the role
            content[c.index] += c.delta.content or ""
            ids[c.index] += c.model_extra.get("token_ids") or []
            entries[c.index] += c.logprobs.content if c.logprobs else []
    assert chunks[0].model_extra["prompt_token_ids"] == whole.model_extra["prompt_token_ids"]
    for c in whole.choices:
        assert roles[c.index] == "assistant"
        assert content[c.index] == c.message.content
        assert ids[c.index] == c.model_extra["token_ids"]
        assert [e.model_dump() for e in entries[c.index]] == [
            e.model_dump() for e in c.logprobs.content
        ]


def test_a_caller_that_leaves_mid_stream_cancels_its_request(service):
    before = service.worker.snapshot()["cancelled"]
    body = {"model": NAME, "prompt": "Go", "max_tokens": 500, "n": 4, "stream": True}
    with httpx.stream("POST", service.url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))
    start = time.monotonic()
    stats = service.wait_idle()
    assert stats["cancelled"] == before + 1
    assert stats["kv_used_blocks"] == 0  # its KV is freed
    assert time.monotonic() - start < 10
    again = httpx.post(service.url + "/v1/completions", json={"prompt": "Go", "max_tokens": 2})
    assert again.status_code == 200 and len(again.json()["choices"]) == 1
