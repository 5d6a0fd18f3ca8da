"""wandb offline with no key, the null logger, the tree diagram, and the fork metrics."""

from __future__ import annotations

from train_helpers import build_tree, spec_node

from trainers.logging import NullLogger, make_logger, tree_figure
from trees.advantages import assign_advantages, compute_advantages


def scored_tree():
    tree = build_tree(
        [1],
        spec_node([2, 3], spec_node([4], reward=1.0), spec_node([5], reward=0.0)),
        spec_node([6], reward=0.5),
        logprobs=True,
    )
    assign_advantages([tree], compute_advantages([tree], "sibling"))
    return tree


def test_tree_figure_labels_reward_and_advantage():
    fig = tree_figure(scored_tree())
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert len(texts) == 5 and texts[0] == "prompt\nr=0.50"
    assert any("r=1.00" in t and "A=+1.00" in t for t in texts)


def test_wandb_offline_without_a_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "")  # empty counts as unset; restored afterwards
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = make_logger(True, True, "tree-rollouts-test", "t", {"a": 1}, str(tmp_path))
    logger.log({"reward_mean": 0.5}, step=0)
    logger.log_tree(scored_tree(), step=0)
    logger.finish()
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    assert isinstance(make_logger(True, False, "p", "n", {}, str(tmp_path)), NullLogger)
    assert isinstance(make_logger(False, True, "p", "n", {}, str(tmp_path)), NullLogger)


def test_text_sampler_reports_where_trees_forked():
    from trainers.config import RolloutConfig
    from trainers.text.samplers import TextSampler

    leaf = spec_node([9], reward=0.0)
    tree = build_tree(
        [1, 2],
        spec_node([3, 4, 5, 6], spec_node([7, 8, 9], leaf, leaf), leaf),  # 4 = cap, 3 = cap
        spec_node([3, 4], spec_node([5], leaf, leaf)),  # forked early at 2 and at 1
        spec_node([3], reward=1.0),  # stopped at EOS: a leaf, not a fork
    )
    rollout = RolloutConfig(depth=3, width=[3, 2, 2], segment_len=[4, 3], max_new_tokens=12,
                            branch_entropy=0.5)
    sampler = TextSampler(engine=None, tokenizer=None, rollout=rollout)
    counts = sampler.costs([tree, tree])
    assert counts[2:] == [8.0, 4.0, 2 * (4 + 3 + 2 + 1)]
    metrics = sampler.cost_metrics(counts)
    assert metrics["fork_early_frac"] == 0.5
    assert metrics["inner_segment_len"] == 2.5
    flat = build_tree([1], spec_node([2], reward=1.0), spec_node([3], reward=0.0))
    assert "fork_early_frac" not in sampler.cost_metrics(sampler.costs([flat]))
