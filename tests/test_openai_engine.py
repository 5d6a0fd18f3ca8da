"""The engine features the OpenAI routes need, in process: stop strings end a branch at the token
that completes one (across a fork too), top log-probs are the tempered distribution's top-k and
cost nothing unless asked, and both survive the tree's JSON round trip."""

from __future__ import annotations

import pytest
import torch

import rollout
from rollout.engine import sampling
from rollout.tiny import tiny_model, tiny_tokenizer
from trees import Tree

TOK = tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=3)


def sample(model, **kw):
    args = dict(depth=2, width=[2, 2], segment_len=4, max_new_tokens=10, seed=2)
    args.update(kw)
    return rollout.sample_tree(["Stop here:"], model=model, tokenizer=TOK, **args)[0]


def text(ids: list[int]) -> str:
    return TOK.decode(ids, skip_special_tokens=True)


def test_a_stop_string_across_a_fork_ends_the_leaf_at_its_completing_token(model):
    free = sample(model)
    path = free.trajectories()[0]
    trunk = text(path.nodes[1].tokens)
    stop = text(path.completion_ids)[len(trunk) - 1 : len(trunk) + 1]  # spans the fork
    assert stop not in trunk, "pick a seed whose trunk does not hold the stop string"
    stopped = sample(model, stop=[stop])
    free_paths = [t.completion_ids for t in free.trajectories()]
    for traj in stopped.trajectories():
        ids = traj.completion_ids
        assert any(f[: len(ids)] == ids for f in free_paths), "same keys, same tokens until stop"
        if traj.leaf.finish_reason == "stop":
            assert stop in text(ids) and stop not in text(ids[:-1])
        else:
            assert stop not in text(ids) and ids in free_paths
    first = stopped.trajectories()[0]
    assert first.leaf.finish_reason == "stop" and first.leaf.depth == 2
    assert len(first.leaf.tokens) == 1, "the leaf's first token completed the stop string"


def test_top_logprobs_are_the_tempered_top_k_and_round_trip_through_json(model):
    tree = sample(model, temperature=0.6, top_k=5, top_logprobs=3)
    for traj in tree.trajectories():
        ids = torch.tensor([traj.prompt_ids + traj.completion_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float() / 0.6, -1)
        logp = logp[len(traj.prompt_ids) - 1 : -1]
        tops = [row for n in traj.nodes[1:] for row in n.top_logprobs]
        assert len(tops) == len(traj.completion_ids)
        for row, want in zip(tops, logp, strict=True):
            best = torch.topk(want, 3)
            assert [t for t, _ in row] == best.indices.tolist()
            torch.testing.assert_close(
                torch.tensor([lp for _, lp in row]), best.values, atol=1e-4, rtol=0
            )
    assert tree.root.top_logprobs is None
    again = Tree.from_json(tree.to_json())
    assert again.to_dict() == tree.to_dict()
    assert again.leaves()[0].top_logprobs == tree.leaves()[0].top_logprobs


def test_without_top_logprobs_no_topk_runs_and_nodes_hold_none(model, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("topk ran although no top log-probs were asked for")

    monkeypatch.setattr(sampling.torch, "topk", refuse)
    tree = sample(model)
    assert all(n.top_logprobs is None for n in tree.nodes())
    assert "top_logprobs" not in tree.to_dict()["root"]["children"][0]


@pytest.mark.parametrize(
    "kw,needle",
    [
        (dict(top_logprobs=21), "top_logprobs=21"),
        (dict(stop=[""]), "non-empty strings"),
        (dict(stop=["a"] * 17), "up to 16"),
    ],
)
def test_bad_stop_and_top_logprobs_arguments_are_refused(model, kw, needle):
    with pytest.raises(ValueError, match=needle):
        sample(model, **kw)


def test_stop_strings_need_a_tokenizer(model):
    with pytest.raises(ValueError, match="need a tokenizer"):
        rollout.sample_tree([[1, 2, 3]], model=model, stop=["x"], max_new_tokens=4)
