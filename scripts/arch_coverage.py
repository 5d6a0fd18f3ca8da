"""Walk every causal-LM family transformers knows and print how the tree engine does on each.

    .venv/bin/python scripts/arch_coverage.py [model_type ...]

Each family is built tiny and a small tree is held against the model's own forward
(rollout/engine/arch_probe.py); outcomes: exact, refused, WRONG, error, not buildable. The path
column says where a sampled tree ran: the cascade engine, or the native path (the model's own
cache, copied at each fork) for families the cascade engine refuses.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter

import torch

from rollout.engine.arch_probe import FAMILIES, OUTCOMES, probe_family


def main(families: list[str]) -> int:
    # NOTE: one thread: these models are so small that intra-op threads only spin (100x slower
    # on a busy 2-core machine)
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    counts: Counter[str] = Counter()
    start = time.perf_counter()
    for name in families:
        result = probe_family(name)
        counts[result.outcome] += 1
        if result.outcome == "exact":
            counts[f"exact ({result.path})"] += 1
        line = f"{name:28s} {result.outcome:14s} {result.path:8s} {result.detail[:160]}"
        print(line, flush=True)
    print(f"\n{len(families)} families in {time.perf_counter() - start:.1f} s")
    print("  ".join(f"{o}: {counts[o]}" for o in OUTCOMES))
    print("  ".join(f"exact ({p}): {counts[f'exact ({p})']}" for p in ("cascade", "native")))
    return 1 if counts["WRONG"] or counts["error"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or list(FAMILIES)))
