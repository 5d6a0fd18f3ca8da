"""Bad configs fail at the door; shipped presets load; the real-model path works on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from trainers import train as train_mod
from trainers.config import load_config
from trainers.text import run as text_run
from trainers.text.tasks import Gsm8kReward, final_number
from trainers.text.toy_task import exact_sort_reward, sort_reward

PRESETS = ["toy_grpo", "toy_tree_grpo", "qwen2.5_0.5b_gsm8k_grpo", "qwen2.5_0.5b_gsm8k_tree"]


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load(name):
    cfg = load_config(f"configs/{name}.yaml", ["train.steps=3"])
    assert cfg.train.steps == 3 and cfg.model.name


@pytest.mark.parametrize(
    "override,match",
    [
        ("train.stepz=3", "unknown config key 'train.stepz'"),
        ("nosection.x=1", "unknown config key 'nosection'"),
        ("train.steps=abc", "train.steps='abc': expected int"),
        ("rollout.width=[2, 'x']", "rollout.width"),
        ("loss.estimator=magic", "choose one of"),
        ("model.name=", "missing model"),
        ("model.name=./no/such/dir", "no such local model directory"),
        ("rollout.temperature=0", "rollout.temperature=0"),
        ("train.steps", "expected key=value"),
        ("rollout.branch_entropy=1.0", "depth=1: a depth-1 tree has no inner node"),
        ("rollout.min_segment_len=2", "set branch_entropy"),
    ],
)
def test_bad_configs_raise_clear_errors(override, match):
    with pytest.raises(ValueError, match=match):
        load_config("configs/toy_grpo.yaml", [override])


def test_cli_rejects_bad_config_before_loading_a_model(monkeypatch, capsys):
    def boom(cfg):
        raise AssertionError("the model must not be loaded for a bad config")

    monkeypatch.setattr(text_run, "load_policy", boom)
    code = train_mod.main(["--config", "configs/toy_grpo.yaml", "--no-wandb", "optim.lr=fast"])
    assert code == 2
    assert "optim.lr='fast': expected float" in capsys.readouterr().err
    assert train_mod.main(["--config", "configs/toy_grpo.yaml", "task.name=chess"]) == 2
    assert train_mod.main(["--config", "configs/toy_grpo.yaml", "task.reward=nice"]) == 2
    assert "task.reward='nice': toy_sort rewards are ['exact', 'positions']" in (
        capsys.readouterr().err
    )


def test_gsm8k_reward():
    assert final_number("so 3 + 4 = 7\n#### 1,234.") == "1234"
    assert final_number("the answer is 42") == "42"
    reward = Gsm8kReward({"q1": "42", "q2": "7"})
    assert reward(["#### 42", "it is 8", "no number"], ["q1", "q2", "q1"]) == [1.0, 0.0, 0.0]


def test_toy_sort_rewards():
    prompts = ["3141>", "3141>", "3141>", "3141>"]
    outputs = ["1134", "1143", "113", "11345"]
    assert sort_reward(outputs, prompts) == [1.0, 0.5, 0.75, 0.8]
    assert exact_sort_reward(outputs, prompts) == [1.0, 0.0, 0.0, 0.0]


def save_tiny_hf_model(path):
    """A tiny Llama and a word-level fast tokenizer saved like a hub checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>", "####", *"0123456789", "what", "is", "+", "?", "\n"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(words),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        eos_token_id=1,
        pad_token_id=0,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    fast.save_pretrained(path)


def test_real_model_path_runs_from_pretrained(tmp_path):
    model_dir = tmp_path / "tiny-model"
    save_tiny_hf_model(model_dir)
    data = tmp_path / "train.jsonl"
    rows = [{"question": f"what is {a} + {a} ?", "answer": f"#### {2 * a}"} for a in range(1, 5)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = load_config(
        "configs/qwen2.5_0.5b_gsm8k_tree.yaml",
        [
            f"model.name={model_dir}",
            f"task.data_path={data}",
            "model.dtype=float32",
            "train.steps=1",
            "train.prompts_per_step=2",
            "rollout.segment_len=2",
            "rollout.max_new_tokens=6",
            "checkpoint.dir=",
            f"output_dir={tmp_path}",
            "log.progress=false",
        ],
    )
    state = train_mod.train(cfg, use_wandb=False)
    (metrics,) = state.history
    assert metrics["policy_version"] == 1.0 and 0.0 <= metrics["reward_mean"] <= 1.0
