"""What benchmarks/agents.py reports per server: throughput (best and median of the repeats),
latency, and prefill tokens per turn against the new-token goal line; as a table and a plot.

Prefill per turn comes from the server's counters between turns (lockstep), else from each
response's `cached_tokens` (prefill = prompt - cached), else it is unknown (None) and only the
whole pass's total is shown. Throughput counts completion tokens over the pass's wall time.
"""

from __future__ import annotations

import statistics
import textwrap
from pathlib import Path

from agents_workload import RunResult, Workload, new_tokens_per_turn


def _pick(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def prefill_per_turn(run: RunResult, turns: int) -> list[int] | None:
    """Per turn, summed over conversations; None when the server gave no way to split it."""
    if run.turn_work:
        return [w.prefill_tokens for w in run.turn_work]
    if run.records and all(r.cached_tokens is not None for r in run.records):
        out = [0] * turns
        for r in run.records:
            out[r.turn] += len(r.prompt) - r.cached_tokens
        return out
    return None


def summarize(name: str, runs: list[RunResult], w: Workload, info: dict) -> dict:
    """One server's row: best/median tokens/s, latency over every run, the best run's turns."""
    rates = [sum(len(r.answer) for r in run.records) / run.wall_s for run in runs]
    best = runs[rates.index(max(rates))]
    lat = sorted(r.latency_s for run in runs for r in run.records)
    prompt = [0] * w.turns
    for r in best.records:
        prompt[r.turn] += len(r.prompt)
    total = best.total_work
    return {
        "server": name,
        **info,
        "tokens_per_s_best": max(rates),
        "tokens_per_s_median": statistics.median(rates),
        "wall_s": [run.wall_s for run in runs],
        "generated_tokens": sum(len(r.answer) for r in best.records),
        "requests": len(best.records),
        "latency_p50_s": _pick(lat, 0.5),
        "latency_p99_s": _pick(lat, 0.99),
        "prefill_per_turn": prefill_per_turn(best, w.turns),
        "new_per_turn": new_tokens_per_turn(best.records, w.turns),
        "prompt_per_turn": prompt,
        "prefill_total": total.prefill_tokens if total else None,
        "prompt_total": total.prompt_tokens if total else None,
        "cached_tokens_reported": all(r.cached_tokens is not None for r in best.records),
    }


def ratios(rows: dict[str, dict]) -> dict[str, float | None]:
    """Throughput of ours with the cache over each other server (best and median)."""
    ours = rows.get("ours-cache")
    out: dict[str, float | None] = {}
    for other in ("ours-no-cache", "vllm"):
        for stat in ("best", "median"):
            key = f"ours-cache/{other} tokens_per_s_{stat}"
            theirs = rows.get(other)
            out[key] = (
                ours[f"tokens_per_s_{stat}"] / theirs[f"tokens_per_s_{stat}"]
                if ours and theirs
                else None
            )
    return out


def _per_request(per_turn: list[int] | None, w: Workload, later: bool) -> str:
    """Mean per request of turn 0 (later=False) or of turns 1.. (later=True)."""
    if per_turn is None or (later and w.turns < 2):
        return "-"
    part = per_turn[1:] if later else per_turn[:1]
    return f"{sum(part) / (len(part) * w.clients):.1f}"


def print_table(title: str, rows: dict[str, dict], w: Workload) -> None:
    print(f"\n{title}")
    print(
        f"{'server':<15}{'tok/s best':>11}{'median':>8}{'p50 s':>7}{'p99 s':>7} |"
        f"{'prefill all':>12}{'turn 0':>8}{'turns 1..':>10} |{'new 1..':>8} |{'prompt 1..':>11}"
    )
    for name, r in rows.items():
        total = r["prefill_total"]
        every = f"{total / r['requests']:.1f}" if total is not None else "-"
        print(
            f"{name:<15}{r['tokens_per_s_best']:>11.1f}{r['tokens_per_s_median']:>8.1f}"
            f"{r['latency_p50_s']:>7.2f}{r['latency_p99_s']:>7.2f} |{every:>12}"
            f"{_per_request(r['prefill_per_turn'], w, False):>8}"
            f"{_per_request(r['prefill_per_turn'], w, True):>10} |"
            f"{_per_request(r['new_per_turn'], w, True):>8} |"
            f"{_per_request(r['prompt_per_turn'], w, True):>11}"
        )
    print(
        "tokens per request: prefill = prompt tokens computed (all turns, turn 0, turns 1..); "
        "new = the goal (tokens no earlier request forwarded); prompt = the whole prompt"
    )
    print("\nprefill tokens per turn (summed over conversations)")
    names = list(rows)
    print(f"{'turn':>5}{'new':>8}{'prompt':>8}" + "".join(f"{n:>15}" for n in names))
    first = next(iter(rows.values()))
    for t in range(w.turns):
        cells = "".join(
            f"{r['prefill_per_turn'][t] if r['prefill_per_turn'] else '-':>15}"
            for r in rows.values()
        )
        print(f"{t:>5}{first['new_per_turn'][t]:>8}{first['prompt_per_turn'][t]:>8}{cells}")


def plot(rows: dict[str, dict], w: Workload, path: Path, title: str) -> bool:
    """Prefill tokens per turn for each server, the new-token goal and the whole prompt."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("NOTE: matplotlib is not installed: no plot")
        return False
    turns = list(range(w.turns))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    first = next(iter(rows.values()))
    ax.plot(turns, first["prompt_per_turn"], ":", color="grey", label="whole prompt")
    for name, r in rows.items():
        if r["prefill_per_turn"] is not None:
            ax.plot(turns, r["prefill_per_turn"], "o-", markersize=7, label=name)
    # NOTE: drawn last and on top: ours with the cache lies on it
    new = first["new_per_turn"]
    ax.plot(turns, new, "--", color="black", linewidth=1.5, zorder=5, label="new tokens (goal)")
    ax.set_xlabel("turn")
    ax.set_ylabel(f"prefill tokens computed (sum over {w.clients} conversations)")
    ax.set_xticks(turns)
    ax.set_title(textwrap.fill(title, 90), fontsize=8)
    ax.set_ylim(bottom=0)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
