"""Bad requests to the OpenAI routes get a 4xx in OpenAI's error shape, naming the field and the
fix; what we cannot honour is refused, never ignored; and the server keeps serving."""

from __future__ import annotations

import httpx
import openai
import openai_fixtures as fx
import pytest
from openai_fixtures import NAME

from rollout.tiny import tiny_tokenizer

service, client = fx.service, fx.client  # this module's fixtures

OK = {"model": NAME, "prompt": "Hi", "max_tokens": 2}
CHAT = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
TREE = {"depth": 2, "width": 2, "segment_len": 2, "max_tokens": 4}

BAD = [
    # (route, body, status, param, needle)
    ("/v1/completions", {**OK, "model": "gpt-4"}, 404, "model", "does not exist"),
    ("/v1/completions", {**OK, "n": 0}, 400, "n", "greater than or equal to 1"),
    ("/v1/completions", {**OK, "temperature": -1}, 400, "temperature", "greater than or equal"),
    ("/v1/completions", {**OK, "temperature": 1e-300}, 400, None, "0 (greedy) or"),
    ("/v1/completions", {**OK, "logit_bias": {"5": 1.0}}, 400, "logit_bias", "not supported"),
    ("/v1/completions", {**OK, "presence_penalty": 0.5}, 400, "presence_penalty", "only 0"),
    ("/v1/completions", {**OK, "frequency_penalty": 1}, 400, "frequency_penalty", "only 0"),
    ("/v1/completions", {**OK, "echo": True}, 400, "echo", "not supported"),
    ("/v1/completions", {**OK, "best_of": 3}, 400, "best_of", "best_of == n"),
    ("/v1/completions", {**OK, "max_tokens": 600}, 400, "max_tokens", "maximum context length"),
    ("/v1/completions", {**OK, "logprobs": 21}, 400, "logprobs", "less than or equal to 20"),
    ("/v1/completions", {**OK, "frobnicate": 1}, 400, "frobnicate", "unsupported field"),
    ("/v1/completions", {**OK, "prompt": [[1, 300]]}, 400, None, "outside the vocabulary"),
    ("/v1/completions", {**OK, "prompt": [[]]}, 400, "prompt.0", "at least 1 item"),
    (
        "/v1/completions",
        {**OK, "stream_options": {"include_usage": True}},
        400,
        "stream_options",
        "stream: true",
    ),
    ("/v1/completions", {**OK, **TREE, "n": 3}, 400, "n", "4 leaves"),
    ("/v1/completions", {**OK, **TREE, "stream": True}, 400, "stream", "tree fields"),
    ("/v1/completions", {**OK, **TREE, "max_tokens": 2}, 400, None, "max_tokens=2"),
    ("/v1/completions", {**OK, "n": 1024, "max_tokens": 500}, 400, None, "KV blocks"),
    (
        "/v1/chat/completions",
        {**CHAT, "response_format": {"type": "json_object"}},
        400,
        "response_format",
        "no constrained decoding",
    ),
    (
        "/v1/chat/completions",
        {**CHAT, "tool_choice": "auto"},
        400,
        "tool_choice",
        "no tool calls are parsed",
    ),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, 400, "top_logprobs", "logprobs: true"),
    (
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "robot", "content": "x"}]},
        400,
        "messages.0.role",
        "'system'",
    ),
    ("/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages", "at least 1 item"),
    ("/v1/chat/completions", {**CHAT, "functions": []}, 400, "functions", "unsupported field"),
    (
        "/inference/v1/generate",
        {"token_ids": [1], "sampling_params": {"min_p": 0.1}},
        400,
        "sampling_params.min_p",
        "not supported",
    ),
    ("/tokenize", {"prompt": "a", "messages": CHAT["messages"]}, 400, "prompt", "exactly one"),
    ("/detokenize", {"tokens": [999]}, 400, "tokens", "outside the vocabulary"),
]


@pytest.mark.parametrize("route,body,status,param,needle", BAD)
def test_bad_requests_get_openai_errors_naming_the_field(
    service, route, body, status, param, needle
):
    response = httpx.post(service.url + route, json=body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert needle in error["message"], error
    assert param is None or error["param"] == param, error
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_malformed_json_and_a_wrong_body_type_are_400s_in_openai_shape(service):
    url = service.url + "/v1/chat/completions"
    headers = {"Content-Type": "application/json"}
    for content in (b"{not json", b"[1, 2]"):
        response = httpx.post(url, content=content, headers=headers, timeout=30)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["type"] == "invalid_request_error"


def test_the_openai_client_raises_the_matching_errors_and_the_server_keeps_serving(client, service):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt="Hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.chat.completions.create(**CHAT, logit_bias={"5": 1.0})
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=NAME, prompt="Hi", max_tokens=2, temperature=-1)
    # a fixed seed: without one each request draws a fresh seed, and a random model's EOS
    # (one token in 256) would end a choice early now and then
    out = client.completions.create(model=NAME, prompt="Hi", max_tokens=3, n=2, seed=1)
    assert len(out.choices) == 2 and all(c.finish_reason == "length" for c in out.choices)
    assert service.wait_idle()["kv_used_blocks"] == 0


def test_the_services_own_routes_keep_their_error_shape(service):
    response = httpx.post(service.url + "/sample", json={"prompts": [[1, 2]], "n": 2}, timeout=30)
    assert response.status_code == 422 and "detail" in response.json()


def test_a_server_without_a_tokenizer_says_which_route_takes_token_ids():
    with fx.running_service(served_model_name=NAME) as bare:
        response = httpx.post(bare.url + "/v1/completions", json={"prompt": [1, 2, 3]})
        assert response.status_code == 400
        assert "/inference/v1/generate" in response.json()["error"]["message"]
        # a fixed seed: a random model's EOS (one token in 256) would end it early now and then
        body = {"token_ids": [1, 2, 3], "sampling_params": {"max_tokens": 2, "seed": 1}}
        response = httpx.post(bare.url + "/inference/v1/generate", json=body)
        assert response.status_code == 200 and len(response.json()["choices"][0]["token_ids"]) == 2


def test_a_server_with_a_token_refuses_a_wrong_api_key_in_openai_shape():
    with fx.running_service(
        tokenizer=tiny_tokenizer(), served_model_name=NAME, token="s3cret"
    ) as locked:
        wrong = openai.OpenAI(base_url=locked.url + "/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError, match="bearer token"):
            wrong.models.list()
        right = openai.OpenAI(base_url=locked.url + "/v1", api_key="s3cret", max_retries=0)
        assert right.models.list().data[0].id == NAME
