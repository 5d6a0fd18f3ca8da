"""The fleet's request router (rollout/fleet/router.py): prefix affinity, balance, baselines."""

from __future__ import annotations

import random

import pytest

from rollout.fleet.router import POLICIES, Router, routing_key


def test_routing_keys_of_every_route():
    assert routing_key("/sample", {"prompts": [[1, 2, 3], [4]]}) == (1, 2, 3)
    assert routing_key("/sample", {"prompts": ["ab"]}) == ("a", "b")
    assert routing_key("/v1/completions", {"prompt": "hi"}) == ("h", "i")
    assert routing_key("/v1/completions", {"prompt": [[5, 6], [7]]}) == (5, 6)
    assert routing_key("/v1/completions", {"prompt": ["xy", "z"]}) == ("x", "y")
    assert routing_key("/inference/v1/generate", {"token_ids": [9, 8]}) == (9, 8)
    assert routing_key("/tokenize", {"prompt": "a"}) == ()
    turn = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]
    one = routing_key("/v1/chat/completions", {"messages": turn})
    two = routing_key(
        "/v1/chat/completions", {"messages": turn + [{"role": "assistant", "content": "4"}]}
    )
    assert two[: len(one)] == one, "the next turn's key extends this turn's"
    parts = [{"role": "user", "content": [{"type": "text", "text": "2+2?"}]}]
    assert "".join(routing_key("/v1/chat/completions", {"messages": parts})).endswith("2+2?\n")


def test_requests_sharing_a_prefix_go_to_its_replica_and_new_prefixes_spread():
    router = Router(3, chunk=4)
    systems = [tuple(range(s * 100, s * 100 + 40)) for s in range(3)]
    loads, homes = [0, 0, 0], {}
    for i in range(30):
        s = i % 3
        key = systems[s] + (1000 + i,)
        r = router.choose(key, loads, [True] * 3)
        router.record(r, key)
        homes.setdefault(s, set()).add(r)
        loads[r] += 1  # still in flight: new prefixes go to the least loaded replica
    assert all(len(h) == 1 for h in homes.values()), homes
    assert len({next(iter(h)) for h in homes.values()}) == 3, "three prefixes, three replicas"


def test_a_conversation_follows_its_replica_turn_after_turn():
    router = Router(4, chunk=8)
    rng = random.Random(0)
    talks = [[rng.randrange(1000) for _ in range(30)] for _ in range(8)]
    home = {}
    for _turn in range(5):
        for c, talk in enumerate(talks):
            r = router.choose(tuple(talk), [0] * 4, [True] * 4)
            router.record(r, tuple(talk))
            assert home.setdefault(c, r) == r
            talk += [rng.randrange(1000) for _ in range(rng.randrange(1, 20))]


def test_an_overloaded_replica_sheds_to_the_idlest():
    router = Router(2, chunk=4, balance_abs=3, balance_rel=1.5)
    key = tuple(range(32))
    router.record(0, key)
    assert router.choose(key, [3, 0], [True, True]) == 0  # within bounds: affinity wins
    assert router.choose(key, [10, 2], [True, True]) == 1  # 8 more and 5x: balance wins
    assert router.choose(key, [10, 8], [True, True]) == 0  # 2 more: affinity again


def test_dead_replicas_are_never_chosen_and_forget_empties_one():
    key = tuple(range(20))
    for policy in POLICIES:
        router = Router(3, policy, chunk=4)
        router.record(1, key)
        picks = {router.choose(key, [0, 0, 0], [True, False, True]) for _ in range(30)}
        assert 1 not in picks and picks <= {0, 2}
        if policy != "prefix":
            assert picks == {0, 2}, f"{policy} should use every live replica"
    router = Router(2, chunk=4)
    router.record(1, key)
    assert router.match(1, key) == 5
    router.forget(1)
    assert router.match(1, key) == 0
    with pytest.raises(RuntimeError, match="no replica is alive"):
        router.choose(key, [0, 0], [False, False])


def test_round_robin_cycles_and_bad_arguments_are_refused():
    router = Router(3, "round-robin")
    assert [router.choose((), [0] * 3, [True] * 3) for _ in range(6)] == [0, 1, 2, 0, 1, 2]
    with pytest.raises(ValueError, match="expected one of"):
        Router(2, "sticky")
    with pytest.raises(ValueError, match="replicas"):
        Router(0)
