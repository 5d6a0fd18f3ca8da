"""`kind: agent` runs: presets load, bad configs fail at the door, the run loop trains on agent
trees (the loss over sampled tokens only), its costs count environment calls, and the calculator
tool of the GSM8K agent config evaluates arithmetic and nothing else."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import rollout
from rollout.agent import Turn
from trainers.agent.tools import CalculatorToolEnv, evaluate
from trainers.config import load_config
from trainers.logging import tree_figure
from trainers.train import train

ROOT = Path(__file__).resolve().parents[1]
AGENT_PRESETS = ["toy_agent_grpo", "toy_agent_tree", "toy_agent_arpo",
                 "qwen2.5_1.5b_gsm8k_calc_agent_tree"]

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.mark.parametrize("name", AGENT_PRESETS)
def test_agent_presets_load(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml", ["train.steps=2"])
    assert cfg.kind == "agent" and cfg.agent.turn_stop


@pytest.mark.parametrize(
    "override,match",
    [
        ("agent.max_turns=2", "agent.max_turns=2: use >= rollout.depth=3"),
        ("agent.max_turns=0", "agent.max_turns=0"),
        ("agent.turn_stop=['']", "agent.turn_stop"),
        ("agent.env_timeout=0", "agent.env_timeout"),
        ("agent.max_turn_tokens=0", "agent.max_turn_tokens"),
    ],
)
def test_bad_agent_configs_raise_clear_errors(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(ROOT / "configs" / "toy_agent_tree.yaml", [override])


def test_unknown_agent_task_and_remote_sampling_are_refused(tmp_path):
    from trainers.preflight import check_before_work

    cfg = load_config(ROOT / "configs" / "toy_agent_tree.yaml", ["task.name=toy_sort"])
    with pytest.raises(ValueError, match="not an agent task"):
        check_before_work(cfg)
    cfg = load_config(
        ROOT / "configs" / "toy_agent_tree.yaml",
        ["rollout.server=http://127.0.0.1:1", "checkpoint.dir=", f"output_dir={tmp_path}"],
    )
    with pytest.raises(ValueError, match="environment runs in the trainer's process"):
        train(cfg, use_wandb=False)


@pytest.mark.parametrize("preset", ["toy_agent_tree", "toy_agent_arpo"])
def test_an_agent_run_trains_on_sampled_tokens_and_counts_environment_calls(tmp_path, preset):
    cfg = load_config(
        ROOT / "configs" / f"{preset}.yaml",
        ["train.steps=3", "train.prompts_per_step=4", "checkpoint.dir=", "log.progress=false",
         f"output_dir={tmp_path}", "model.pretrain_steps=40"],
    )
    state = train(cfg, use_wandb=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for row in rows:
        # the loss reads only what the policy sampled: fewer targets than forwarded tokens
        assert row["target_tokens"] == row["sampled_tokens"] < row["train_tokens"]
        assert row["env_calls"] > 0 and row["env_calls_saved"] > 0
        assert 1 <= row["turns_per_episode"] <= cfg.agent.max_turns
    assert state.sampler.policy_version == 3  # one update per step, KV dropped after each


def test_the_tree_picture_shows_turns():
    from trainers.agent.toy_task import CalculatorEnv, build_toy_agent_policy, make_prompts

    model, tok = build_toy_agent_policy(20, seed=0)
    (tree,) = rollout.sample_tree(
        make_prompts(random.Random(0), 1), 2, 2, model=model, tokenizer=tok,
        env=CalculatorEnv(), max_turns=4, turn_stop=["]"], max_turn_tokens=12,
        max_new_tokens=48,
    )
    texts = [t.get_text() for t in tree_figure(tree).axes[0].texts]
    assert any("turn" in t and "env tok" in t for t in texts)


def test_calculator_tool_evaluates_arithmetic_only():
    assert evaluate("2 + 3 * (4 - 1)") == 11
    assert evaluate("1,200 / 4") == 300
    assert evaluate("2 ** 10") == 1024
    for bad in ("__import__('os')", "2 ** 999", "1 / 0", "x + 1", "9" * 300):
        with pytest.raises(ValueError):
            evaluate(bad)


def test_calculator_tool_environment():
    seen = []

    def reward(outputs, prompts):
        seen.append((outputs, prompts))
        return [1.0 if "#### 42" in outputs[0] else 0.0]

    env = CalculatorToolEnv(reward)
    state = env.start("Q")
    obs = env.step(state, Turn((1,), "so <calc>6*7</calc>", 0, "turn_stop"))
    assert obs.text == "<result>42</result>" and not obs.done
    obs = env.step(state, Turn((1,), "<calc>6*</calc>", 1, "turn_stop"))
    assert obs.text.startswith("<result>error") and not obs.done
    final = env.step(state, Turn((1,), " the answer is #### 42", 2, "eos"))
    assert final.done and final.reward == 1.0 and final.info == {"calls": 2}
    # the reward reads the whole episode's text, tool results included
    assert seen[0][0][0].startswith("so <calc>6*7</calc><result>42</result>")
    assert seen[0][1] == ["Q"]


def test_the_episode_return_sums_the_rewards_of_every_turn_on_its_path():
    from trainers.agent.tasks import environment_reward
    from trees import Node, Tree

    root = Node(0, 0, tokens=[1])
    turn = Node(1, 1, parent=root, tokens=[2], logprobs=[0.0], meta={"turn_rewards": [0.25]})
    good = Node(2, 2, parent=turn, tokens=[3], logprobs=[0.0], meta={"turn_rewards": [1.0]})
    silent = Node(3, 2, parent=turn, tokens=[4], logprobs=[0.0])
    root.children, turn.children = [turn], [good, silent]
    other = Node(4, 1, parent=root, tokens=[5], logprobs=[0.0])
    root.children.append(other)
    trajs = Tree(root).trajectories()
    assert environment_reward(trajs, [None] * 3) == [1.25, 0.25, 0.0]
