"""The OpenAI-compatible routes against a real server on loopback, driven by the `openai` client:
choices are our trees' leaves, log-probs are the model's own (teacher forcing, fp32 1e-4), token
ids round-trip, stop strings and stop token ids end choices as OpenAI does."""

from __future__ import annotations

import asyncio

import httpx
import openai
import openai_fixtures as fx
import pytest
import torch
from openai_fixtures import NAME, assert_teacher_forced, teacher_forced

service, client, reference = fx.service, fx.client, fx.reference  # this module's fixtures

TEMPERATURE = 0.7
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]


def tokenize(service, **body) -> list[int]:
    return httpx.post(service.url + "/tokenize", json=body).raise_for_status().json()["tokens"]


def test_models_lists_the_served_name_and_its_context(client):
    (card,) = client.models.list().data
    assert card.id == NAME and card.max_model_len == 512


def test_completions_give_n_choices_per_prompt_with_the_models_logprobs(client, service, reference):
    prompts = ["Q: 1+1=", "Hello"]
    out = client.completions.create(
        model=NAME,
        prompt=prompts,
        n=3,
        max_tokens=6,
        temperature=TEMPERATURE,
        seed=4,
        logprobs=0,
        extra_body={"return_token_ids": True},
    )
    assert [c.index for c in out.choices] == list(range(6))
    ids = [tokenize(service, prompt=p) for p in prompts]
    for c in out.choices:
        extra = c.model_extra
        assert extra["prompt_token_ids"] == ids[c.index // 3]  # index = prompt_i * n + j
        assert len(extra["token_ids"]) == len(c.logprobs.token_logprobs) == 6
        assert c.finish_reason == "length"
        assert_teacher_forced(
            reference,
            extra["prompt_token_ids"],
            extra["token_ids"],
            c.logprobs.token_logprobs,
            TEMPERATURE,
        )
    firsts = {tuple(c.model_extra["token_ids"]) for c in out.choices[:3]}
    assert len(firsts) == 3, "the n choices of a prompt are independent samples"
    assert out.usage.prompt_tokens == sum(map(len, ids))
    assert out.usage.completion_tokens == 36 == out.usage.total_tokens - out.usage.prompt_tokens


def test_chat_renders_messages_and_tools_and_returns_the_models_logprobs(service, reference):
    async def main():
        async with openai.AsyncOpenAI(base_url=service.url + "/v1", api_key="x") as aclient:
            return await aclient.chat.completions.create(
                model=NAME,
                messages=CHAT,
                tools=TOOLS,
                n=2,
                max_completion_tokens=5,
                temperature=TEMPERATURE,
                seed=2,
                logprobs=True,
                extra_body={"return_token_ids": True},
            )

    out = asyncio.run(main())
    prompt = tokenize(service, messages=CHAT, tools=TOOLS)
    assert out.model_extra["prompt_token_ids"] == prompt
    assert out.usage.prompt_tokens == len(prompt)
    assert len(out.choices) == 2
    for c in out.choices:
        ids = c.model_extra["token_ids"]
        logprobs = [e.logprob for e in c.logprobs.content]
        assert c.message.role == "assistant" and len(ids) == 5
        assert_teacher_forced(reference, prompt, ids, logprobs, TEMPERATURE)


def test_token_ids_round_trip_through_tokenize_completions_detokenize(client, service):
    text = "The cat sat."
    ids = tokenize(service, prompt=text)
    back = httpx.post(service.url + "/detokenize", json={"tokens": ids}).json()["prompt"]
    assert back == text
    out = client.completions.create(
        model=NAME,
        prompt=ids,
        max_tokens=8,
        seed=7,
        extra_body={"return_token_ids": True, "skip_special_tokens": False},
    )
    (c,) = out.choices
    assert c.model_extra["prompt_token_ids"] == ids
    shown = httpx.post(service.url + "/detokenize", json={"tokens": c.model_extra["token_ids"]})
    assert shown.json()["prompt"] == c.text


def completion(client, stop=None, **extra):
    """One seeded completion (the same tokens every call until a stop ends it) and its ids."""
    (c,) = client.completions.create(
        model=NAME,
        prompt="Once upon",
        max_tokens=24,
        seed=11,
        stop=stop,
        extra_body={"return_token_ids": True, **extra},
    ).choices
    return c, c.model_extra["token_ids"]


def test_a_stop_string_ends_the_choice_and_is_cut_from_the_text(client, service):
    free, free_ids = completion(client)
    stop = free.text[9:11]
    cut, cut_ids = completion(client, stop=[stop, "never appears"])
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[: free.text.index(stop)]
    tokenizer = service.engine.tokenizer
    # every sampled token up to the one that completed the stop string is kept
    n = next(
        k
        for k in range(1, len(free_ids) + 1)
        if stop in tokenizer.decode(free_ids[:k], skip_special_tokens=True)
    )
    assert cut_ids == free_ids[:n]
    kept, _ = completion(client, stop=stop, include_stop_str_in_output=True)
    assert kept.text == free.text[: free.text.index(stop) + len(stop)]


def test_a_stop_token_id_ends_the_choice_and_is_not_written(client, service):
    free, free_ids = completion(client)
    stop_id = free_ids[5]
    out, ids = completion(client, stop_token_ids=[stop_id])
    assert out.finish_reason == "stop"
    assert ids == free_ids[: free_ids.index(stop_id) + 1]
    assert out.text == service.engine.tokenizer.decode(ids[:-1], skip_special_tokens=True)


def test_top_logprobs_are_the_teacher_forced_top_k_sorted(client, service, reference):
    k = 4
    out = client.chat.completions.create(
        model=NAME,
        messages=CHAT,
        max_tokens=6,
        seed=3,
        temperature=TEMPERATURE,
        logprobs=True,
        top_logprobs=k,
        extra_body={"return_token_ids": True, "return_tokens_as_token_ids": True},
    )
    (c,) = out.choices
    ids = c.model_extra["token_ids"]
    logp = teacher_forced(reference, out.model_extra["prompt_token_ids"], ids, TEMPERATURE)
    for pos, entry in enumerate(c.logprobs.content):
        assert entry.token == f"token_id:{ids[pos]}"
        top_ids = [int(e.token.removeprefix("token_id:")) for e in entry.top_logprobs]
        top_lps = [e.logprob for e in entry.top_logprobs]
        assert top_lps == sorted(top_lps, reverse=True) and len(top_lps) == k
        want = torch.topk(logp[pos], k)
        assert top_ids == want.indices.tolist()
        torch.testing.assert_close(torch.tensor(top_lps), want.values, atol=1e-4, rtol=0)
        assert entry.logprob <= top_lps[0] + 1e-6
        if ids[pos] in top_ids:  # the sampled token's entry agrees with its alternative's
            assert entry.logprob == pytest.approx(top_lps[top_ids.index(ids[pos])], abs=1e-6)


def test_tree_fields_make_the_leaves_the_choices(client, service, reference):
    tree = {"depth": 2, "width": [2, 2], "segment_len": 3, "return_token_ids": True}
    out = client.completions.create(
        model=NAME,
        prompt="Tree:",
        max_tokens=6,
        seed=5,
        temperature=TEMPERATURE,
        logprobs=0,
        extra_body=tree,
    )
    assert len(out.choices) == 4
    prompt = tokenize(service, prompt="Tree:")
    by_parent: dict[int, list] = {}
    for c in out.choices:
        extra = c.model_extra
        path, lens = extra["tree_path"], extra["tree_segment_lens"]
        assert path[0] == 0 and len(path) == 3 and lens == [len(prompt), 3, 3]
        by_parent.setdefault(path[1], []).append(extra["token_ids"])
        assert_teacher_forced(
            reference, prompt, extra["token_ids"], c.logprobs.token_logprobs, TEMPERATURE
        )
    assert len(by_parent) == 2
    for siblings in by_parent.values():
        assert len(siblings) == 2 and siblings[0][:3] == siblings[1][:3]
        assert siblings[0] != siblings[1]
    with pytest.raises(openai.BadRequestError, match="4 leaves"):
        client.completions.create(model=NAME, prompt="Tree:", max_tokens=6, n=3, extra_body=tree)
    same = client.completions.create(
        model=NAME,
        prompt="Tree:",
        max_tokens=6,
        seed=5,
        temperature=TEMPERATURE,
        n=4,
        extra_body=tree,
    )
    assert [c.text for c in same.choices] == [c.text for c in out.choices], "seeded: same tree"


def test_the_generate_route_answers_as_verifiers_reads_it(service, reference):
    body = {
        "model": NAME,
        "token_ids": [4, 10, 20, 30],
        "sampling_params": {
            "temperature": TEMPERATURE,
            "max_tokens": 5,
            "logprobs": 1,
            "stop_token_ids": [5],
            "skip_special_tokens": False,
            "n": 2,
        },
    }
    data = httpx.post(service.url + "/inference/v1/generate", json=body).raise_for_status().json()
    assert data["prompt_token_ids"] == body["token_ids"] and data["request_id"]
    assert len(data["choices"]) == 2
    for choice in data["choices"]:
        ids = choice["token_ids"]
        content = choice["logprobs"]["content"]
        assert [e["token"] for e in content] == [f"token_id:{t}" for t in ids]
        assert all(len(e["top_logprobs"]) == 1 for e in content)
        assert choice["finish_reason"] in ("stop", "length")
        assert_teacher_forced(
            reference, body["token_ids"], ids, [e["logprob"] for e in content], TEMPERATURE
        )
