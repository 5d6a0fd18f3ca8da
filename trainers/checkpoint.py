"""Checkpoints that resume bit-identically: policy, optimizer, LR scheduler, RNG states, step.

A checkpoint is one file `step_<n>.pt` written to a temporary name and renamed into place, so a
run killed at any moment (even mid-save) leaves only whole checkpoints; `latest` picks the highest
step. Beside them `config.json` holds the config of the run that wrote them, so a run can refuse
to resume another run's checkpoints before it loads anything (`config_changes`: everything but
the step count, logging and where files go must match). Prompts and sampling seeds are pure
functions of (seed, step), so together with the RNG states nothing else is needed to continue
exactly. Under accelerate only the main process writes,
and the unwrapped model's state dict is saved.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

_NAME = re.compile(r"^step_(\d+)\.pt$")
CONFIG_FILE = "config.json"
# config keys a resumed run may change: how long it runs, how it logs, where its files go
RESUMABLE_CHANGES = ("train.steps", "log.", "checkpoint.", "output_dir")


@dataclass(frozen=True)
class Resumed:
    step: int  # optimizer steps done; the next step to run
    extra: dict[str, Any]


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    directory: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `step_<step>.pt` atomically; returns its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng_state(),
        "extra": extra or {},
    }
    final = directory / f"step_{step}.pt"
    tmp = directory / f".step_{step}.pt.tmp{os.getpid()}"
    torch.save(payload, tmp)
    os.replace(tmp, final)
    return final


def latest_checkpoint(directory: str | Path) -> Path | None:
    directory = Path(directory)
    if not directory.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return max(found)[1] if found else None


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
) -> Resumed:
    """Restore everything `save_checkpoint` wrote, RNG states included."""
    payload = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    if scheduler is not None and payload["scheduler"] is not None:
        scheduler.load_state_dict(payload["scheduler"])
    set_rng_state(payload["rng"])
    return Resumed(step=int(payload["step"]), extra=payload["extra"])


def save_config(directory: str | Path, config: dict[str, Any]) -> None:
    """Write the run's config beside its checkpoints (atomically)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{CONFIG_FILE}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(config, indent=1, sort_keys=True))
    os.replace(tmp, directory / CONFIG_FILE)


def saved_config(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / CONFIG_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key: old -> new' for every key that differs, except those a resume may change."""
    old, new = _flat(saved), _flat(json.loads(json.dumps(current)))  # tuples -> lists, as saved
    keys = sorted(set(old) | set(new))
    return [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in keys
        if old.get(k) != new.get(k) and not k.startswith(RESUMABLE_CHANGES)
    ]


def remove_checkpoints(directory: str | Path) -> int:
    """Delete the `step_<n>.pt` files (and the saved config) of `directory`; returns how many."""
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    found = [p for p in directory.iterdir() if _NAME.match(p.name)]
    for p in found:
        p.unlink()
    (directory / CONFIG_FILE).unlink(missing_ok=True)
    return len(found)
