"""A text run that samples on a rollout service (`rollout.server`) instead of in-process."""

from __future__ import annotations

from pathlib import Path

import pytest

import rollout
from rollout.service.app import create_app
from rollout.service.cli import BackgroundServer
from rollout.service.worker import ServiceWorker
from trainers.config import load_config
from trainers.text.toy_task import build_toy_policy
from trainers.train import train

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def test_a_run_on_a_service_equals_the_same_run_in_process(tmp_path):
    # the service starts from other weights: the run uploads its own before the first sample
    served, tok = build_toy_policy(1, 8)
    engine = rollout.Engine(served, tok, kv_budget=64 << 20)
    worker = ServiceWorker(engine, gather_window=0).start()
    common = ["checkpoint.dir=", "log.progress=false", "log.wandb=false", "train.steps=3"]
    try:
        with BackgroundServer(create_app(worker)) as srv:
            remote_cfg = load_config(
                f"{ROOT}/configs/toy_tree_grpo.yaml",
                [*common, f"output_dir={tmp_path / 'remote'}", f"rollout.server={srv.url}"],
            )
            remote = train(remote_cfg, use_wandb=False)
            version = rollout.Client(srv.url).policy_version
    finally:
        worker.close()
    local_cfg = load_config(
        f"{ROOT}/configs/toy_tree_grpo.yaml", [*common, f"output_dir={tmp_path / 'local'}"]
    )
    local = train(local_cfg, use_wandb=False)
    for got, want in zip(remote.history, local.history, strict=True):
        for key in ("reward_mean", "loss", "sample_tokens_forwarded"):
            assert got[key] == pytest.approx(want[key], abs=1e-6), key
    updates = local.sampler.engine.policy_version
    assert version == updates + 1, "one upload at the start, then one per optimizer step"


def test_a_bad_server_url_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="rollout.server"):
        load_config(
            f"{ROOT}/configs/toy_grpo.yaml",
            [f"output_dir={tmp_path}", "rollout.server=localhost:8000"],
        )
