"""A served tiny Llama with the tiny tokenizer, named `tiny:llama`, for the OpenAI route tests, and
the teacher-forcing reference the answers are held against."""

from __future__ import annotations

import openai
import pytest
import torch
from service_fixtures import running_service

from rollout.tiny import tiny_model, tiny_tokenizer

NAME = "tiny:llama"
SEED = 1  # the served weights: tiny_model("llama", seed=SEED)


@pytest.fixture(scope="module")
def service():
    with running_service(seed=SEED, tokenizer=tiny_tokenizer(), served_model_name=NAME) as svc:
        yield svc


@pytest.fixture(scope="module")
def client(service):
    with openai.OpenAI(base_url=service.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def reference():
    return tiny_model("llama", seed=SEED)


def teacher_forced(model, prompt_ids, completion_ids, temperature=1.0) -> torch.Tensor:
    """[len(completion), V] log_softmax(logits / T) at each completion position, from the model's
    own eager forward pass (T = 0 reads T = 1, as the engine records greedy log-probs)."""
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    with torch.no_grad():
        logits = model(ids).logits[0].float() / (temperature or 1.0)
    return torch.log_softmax(logits, dim=-1)[len(prompt_ids) - 1 : -1]


def assert_teacher_forced(model, prompt_ids, completion_ids, logprobs, temperature=1.0) -> None:
    """The sampled tokens' log-probs equal teacher forcing (fp32: atol 1e-4)."""
    logp = teacher_forced(model, prompt_ids, completion_ids, temperature)
    expected = logp.gather(-1, torch.tensor(completion_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(logprobs), expected, atol=1e-4, rtol=0)
