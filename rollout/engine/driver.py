"""Driving a run (a cascade `TreeRun` or a `NativeRun`) to the end in one call (`sample_tree`),
with a progress bar.

Long-lived callers (the service's worker) step a run themselves; a one-shot call adds its trees
and hands the run here: step until nothing is left, release everything the run holds whatever
happens (a failed step also empties the prefix cache: its writes may be torn), and stamp each
tree with the call's wall time.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from trees import Tree

from .scheduler import Job


class Run(Protocol):
    """What the driver reads of a run: text_engine.TreeRun and native_run.NativeRun."""

    jobs: list[Job]
    live: list[Any]
    waiting: list[Any]
    tokens_forwarded: int

    def add(self, jobs: Sequence[Job]) -> None: ...
    def step(self) -> bool: ...
    def abort(self) -> None: ...
    def close(self) -> None: ...


def run_to_end(run: Run, progress: bool | None = None) -> list[Tree]:
    """Run every added tree to the end; trees come back in the order they were added.

    progress: a bar of tokens forwarded (with their rate, trees done and live branches) that
    moves every step, so a call of one long tree shows progress too; None shows it when stderr
    is a terminal."""
    # NOTE: a cascade run's pool peak is reset by `Engine.open_run`, which made the run
    start = time.perf_counter()
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(unit="tok", desc="sample_tree", disable=not show, leave=False)
    try:
        with torch.inference_mode():
            while run.step():
                if show:
                    bar.update(run.tokens_forwarded - bar.n)
                    done = sum(1 for j in run.jobs if j.meta.get("done"))
                    bar.set_postfix_str(
                        f"trees {done}/{len(run.jobs)}, {len(run.live)} branches, "
                        f"{len(run.waiting)} waiting",
                        refresh=False,
                    )
    except BaseException:
        run.abort()
        raise
    finally:
        bar.close()
        run.close()
    seconds = time.perf_counter() - start
    for job in run.jobs:
        job.tree.stats.seconds = seconds
    return [job.tree for job in run.jobs]
