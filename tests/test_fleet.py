"""A fleet of two tiny-Llama replicas on a local Ray instance (rollout/fleet/), seen through its
front as one server: the same trees as one engine, prefix routing, the OpenAI routes, one policy
version across a weight update under load, and no request lost when a replica is killed.

Every test that compares trees pushes the weights it compares against first, so the tests do
not depend on each other's order; the one exception is the bad-spec test, which runs first so
that the module's fleet does not hold the Ray instance's two CPUs yet.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import ray
import torch
from openai_fixtures import NAME
from service_fixtures import running_service
from test_service import assert_same_trees

import rollout
from rollout.fleet import start_fleet
from rollout.fleet.weights import Shipment, WeightLog, pack, unpack
from rollout.service.cli import free_port, main
from rollout.tiny import tiny_model, tiny_tokenizer

KW = dict(segment_len=3, max_new_tokens=8, seed=11)
SYSTEM = "You are a careful assistant. Answer in one short line, no more. "  # 64 characters
# a killed actor fails its ping at once; a long ping timeout only keeps a replica that is slow on a
# busy machine from counting as lost
FLEET = dict(
    kv_budget="8M", block_size=4, served_model_name=NAME, health_interval=0.5, ping_timeout=120.0
)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def fleet(local_ray):
    with start_fleet("tiny:llama", 2, threads=1, **FLEET) as f:
        yield f


def use_weights(client: rollout.Client, seed: int) -> rollout.Engine:
    """Push tiny_model("llama", seed) to the fleet; the in-process engine the fleet must match."""
    model = tiny_model("llama", seed=seed)
    client.update_weights(model.state_dict())
    return rollout.Engine(model, tiny_tokenizer())


def wait_healthy(client: rollout.Client, timeout: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout
    while (health := client.health())["status"] != "ok":
        assert time.monotonic() < deadline, health
        time.sleep(0.2)
    return health


def per_replica(stats: dict, field: str = "requests") -> list[int]:
    return [r[field] for r in stats["replicas"]]


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.float8_e4m3fn]
)
def test_weights_travel_as_numpy_views_of_their_bits(dtype):
    state = {"w": torch.randn(3, 5).to(dtype), "scalar": torch.tensor(2.5).to(dtype)}
    back = unpack(pack(state))
    for name, tensor in state.items():
        assert back[name].dtype == dtype and back[name].shape == tensor.shape
        bits = [t.reshape(-1).view(torch.uint8) for t in (back[name], tensor)]
        assert torch.equal(*bits)


def test_the_weight_log_keeps_the_shipments_a_restart_must_replay():
    log = WeightLog()
    assert log.version == 0 and log.shipments == []

    def shipment(names: str, version: int) -> Shipment:
        return Shipment(None, frozenset(names), 0, version)

    for names, version, kept in [
        ("ab", 1, [1]),
        ("a", 2, [1, 2]),  # b still comes from update 1
        ("b", 3, [2, 3]),  # now nothing of update 1 is current
        ("ab", 4, [4]),
    ]:
        log.add(shipment(names, version))
        assert [s.version for s in log.shipments] == kept and log.version == version


def test_a_bad_model_spec_fails_to_start_naming_the_replica(local_ray):
    with pytest.raises(ValueError, match=r"^--dtype int8: expected one of"):
        start_fleet("tiny:llama", 2, dtype="int8")  # refused before any replica starts
    message = r"^replica [01] of 2 failed to start: --model tiny:gpt9: expected tiny:<family>"
    with pytest.raises(ValueError, match=message):
        start_fleet("tiny:gpt9", 2)
    deadline = time.monotonic() + 120  # what it started is gone: its CPUs are free again
    while ray.available_resources().get("CPU", 0) < 2:
        assert time.monotonic() < deadline, ray.available_resources()
        time.sleep(0.1)


def test_the_fleet_samples_the_trees_one_engine_samples(fleet):
    prompts = ["What is 2+2?", "Say hi."]
    with rollout.Client(fleet.url) as client:
        local = use_weights(client, seed=0)
        remote = client.sample_tree(prompts, 2, 2, **KW)
        version = client.health()["policy_version"]
        ids = [[5, 6, 7, 8], [9, 10]]
        assert_same_trees(client.sample_tree(ids, 1, 3, **KW), local.sample_tree(ids, 1, 3, **KW))
    assert_same_trees(remote, local.sample_tree(prompts, 2, 2, **KW))
    assert [t.policy_version for t in remote] == [version, version]


def test_replicas_run_at_the_drivers_priority(fleet):
    # Ray nices its workers; a niced replica starves behind any busy process on its node
    # (fleet.REPLICA_ENV): they run at the priority of the process that started the fleet
    members = fleet.replicas.members
    nice = ray.get([m.actor.__ray_call__.remote(lambda _: os.nice(0)) for m in members])
    assert nice == [os.nice(0)] * len(members)


def test_requests_sharing_a_system_prompt_land_on_one_replica(fleet):
    with rollout.Client(fleet.url) as client:
        before = client.stats()
        for i in range(4):
            client.sample_tree([SYSTEM + f"Question {i}?"], 1, 2, **KW)
        after = client.stats()
    delta = [b - a for a, b in zip(per_replica(before), per_replica(after), strict=True)]
    assert sorted(delta) == [0, 4], delta
    assert after["requests"] - before["requests"] == 4
    assert after["cache_tokens_reused"] > before["cache_tokens_reused"], "the prefix was reused"
    home = delta.index(4)
    replica_stats = after["replicas"][home]["stats"]
    assert replica_stats["cache_tokens_reused"] <= after["cache_tokens_reused"]  # totals add up


def test_the_openai_routes_work_through_the_front(fleet):
    with rollout.Client(fleet.url) as client:
        use_weights(client, seed=1)
    with (
        running_service(seed=1, tokenizer=tiny_tokenizer(), served_model_name=NAME) as single,
        openai.OpenAI(base_url=fleet.url + "/v1", api_key="unused", max_retries=0) as front,
        openai.OpenAI(base_url=single.url + "/v1", api_key="unused", max_retries=0) as one,
    ):
        assert [m.id for m in front.models.list().data] == [NAME]
        asked = dict(model=NAME, prompt="Q: 2 + 2 = ?\nA:", n=2, max_tokens=8, seed=3)
        got, want = front.completions.create(**asked), one.completions.create(**asked)
        assert len(got.choices) == 2
        assert [c.text for c in got.choices] == [c.text for c in want.choices]
        assert got.usage == want.usage
        chat = dict(model=NAME, messages=[{"role": "user", "content": "2 + 2 = ?"}], max_tokens=8)
        chunks = list(front.chat.completions.create(**chat, seed=5, stream=True))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        whole = one.chat.completions.create(**chat, seed=5).choices[0].message.content
        assert streamed == whole and chunks[-1].choices[0].finish_reason is not None


def test_a_weight_update_under_load_keeps_one_version_per_request(fleet):
    with rollout.Client(fleet.url) as client:
        use_weights(client, seed=0)
        old = client.health()["policy_version"]
    stop, answers = threading.Event(), []

    def load(caller: int) -> None:
        with rollout.Client(fleet.url) as c:
            i = 0
            while not stop.is_set():
                sent = time.monotonic()
                trees = c.sample_tree(
                    [f"caller {caller} asks {i}", "and a second prompt"], 2, 2, **KW
                )
                answers.append((sent, time.monotonic(), [t.policy_version for t in trees]))
                i += 1

    threads = [threading.Thread(target=load, args=(c,)) for c in range(3)]
    for t in threads:
        t.start()
    def wait_for(condition) -> None:  # by answers, not by time: a busy machine is slow
        deadline = time.monotonic() + 300
        while not condition():
            assert time.monotonic() < deadline, "the load stopped"
            time.sleep(0.05)

    try:
        wait_for(lambda: answers)
        new_model = tiny_model("llama", seed=2)
        with rollout.Client(fleet.url) as client:
            began = time.monotonic()
            new = client.update_weights(new_model.state_dict())
            done = time.monotonic()
        wait_for(lambda: any(s > done for s, _, _ in answers))
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert new == old + 1
    assert any(s < began for s, _, _ in answers) and any(s > done for s, _, _ in answers)
    for sent, returned, versions in answers:
        assert len(set(versions)) == 1, versions  # a request's trees share one version
        assert versions[0] in (old, new)
        if sent > done:
            assert versions[0] == new, "a request routed after the update has the new version"
        if returned < began:
            assert versions[0] == old
    with rollout.Client(fleet.url) as client:
        stats = client.stats()
        assert stats["policy_version"] == new and stats["last_update"]["bytes"] > 0
        assert all(r["stats"]["policy_version"] == new for r in stats["replicas"])
        local = rollout.Engine(new_model, tiny_tokenizer())
        assert_same_trees(
            client.sample_tree(["Say hi."], 2, 2, **KW), local.sample_tree(["Say hi."], 2, 2, **KW)
        )


def test_a_killed_replica_loses_no_request_and_comes_back(fleet):
    with rollout.Client(fleet.url) as client:
        local = use_weights(client, seed=3)
        version = client.health()["policy_version"]
        before = client.stats()
    prompts = [f"request number {i} of the kill test" for i in range(16)]
    slow = dict(KW, max_new_tokens=24, segment_len=12)

    def ask(prompt: str) -> list:
        with rollout.Client(fleet.url) as c:
            return c.sample_tree([prompt], 2, 2, **slow)

    victim = fleet.replicas.members[0]
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(ask, p) for p in prompts]
        deadline = time.monotonic() + 300
        while victim.in_flight == 0:  # kill it while it holds requests
            assert time.monotonic() < deadline, "no request reached replica 0"
            time.sleep(0.005)
        ray.kill(fleet.actors[0])
        answers = [f.result(timeout=600) for f in futures]
    assert len(answers) == len(prompts)  # each call answered once, none lost
    for prompt, trees in zip(prompts, answers, strict=True):
        assert_same_trees(trees, local.sample_tree([prompt], 2, 2, **slow))
        assert trees[0].policy_version == version
    with rollout.Client(fleet.url) as client:
        health = wait_healthy(client)
        after = client.stats()
        assert after["requests"] - before["requests"] == len(prompts), "no request answered twice"
        assert after["retried"] > before["retried"] and after["restarts"] == before["restarts"] + 1
        assert [r["policy_version"] for r in health["replicas"]] == [version, version]
        # the restarted replica has the fleet's weights: a new prefix goes to it (idle, index 0)
        served = per_replica(client.stats())
        trees = client.sample_tree(["a prefix nobody sent before"], 2, 2, **KW)
        assert per_replica(client.stats())[0] == served[0] + 1
    assert_same_trees(trees, local.sample_tree(["a prefix nobody sent before"], 2, 2, **KW))
    assert trees[0].policy_version == version


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--routing", "random"], "--routing is a fleet flag: pass --replicas N"),
        (["--threads-per-replica", "2"], "--threads-per-replica is a fleet flag"),
        (["--replicas", "0"], "--replicas 0: expected an int >= 1"),
        (["--replicas", "2", "--threads-per-replica", "0"], "--threads-per-replica 0: expected"),
        (["--replicas", "2", "--host", "0.0.0.0"], "--host 0.0.0.0 exposes the policy"),
    ],
)
def test_fleet_flag_mistakes_are_one_line_and_exit_2(args, needle, capsys, monkeypatch):
    monkeypatch.delenv("ROLLOUT_TOKEN", raising=False)
    with pytest.raises(SystemExit) as exit_:
        main(["--model", "tiny:llama", "--port", str(free_port()), *args])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and line.startswith(f"python -m rollout.serve: error: {needle}")
