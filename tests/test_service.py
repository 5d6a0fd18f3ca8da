"""The rollout service against a real server on loopback: same trees as in-process sampling,
concurrent callers sharing prefixes, weight updates, overload, timeouts and killed callers."""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
from safetensors.torch import save_file
from service_fixtures import CharTokenizer, running_service
from test_text_sampler import assert_exact

import rollout
from rollout.service.app import check_host
from rollout.tiny import tiny_model

KW = dict(segment_len=3, max_new_tokens=8, eos_token_id=[7, 9], seed=11)
SYSTEM = list(range(100, 140))  # a 40-token system prompt several callers share


def assert_same_trees(remote, local):
    """Same shapes, tokens and finish reasons; log-probs to float noise (other batch shapes)."""
    assert len(remote) == len(local)
    for a, b in zip(remote, local, strict=True):
        assert a.prompt_ids == b.prompt_ids
        for na, nb in zip(a.nodes(), b.nodes(), strict=True):
            assert (na.id, na.depth, na.tokens, na.finish_reason) == (
                nb.id,
                nb.depth,
                nb.tokens,
                nb.finish_reason,
            )
            torch.testing.assert_close(na.logprobs, nb.logprobs, atol=1e-5, rtol=0)


def in_process(prompts, depth, width, model_seed=1, tokenizer=None, **kw):
    engine = rollout.Engine(tiny_model("llama", seed=model_seed), tokenizer, block_size=4)
    return engine.sample_tree(prompts, depth, width, **kw)


@pytest.fixture(scope="module")
def service():
    with running_service(tokenizer=CharTokenizer()) as svc:
        yield svc


@pytest.mark.parametrize(
    "prompts,depth,width,extra",
    [
        ([[1, 5, 7, 9, 11], [3, 4]], 1, 4, None),
        ([SYSTEM + [1, 2], SYSTEM + [3], [8, 8, 8]], 2, [3, 2], None),
        (["a text prompt", "another"], 3, [2, 1, 2], None),
        # every entropy of this untrained model (~5.5 nats) is over 4: each inner node forks at
        # its min_segment_len (2, then 1), not at segment_len 3, so the arguments got through
        (
            [SYSTEM + [1, 2], [8, 8, 8]],
            3,
            [2, 2, 1],
            {"branch_entropy": 4.0, "min_segment_len": [2, 1]},
        ),
    ],
)
def test_remote_trees_equal_in_process_trees(service, prompts, depth, width, extra):
    kw = {**KW, **(extra or {})}
    with service.client() as client:
        remote = client.sample_tree(prompts, depth, width, **kw)
    local = in_process(prompts, depth, width, tokenizer=CharTokenizer(), **kw)
    assert_same_trees(remote, local)
    if extra:
        for tree in remote:
            inner = [n for n in tree.nodes() if n is not tree.root and not n.is_leaf]
            assert inner and all(len(n.tokens) == [2, 1][n.depth - 1] for n in inner)
    assert [t.prompt for t in remote] == prompts
    assert [t.policy_version for t in remote] == [0] * len(prompts)
    assert service.wait_idle()["kv_used_blocks"] == 0


def test_a_served_tree_reports_its_own_peak_kv_not_the_servers(service):
    """After a big request has raised the pool's high-water mark, a small tree sent alone still
    reports its own peak: the same as in-process, far below what the big one held."""
    with service.client() as client:
        (big,) = client.sample_tree([list(range(200))], 2, 4, **KW)
        (small,) = client.sample_tree([[1, 2, 3]], 1, 2, **KW)
    (alone,) = in_process([[1, 2, 3]], 1, 2, **KW)
    assert small.stats.peak_kv_bytes == alone.stats.peak_kv_bytes > 0
    assert small.stats.peak_kv_bytes * 10 < big.stats.peak_kv_bytes


def test_eight_concurrent_clients_get_complete_correct_trees(service):
    rng = random.Random(0)
    requests = [
        ([SYSTEM + [rng.randrange(256) for _ in range(rng.randint(1, 6))] for _ in range(2)], i)
        for i in range(8)
    ]
    results: dict[int, list] = {}

    def caller(prompts, seed):
        with service.client() as client:
            results[seed] = client.sample_tree(prompts, 2, [2, 2], **{**KW, "seed": seed})

    threads = [threading.Thread(target=caller, args=r) for r in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == list(range(8))
    model = tiny_model("llama", seed=1)
    for prompts, seed in requests:
        trees = results[seed]
        assert_same_trees(trees, in_process(prompts, 2, [2, 2], **{**KW, "seed": seed}))
        assert_exact(model, trees)
        for tree in trees:
            assert all(leaf.finish_reason in ("eos", "length") for leaf in tree.leaves())
    assert service.wait_idle()["kv_used_blocks"] == 0


def test_requests_that_arrive_together_share_one_system_prompt():
    with running_service(start_worker=False) as svc:
        out = []
        prompts = [[SYSTEM + [i + 1]] for i in range(4)]  # four callers, one prompt each
        threads = [
            threading.Thread(target=lambda p=p: out.append(svc.client().sample_tree(p, **KW)))
            for p in prompts
        ]
        for t in threads:
            t.start()
        while svc.worker.snapshot()["pending_trees"] < 4:
            time.sleep(0.01)
        svc.worker.start()
        for t in threads:
            t.join(30)
        stats = svc.wait_idle()
    assert len(out) == 4
    # the 40-token system prompt is computed once and read by the three other callers' trees
    assert sum(t.stats.prefix_tokens_reused for trees in out for t in trees) == 3 * 40
    assert stats["prefix_tokens_reused"] == 3 * 40 and stats["kv_used_blocks"] == 0


def test_weight_update_switches_the_policy_and_drains_in_flight_trees(tmp_path):
    old, new = tiny_model("llama", seed=1), tiny_model("llama", seed=2)
    prompts = [SYSTEM + [1], SYSTEM + [2]]
    long = dict(segment_len=4, max_new_tokens=60, eos_token_id=[], seed=3)
    with running_service(seed=1) as svc, svc.client() as client:
        before: list = []
        slow = threading.Thread(
            target=lambda: before.extend(client.sample_tree(prompts, 2, 3, **long))
        )
        slow.start()
        while svc.worker.snapshot()["running_trees"] == 0:
            time.sleep(0.005)
        with svc.client() as other:
            assert other.update_weights(new.state_dict()) == 1
            after = other.sample_tree(prompts, 2, 3, **KW)
        slow.join(60)
        assert [t.policy_version for t in before] == [0, 0]  # finished on the old weights
        assert_exact(old, before)
        assert [t.policy_version for t in after] == [1, 1]
        assert_exact(new, after)
        assert_same_trees(after, in_process(prompts, 2, 3, model_seed=2, **KW))
        path = tmp_path / "policy.safetensors"
        save_file(old.state_dict(), str(path))
        assert client.update_weights(path=str(path)) == 2
        again = client.sample_tree(prompts, 2, 3, **KW)
        assert_exact(old, again) and again[0].policy_version == 2
        assert svc.wait_idle()["kv_used_blocks"] == 0


def test_overload_answers_503_with_retry_after_and_loses_no_request(caplog):
    caplog.set_level(logging.WARNING, "rollout.client")
    with running_service(max_queue=3, start_worker=False) as svc:
        results: dict[int, list] = {}

        def caller(i):
            with svc.client(deadline=60) as client:
                results[i] = client.sample_tree([[i + 1, 2, 3]], 2, 2, **KW)

        first = [threading.Thread(target=caller, args=(i,)) for i in range(3)]
        for t in first:
            t.start()
        while svc.worker.snapshot()["pending_trees"] < 3:
            time.sleep(0.01)
        refused = httpx.post(svc.url + "/sample", json={"prompts": [[1]]})
        assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
        assert "queue full" in refused.json()["detail"]
        rest = [threading.Thread(target=caller, args=(i,)) for i in range(3, 8)]
        for t in rest:
            t.start()
        # the worker starts only once each of the five has been refused at least once
        deadline = time.monotonic() + 60
        while svc.worker.stats.rejected < 6:
            assert time.monotonic() < deadline, f"only {svc.worker.stats.rejected} refusals"
            time.sleep(0.01)
        svc.worker.start()
        for t in first + rest:
            t.join(60)
        stats = svc.wait_idle()
    assert sorted(results) == list(range(8)), "a request was lost"
    for i, trees in results.items():
        assert_same_trees(trees, in_process([[i + 1, 2, 3]], 2, 2, **KW))
    assert stats["rejected"] >= 6 and stats["kv_used_blocks"] == 0
    retried = [r.getMessage() for r in caplog.records if r.name == "rollout.client"]
    assert len(retried) >= 5 and all(f"POST {svc.url}/sample: 503 queue full" in m for m in retried)


def test_a_timed_out_request_fails_and_frees_its_kv(service):
    with service.client() as client, pytest.raises(TimeoutError, match="timeout"):
        client.sample_tree([SYSTEM], 2, 4, segment_len=8, max_new_tokens=150, timeout=0.05)
    stats = service.wait_idle()
    assert stats["timed_out"] >= 1 and stats["kv_used_blocks"] == 0


CALLER = """
import httpx, sys
httpx.post(sys.argv[1] + "/sample", timeout=60, json={
    "prompts": [list(range(100, 140))], "depth": 2, "width": 4, "segment_len": 8,
    "max_new_tokens": 400, "eos_token_id": []})
"""


def test_killing_a_caller_mid_request_leaks_no_kv_blocks(service):
    proc = subprocess.Popen([sys.executable, "-c", CALLER, service.url])
    try:
        deadline = time.monotonic() + 30
        while service.worker.snapshot()["kv_used_blocks"] == 0:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(10)
    stats = service.wait_idle()
    assert stats["cancelled"] >= 1 and stats["kv_used_blocks"] == 0
    with service.client() as client:  # still serving
        assert len(client.sample_tree([[1, 2]], **KW)) == 1


def test_bearer_token_guards_every_endpoint_and_non_loopback_needs_one():
    with running_service(token="s3cret") as svc:
        with svc.client() as anonymous, pytest.raises(PermissionError, match="bearer token"):
            anonymous.health()
        with svc.client(token="s3cret") as client:
            assert client.health()["status"] == "ok"
            assert client.stats()["kv_used_blocks"] == 0
    with pytest.raises(ValueError, match="--token"):
        check_host("0.0.0.0", None)
    check_host("0.0.0.0", "s3cret")
    check_host("127.0.0.1", None)
