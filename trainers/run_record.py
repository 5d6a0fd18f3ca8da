"""The run's own record on disk: `<output_dir>/metrics.jsonl`, one line per step, and a summary.

Written by every run, with or without wandb, so `--no-wandb` still leaves something to plot and
compare: each line is `{"step": s, <metric>: value, ...}` as the step logged it. A resumed run
first drops the lines of steps it will run again (a run killed after step 7 but checkpointed at
step 5 logged 6 and 7 twice otherwise), then appends. Only the main process writes.

`summary` is what the run prints at its end: steps run, reward first -> last, cost, seconds, and
where its files went.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


class MetricsFile:
    """Appends one JSON line per step to `<directory>/metrics.jsonl`."""

    def __init__(self, directory: str | Path, start_step: int) -> None:
        self.path = Path(directory) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [line for line in self._lines() if json.loads(line)["step"] < start_step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def _lines(self) -> list[str]:
        if not self.path.is_file():
            return []
        return [line for line in self.path.read_text().splitlines() if line.strip()]

    def log(self, metrics: dict[str, float], step: int) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def _plain(value: Any) -> Any:
    """JSON has no NaN or inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(directory: str | Path) -> list[dict[str, Any]]:
    """Every step's metrics from `<directory>/metrics.jsonl`, in order."""
    path = Path(directory) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summary(
    history: list[dict[str, float]],
    start_step: int,
    cost_key: str,
    seconds: float,
    files: dict[str, str],
) -> str:
    """A few lines on what the run did and where it wrote things."""
    lines = []
    if history:
        first, last = history[0], history[-1]
        end = start_step + len(history)
        lines.append(
            f"done: steps {start_step} -> {end}, reward {first['reward_mean']:.3f} -> "
            f"{last['reward_mean']:.3f}, {cost_key} {last.get(cost_key, 0.0):,.0f}, "
            f"{seconds:.1f} s"
        )
    else:
        lines.append(f"done: no steps run (the run was already at step {start_step})")
    lines += [f"  {what}: {where}" for what, where in files.items() if where]
    return "\n".join(lines)
