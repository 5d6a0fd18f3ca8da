"""wandb offline with no key, the null logger, and the tree diagram."""

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
