"""Tree advantage estimators against values computed by hand on small trees."""

from __future__ import annotations

import math

import pytest
from train_helpers import build_tree, spec_node

from trees.advantages import (
    ESTIMATORS,
    AdvantageOptions,
    assign_advantages,
    compute_advantages,
)

OPTS = AdvantageOptions(eps=1e-12)
S3 = math.sqrt(3.0)


def tree_a():
    """root -> a[5,6] -> (a1 r=1, a2 r=0); root -> b[7] -> (b1 r=1, b2 r=1). ids: a=1 a1=2
    a2=3 b=4 b1=5 b2=6."""
    return build_tree(
        [1, 2, 3],
        spec_node([5, 6], spec_node([8], reward=1.0), spec_node([9, 9], reward=0.0)),
        spec_node([7], spec_node([8, 8, 8], reward=1.0), spec_node([9], reward=1.0)),
    )


def tree_b():
    """Unbalanced: c[3] is a leaf (r=2, stopped early); d[4] -> d1 r=0, d2 r=1, d3 r=2.
    ids: c=1 d=2 d1=3 d2=4 d3=5."""
    return build_tree(
        [1],
        spec_node([3], reward=2.0),
        spec_node(
            [4], spec_node([5], reward=0.0), spec_node([6], reward=1.0), spec_node([7], reward=2.0)
        ),
    )


def check(got: dict[int, float], want: dict[int, float]) -> None:
    assert set(got) == set(want)
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-6), (k, got, want)


def test_leaf_grpo_tree_a():
    # rewards [1, 0, 1, 1]: mean 0.75, population std sqrt(0.1875) = 0.25 * sqrt(3)
    hi, lo = 1 / S3, -3 / S3
    (got,) = compute_advantages([tree_a()], "grpo", OPTS)
    check(got, {2: hi, 3: lo, 5: hi, 6: hi, 1: (hi + lo) / 2, 4: hi})


def test_leaf_grpo_depth_one_is_flat_grpo():
    rewards = [0.0, 1.0, 0.5, 0.25]
    tree = build_tree([4, 4], *[spec_node([i], reward=r) for i, r in enumerate(rewards)])
    (got,) = compute_advantages([tree], "grpo", OPTS)
    mean = sum(rewards) / 4
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / 4)
    check(got, {i + 1: (r - mean) / std for i, r in enumerate(rewards)})


def test_sibling_relative_tree_a_and_b():
    a, b = compute_advantages([tree_a(), tree_b()], "sibling", OPTS)
    # V(a)=0.5, V(b)=1 -> -1, +1; a1/a2 (1, 0) -> +1, -1; b1/b2 equal -> 0
    check(a, {1: -1.0, 4: 1.0, 2: 1.0, 3: -1.0, 5: 0.0, 6: 0.0})
    # V(c)=2, V(d)=mean(0,1,2)=1 -> +1, -1; d's children (0,1,2): std sqrt(2/3)
    s = math.sqrt(2 / 3)
    check(b, {1: 1.0, 2: -1.0, 3: -1 / s, 4: 0.0, 5: 1 / s})


def test_sibling_width_one_is_zero():
    tree = build_tree([1], spec_node([2], spec_node([3], reward=1.0)))
    (got,) = compute_advantages([tree], "sibling", OPTS)
    check(got, {1: 0.0, 2: 0.0})


def test_treerl_tree_a():
    # leave-one-out centred leaves: 1 - 2/3 = 1/3, 0 - 1 = -1, 1/3, 1/3; V(root) = 0
    # V(a) = -1/3, V(b) = 1/3; R = (G + L) / sqrt(|leaves|)
    raw = {
        1: (-1 / 3 - 1 / 3) / math.sqrt(2),
        4: (1 / 3 + 1 / 3) / math.sqrt(2),
        2: 1 / 3 + (1 / 3 + 1 / 3),
        3: -1 + (-1 + 1 / 3),
        5: 1 / 3 + 0.0,
        6: 1 / 3 + 0.0,
    }
    tokens = {1: 2, 4: 1, 2: 1, 3: 2, 5: 3, 6: 1}  # whitened over tokens
    total = sum(tokens.values())
    mean = sum(raw[k] * tokens[k] for k in raw) / total
    std = math.sqrt(sum(tokens[k] * (raw[k] - mean) ** 2 for k in raw) / total)
    (got,) = compute_advantages([tree_a()], "treerl", OPTS)
    check(got, {k: (v - mean) / std for k, v in raw.items()})


def test_treepo_tree_a():
    # a1: (1-.75 + 1-.5)/2 = .375; a2: (-.75 - .5)/2 = -.625; b1, b2: (.25 + 0)/2 = .125
    # mean 0, std .375 -> 1, -5/3, 1/3, 1/3; inner nodes average their leaves
    (got,) = compute_advantages([tree_a()], "treepo", OPTS)
    check(got, {2: 1.0, 3: -5 / 3, 5: 1 / 3, 6: 1 / 3, 1: -1 / 3, 4: 1 / 3})


def test_depth_normalized_tree_a_and_b():
    a, b = compute_advantages([tree_a(), tree_b()], "depth", OPTS)
    hi, lo = 1 / S3, -3 / S3
    check(a, {1: -1.0, 4: 1.0, 2: hi, 3: lo, 5: hi, 6: hi})
    # depth 1: c (2), d (1) -> +1, -1; depth 2: d1..d3 (0, 1, 2)
    s = math.sqrt(2 / 3)
    check(b, {1: 1.0, 2: -1.0, 3: -1 / s, 4: 0.0, 5: 1 / s})


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_assign_and_pure(name):
    tree = tree_b()
    advs = compute_advantages([tree], name, OPTS)
    assert all(n.advantage is None for n in tree.nodes()), "estimators must not mutate"
    assign_advantages([tree], advs)
    assert tree.root.advantage is None
    assert all(n.advantage == advs[0][n.id] for n in tree.nodes() if n is not tree.root)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="estimator='nope'"):
        compute_advantages([tree_a()], "nope")
    unscored = build_tree([1], spec_node([2]))
    with pytest.raises(ValueError, match="no reward"):
        compute_advantages([unscored], "grpo")
    with pytest.raises(ValueError, match="eps"):
        AdvantageOptions(eps=0.0)
