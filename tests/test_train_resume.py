"""What a run tells its user: resume or refuse, nothing-to-do, metrics.jsonl, the summary, and
configs that would fail after loading fail before it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainers import preflight
from trainers import train as train_mod
from trainers.checkpoint import latest_checkpoint
from trainers.config import load_config
from trainers.run_record import read_metrics
from trainers.text import run as text_run

ROOT = Path(__file__).resolve().parents[1]
FAST = ["model.pretrain_steps=5", "train.prompts_per_step=2", "log.progress=false",
        "log.tree_every=0", "checkpoint.every=1"]


def run(out: Path, *extra: str) -> int:
    return train_mod.main(["--config", f"{ROOT}/configs/toy_tree_grpo.yaml", "--no-wandb",
                           f"output_dir={out}", *FAST, *extra])


def test_checkpoints_follow_output_dir_and_a_rerun_resumes_and_says_so(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(out, "train.steps=2") == 0
    first = capsys.readouterr().err
    assert latest_checkpoint(out / "checkpoints").name == "step_2.pt"
    assert "resuming" not in first
    assert "done: steps 0 -> 2" in first and str(out / "metrics.jsonl") in first
    assert run(out, "train.steps=3") == 0
    again = capsys.readouterr().err
    assert f"resuming from step 2 ({out / 'checkpoints' / 'step_2.pt'})" in again
    assert "done: steps 2 -> 3" in again
    assert [m["step"] for m in read_metrics(out)] == [0, 1, 2]


def test_a_finished_run_says_it_has_nothing_to_do(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(out, "train.steps=1") == 0
    capsys.readouterr()
    assert run(out, "train.steps=1") == 0
    err = capsys.readouterr().err
    assert "nothing to do" in err and "train.steps=1" in err and "no steps run" in err


def test_resuming_a_different_config_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert run(out, "train.steps=1") == 0
    capsys.readouterr()

    def boom(cfg):
        raise AssertionError("nothing may load before the checkpoint check")

    monkeypatch.setattr(text_run, "load_policy", boom)
    assert run(out, "train.steps=20", "loss.estimator=treerl") == 2
    err = capsys.readouterr().err
    assert "different config" in err and "loss.estimator: 'sibling' -> 'treerl'" in err
    assert "output_dir" in err and "checkpoint.resume=false" in err


def test_resume_false_starts_fresh_and_replaces_old_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(out, "train.steps=3") == 0
    capsys.readouterr()
    assert run(out, "train.steps=1", "loss.estimator=treerl", "checkpoint.resume=false") == 0
    err = capsys.readouterr().err
    assert "starting fresh; removed 3 old checkpoints" in err
    assert latest_checkpoint(out / "checkpoints").name == "step_1.pt"
    assert [m["step"] for m in read_metrics(out)] == [0]


def test_metrics_jsonl_holds_every_step_as_logged(tmp_path):
    cfg = load_config(f"{ROOT}/configs/toy_tree_grpo.yaml",
                      [f"output_dir={tmp_path}", "train.steps=2", "checkpoint.dir=", *FAST])
    state = train_mod.train(cfg, use_wandb=False)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1]
    for row, logged in zip(rows, state.history, strict=True):
        assert row == {"step": row["step"], **json.loads(json.dumps(logged))}
    assert not (tmp_path / "checkpoints").exists()  # checkpoint.dir= turns them off


def gsm8k_args(out: Path, *extra: str) -> list[str]:
    return ["--config", f"{ROOT}/configs/qwen2.5_0.5b_gsm8k_tree.yaml", "--no-wandb",
            f"output_dir={out}", *extra]


def test_missing_data_file_fails_before_the_model_loads(tmp_path, monkeypatch, capsys):
    def boom(cfg):
        raise AssertionError("the model must not load when the data file is missing")

    monkeypatch.setattr(text_run, "load_policy", boom)
    assert train_mod.main(gsm8k_args(tmp_path, f"task.data_path={tmp_path}/none.jsonl")) == 2
    assert "task.data_path=" in capsys.readouterr().err


def test_an_uncached_model_offline_fails_at_once_and_says_how_to_get_it(
    tmp_path, monkeypatch, capsys
):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(text_run, "load_policy", lambda cfg: pytest.fail("loaded"))
    monkeypatch.setattr(preflight, "_hub_unreachable", lambda name: pytest.fail("asked the hub"))
    code = train_mod.main(gsm8k_args(tmp_path, f"task.data_path={data}",
                                     "model.name=nobody/not-a-cached-model"))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "not in the Hugging Face cache" in err and "huggingface-cli download" in err
