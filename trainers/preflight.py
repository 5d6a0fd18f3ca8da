"""Everything a run checks before it loads anything: the task, its local files, the models, resume.

A GPU user should learn about a missing data file or an unreachable hub in a second, not after a
1 GB download or 30 s of hub retries. So, in order and before any weights load:
1. the task exists for the run's kind, its options are valid and its local files exist;
2. each model it names (the policy, a reward model) is a local folder, a built-in name, in the
   Hugging Face cache, or reachable on the hub; offline and not cached is an error that says how
   to get the model;
3. the checkpoint directory either holds nothing, or a run of this same config (see
   trainers/checkpoint.py `config_changes`), or resume is off.
Each failure is a `ValueError` naming the key, the value and the fix (the CLI prints it as one
line and exits 2).
"""

from __future__ import annotations

import os
from pathlib import Path

from .agent.tasks import check_agent_task
from .checkpoint import config_changes, latest_checkpoint, saved_config
from .config import RunConfig
from .flow.run import check_flow_config
from .text.tasks import TASKS, check_text_task

BUILT_IN = ("toy", "digits")  # models the project builds or ships (nothing downloaded)


def check_before_work(cfg: RunConfig) -> None:
    """Raise ValueError for anything that would fail after loading (see the module doc)."""
    if cfg.kind == "flow":
        check_flow_config(cfg)
    elif cfg.kind == "agent":
        check_agent_task(cfg)
    elif cfg.task.name not in TASKS:
        raise ValueError(f"task.name={cfg.task.name!r} is unknown; choose one of {sorted(TASKS)}")
    else:
        check_text_task(cfg)
    if cfg.model.name not in BUILT_IN:
        check_model_available("model.name", cfg.model.name)
    if cfg.kind == "flow" and cfg.task.reward_model:
        check_model_available("task.reward_model", cfg.task.reward_model)
    check_resume(cfg)


def _offline() -> bool:
    from huggingface_hub import constants

    flags = (os.environ.get("TRANSFORMERS_OFFLINE", ""), os.environ.get("HF_HUB_OFFLINE", ""))
    return bool(constants.HF_HUB_OFFLINE) or any(f.upper() in ("1", "ON", "YES", "TRUE")
                                                 for f in flags)


def _cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    for filename in ("config.json", "model_index.json"):  # a transformers model, a pipeline
        try:
            found = try_to_load_from_cache(repo_id, filename)
        except ValueError:  # not a valid repo id
            return False
        if isinstance(found, str):
            return True
    return False


def _hub_unreachable(repo_id: str) -> str | None:
    """Why the hub cannot be reached (a few seconds at most), or None when it answered."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        HfApi().model_info(repo_id, timeout=5)
    except HfHubHTTPError:  # it answered (not found, gated, ...): from_pretrained says why
        return None
    except Exception as exc:  # DNS, refused, timeout: no network
        return f"{type(exc).__name__}: {exc}"
    return None


def check_model_available(key: str, name: str) -> None:
    """A local folder, a cached hub id, or a hub id the hub can serve now."""
    if Path(name).expanduser().is_dir():
        return
    if name.startswith((".", "/", "~")):
        raise ValueError(f"{key}={name!r}: no such local model directory")
    if _cached(name):
        return
    why = "offline (HF_HUB_OFFLINE is set)" if _offline() else _hub_unreachable(name)
    if why is not None:
        raise ValueError(
            f"{key}={name!r} is not in the Hugging Face cache and the hub cannot be reached "
            f"({why}). Download it where there is a network (`huggingface-cli download {name}`) "
            "and copy the cache (~/.cache/huggingface) here, or give a local model folder"
        )


def check_resume(cfg: RunConfig) -> None:
    """A resumable checkpoint must come from this run's config (all but the step count)."""
    directory = cfg.checkpoint_dir
    if not directory or not cfg.checkpoint.resume or latest_checkpoint(directory) is None:
        return
    saved = saved_config(directory)
    if saved is None:
        return  # written before configs were saved beside checkpoints: nothing to compare
    changes = config_changes(saved, cfg.to_dict())
    if changes:
        shown = "; ".join(changes[:5]) + (f"; and {len(changes) - 5} more" if changes[5:] else "")
        raise ValueError(
            f"checkpoint.dir={str(directory)!r} holds a run with a different config ({shown}). "
            "Resuming it would mix two runs: give this run its own output_dir=..., or set "
            "checkpoint.resume=false to start fresh and replace those checkpoints"
        )
