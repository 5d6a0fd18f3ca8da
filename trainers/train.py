"""The run loop: `python -m trainers.train --config configs/<name>.yaml key=value ...`.

Each step runs four named phases: generate (the sampler draws whole trees for this process's share
of the step's prompts), score (one batched reward call), update (the trainer's `step`: advantages,
forward, loss, optimizer step, then `sampler.policy_updated()` so nothing computed under old
weights is reused), and report (metrics, tree diagram, checkpoint). The same command runs under
`accelerate launch` with several processes; gradients are averaged over them.

`kind` picks what the loop trains (`KINDS`): "text" (a causal LM, `rollout.Engine`, `TreeTrainer`,
trainers/text/run.py), "agent" (the same on multi-turn episodes against the task's environment,
trainers/agent/run.py) or "flow" (a flow-matching pipeline, its tree sampler, `FlowTrainer`,
trainers/flow/run.py). The loop itself, checkpoints, logging and configs are shared.

Everything a step draws is derived from (train.seed, step, process), so a run resumed from its last
checkpoint continues bit-identically on the CPU. Before anything loads, the config, the task's
files, the models' availability and the checkpoint directory are checked (trainers/preflight.py).

What a run tells its user: that it resumes (from which step of which directory) or starts fresh
over old checkpoints; that it has nothing to do, when its checkpoint already reached
`train.steps`; every step's metrics in `<output_dir>/metrics.jsonl` (with or without wandb); and a
summary at the end (trainers/run_record.py). Checkpoints go to `<output_dir>/checkpoints` unless
`checkpoint.dir` says otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml

from rollout import score_trees
from trees import Tree

from .agent.run import build_agent_policy
from .checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    remove_checkpoints,
    save_checkpoint,
    save_config,
)
from .config import RunConfig, load_config
from .flow.run import build_flow_policy
from .logging import RunLogger, make_logger
from .policy import Policy, Sampler, Task
from .preflight import check_before_work
from .run_record import MetricsFile, summary
from .text.run import build_text_policy


@dataclass
class RunState:
    """What one run holds between steps."""

    cfg: RunConfig
    accelerator: Any
    model: torch.nn.Module  # the trainable weights, possibly wrapped by accelerate
    sampler: Sampler
    trainer: Any  # TreeTrainer | FlowTrainer
    task: Task
    optimizer: torch.optim.Optimizer
    scheduler: Any
    logger: RunLogger
    metrics_file: MetricsFile | None  # None on non-main processes
    start_step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    cost: float = 0.0  # cumulative policy forwards, in the sampler's unit (tokens or NFE)
    seconds: float = 0.0


def step_seed(seed: int, step: int, process: int) -> int:
    return (seed * 1_000_003 + step * 7919 + process * 104_729) & ((1 << 62) - 1)


def _say(acc: Any, message: str) -> None:
    if acc.is_main_process:
        print(message, file=sys.stderr)


KINDS: dict[str, Callable[[RunConfig], Policy]] = {
    "text": build_text_policy,
    "agent": build_agent_policy,
    "flow": build_flow_policy,
}


def build_run(cfg: RunConfig, use_wandb: bool = True) -> RunState:
    """Policy, optimizer, scheduler, sampler, trainer, logger; resumes from the last checkpoint."""
    from accelerate import Accelerator

    check_before_work(cfg)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    policy = KINDS[cfg.kind](cfg)
    model = policy.model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    warm = cfg.optim.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (warm + 1)))
    start, extra = _resume(cfg, acc, model, opt, sched)
    if policy.wrap_model:
        model, opt, sched = acc.prepare(model, opt, sched)
    else:
        opt, sched = acc.prepare(opt, sched)
    trainer = policy.make_trainer(model, opt, sched, acc)
    logger = make_logger(
        use_wandb and cfg.log.wandb,
        acc.is_main_process,
        cfg.log.project,
        cfg.log.run_name,
        cfg.to_dict(),
        cfg.output_dir,
    )
    metrics_file = MetricsFile(cfg.output_dir, start) if acc.is_main_process else None
    state = RunState(
        cfg, acc, model, policy.sampler, trainer, policy.task, opt, sched, logger, metrics_file,
        start,
    )
    state.cost, state.seconds = float(extra.get("cost", 0.0)), float(extra.get("seconds", 0.0))
    return state


def _resume(cfg: RunConfig, acc: Any, model: Any, opt: Any, sched: Any) -> tuple[int, dict]:
    """(first step to run, saved extras): from the latest checkpoint, or a fresh start."""
    directory = cfg.checkpoint_dir
    last = latest_checkpoint(directory) if directory else None
    if last is None:
        return 0, {}
    if not cfg.checkpoint.resume:
        acc.wait_for_everyone()  # every process has seen the old files before any is removed
        if acc.is_main_process:
            n = remove_checkpoints(directory)
            _say(acc, f"checkpoint.resume=false: starting fresh; removed {n} old checkpoints "
                      f"from {directory}")
        return 0, {}
    resumed = load_checkpoint(last, model, opt, sched)
    _say(acc, f"resuming from step {resumed.step} ({last}); checkpoint.resume=false starts fresh")
    return resumed.step, resumed.extra


def generate(state: RunState, step: int) -> list[Tree]:
    """This process's share of the step's prompts, sampled as whole trees."""
    cfg, acc = state.cfg, state.accelerator
    prompts = state.task.prompts(step, cfg.train.prompts_per_step)
    share = prompts[acc.process_index :: acc.num_processes]
    with torch.no_grad():
        return state.sampler.sample(share, step_seed(cfg.train.seed, step, acc.process_index), step)


def score(state: RunState, trees: list[Tree]) -> list[float]:
    return score_trees(trees, state.task.reward_fn, state.sampler.decode)


def _global_stats(state: RunState, trees: list[Tree], rewards: list[float]) -> dict[str, float]:
    """Reward mean/std, leaves and the sampler's cost counters, summed over processes."""
    r = torch.tensor(rewards, dtype=torch.float64)
    costs = state.sampler.costs(trees)
    local = torch.tensor(
        [
            r.sum().item(),
            (r**2).sum().item(),
            float(r.numel()),
            float(sum(len(t.leaves()) for t in trees)),
            *costs,
        ],
        dtype=torch.float64,
    )
    acc = state.accelerator
    g = acc.reduce(local.to(acc.device), reduction="sum").cpu() if acc.num_processes > 1 else local
    mean = g[0] / g[2]
    return {
        "reward_mean": mean.item(),
        "reward_std": (g[1] / g[2] - mean**2).clamp_min(0).sqrt().item(),
        "leaves": g[3].item(),
        **state.sampler.cost_metrics(g[4:].tolist()),
    }


def run_step(state: RunState, step: int) -> dict[str, float]:
    """generate -> score -> update; returns the step's metrics."""
    t0 = time.perf_counter()
    trees = generate(state, step)
    t1 = time.perf_counter()
    rewards = score(state, trees)
    stats = _global_stats(state, trees, rewards)
    update = state.trainer.step(trees)
    t2 = time.perf_counter()
    updates = state.cfg.train.updates_per_batch
    keys = state.sampler.cost_keys
    step_cost = stats[keys.sample] + update[keys.train] * updates
    state.cost += step_cost
    state.seconds += t2 - t0
    metrics = {
        **stats,
        **update,
        "lr": state.scheduler.get_last_lr()[0],
        "policy_version": float(state.sampler.policy_version),
        "sample_seconds": t1 - t0,
        "step_seconds": t2 - t0,
        keys.rate: step_cost / max(t2 - t0, 1e-9),
        keys.total: state.cost,
        "seconds_total": state.seconds,
    }
    every = state.cfg.log.tree_every
    if every and step % every == 0:
        state.logger.log_tree(trees[0], step)
    return metrics


def _save(state: RunState, step_done: int) -> None:
    acc = state.accelerator
    directory = state.cfg.checkpoint_dir
    if directory and acc.is_main_process:
        save_config(directory, state.cfg.to_dict())
        save_checkpoint(
            directory,
            step_done,
            acc.unwrap_model(state.model),
            state.optimizer,
            state.scheduler,
            {"cost": state.cost, "seconds": state.seconds},
        )
    acc.wait_for_everyone()


def train(
    cfg: RunConfig,
    use_wandb: bool = True,
    until: Callable[[dict[str, float]], bool] | None = None,
) -> RunState:
    """Run (or resume) `cfg` to `train.steps` optimizer-step batches; returns the final state.

    until: called with each step's metrics; True ends the run after that step (checkpointed when
    checkpoints are on), e.g. once a cost budget is spent. A resumed run goes on to `train.steps`
    unless it is given the same `until`."""
    from tqdm.auto import tqdm

    state = build_run(cfg, use_wandb)
    if state.accelerator.is_main_process:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), file=sys.stderr)
    steps = range(state.start_step, cfg.train.steps)
    if not steps:
        _say(state.accelerator, f"nothing to do: the checkpoint in {cfg.checkpoint_dir} is at "
             f"step {state.start_step} and train.steps={cfg.train.steps}; raise train.steps to "
             "train on, or give a new output_dir to start another run")
    bar = tqdm(
        steps,
        disable=not (cfg.log.progress and state.accelerator.is_main_process),
        desc="train",
        dynamic_ncols=True,
    )
    for step in bar:
        metrics = run_step(state, step)
        state.history.append(metrics)
        state.logger.log(metrics, step)
        if state.metrics_file is not None:
            state.metrics_file.log(metrics, step)
        bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", loss=f"{metrics['loss']:.3f}")
        done = step + 1
        stop = until is not None and until(metrics)
        last = done == cfg.train.steps or stop
        if cfg.checkpoint_dir and (done % cfg.checkpoint.every == 0 or last):
            _save(state, done)
        if stop:
            break
    state.logger.finish()
    _report(state)
    return state


def _report(state: RunState) -> None:
    """The end-of-run summary: what was done and where everything went."""
    mf = state.metrics_file
    files = {
        "metrics": str(mf.path) if mf is not None else "",
        "checkpoints": state.cfg.checkpoint_dir,
        "wandb": state.logger.directory,
    }
    cost = state.sampler.cost_keys.total
    _say(state.accelerator, summary(state.history, state.start_step, cost, state.seconds, files))


def parse_args(argv: Sequence[str] | None = None) -> tuple[RunConfig, bool]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML preset, e.g. configs/toy_tree_grpo.yaml")
    parser.add_argument("--no-wandb", action="store_true", help="log to the terminal only")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=10")
    args = parser.parse_args(argv)
    return load_config(args.config, args.overrides), not args.no_wandb


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg, use_wandb = parse_args(argv)
        check_before_work(cfg)
    except ValueError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    train(cfg, use_wandb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
