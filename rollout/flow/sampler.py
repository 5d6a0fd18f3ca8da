"""The batched flow-matching tree sampler (Dynamic-TreeRPO's sliding-window SDE tree).

All trees of a call advance in lockstep over the scheduler's steps. At every step the live latents
of all prompts form one batch [N, ...] and go through the transformer once (doubled to [2N, ...]
under classifier-free guidance). Outside the SDE window a step is the scheduler's Euler step;
inside it, the step of the node's level is the SDE step with that level's noise, and its
log-probability is recorded. At each level's first step every live node forks `width` children,
which start from their parent's latents, so the prompt encoding, the steps before the window and
each node's steps before it forks run once.

Randomness is keyed by the tree path (`trees.branch_key`): the root key seeds the initial noise and
each node's key seeds its own noise generator, so a node's samples do not depend on batching.

NOTE: every tensor a node keeps (its steps' latents, a leaf's latents and image, the root's prompt
embeddings) owns just its own rows, copied out of the batch when recorded: a view would keep the
whole batch alive and `torch.save` of one tree would write every other prompt's rows too. A step's
x is the x' its node (or, at a fork, its parent) recorded one step earlier, so it is shared, not
copied again.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from trees import Node, Tree, TreeStats, branch_key

from .pipeline import FlowPipeline, PromptEmbeds, as_flow_pipeline, guided_velocity
from .sde import SDE_STEPS, euler_step, gaussian_logprob, sde_sample
from .spec import FlowTreeSpec, SlidingWindow, build_spec
from .steps import FlowStep


class _Schedule(NamedTuple):
    """The scheduler's tables, on the device and as Python floats (read without a sync)."""

    sigmas: Tensor  # [T + 1] fp32, ending at 0
    timesteps: Tensor  # [T], the transformer's timestep input
    sigma_values: list[float]
    timestep_values: list[float]
    sigma_max: float  # the second sigma: the Flow-GRPO std's denominator at s = 1


@dataclass
class _Frontier:
    """The live nodes of all trees, row-aligned with the batch of latents."""

    nodes: list[Node]
    prompt_index: list[int]  # [N] each row's prompt (host copy of `rows`)
    rows: Tensor  # [N] long, on the device
    latents: Tensor  # [N, ...] fp32
    generators: list[torch.Generator]
    roots: list[Node]  # per prompt: its tree's root (holds the prompt's embeddings)
    next_id: list[int] = field(default_factory=list)  # per prompt: its tree's next node id


def sample_flow_tree(
    prompts: Sequence[str],
    depth: int,
    width: int | Sequence[int],
    pipeline: Any,
    *,
    num_inference_steps: int = 10,
    sde_window: tuple[int, int] | SlidingWindow | None = None,
    noise_levels: Sequence[float] | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    latents: Tensor | None = None,
    sde: str = "flow_grpo",
    train_step: int | None = None,
    image_size: tuple[int, int] | None = None,
    progress: bool | None = None,
) -> list[Tree]:
    """Sample one tree per prompt with a diffusers flow-matching pipeline.

    `pipeline`: a `StableDiffusion3Pipeline`, `load_digits_pipeline()`, or any `FlowPipeline`.
    `sde_window`: `(start, end)` step indices, a `SlidingWindow` (moved by `seed`, or swept by
    `train_step`), or None for the first half of the schedule. `noise_levels`: one per level
    (default 1.0, 0.7, 0.49, ...). `guidance_scale`: None uses the pipeline's default; <= 1 turns
    classifier-free guidance off. `latents` [P, ...]: initial noise per prompt (else seeded).

    Leaves carry `meta["latents"]` (final, fp32) and `meta["image"]` ([C, H, W] in [0, 1]); nodes
    carry their `FlowStep`s in `steps` and the step log-probs in `logprobs` (a level with noise 0
    takes Euler steps and records none; its `width` children stay identical copies of their parent
    until a later, noisy level tells them apart, and each still pays its NFE). A tree with every
    level at noise 0 and a width > 1 is refused: all its leaves would be one image. `stats.nfe`
    counts the tree's transformer evaluations per latent (guidance doubles rows, not NFE);
    `forward_passes` and `seconds` are for the whole call, which batches all trees.
    `progress`: a bar over the denoising steps; None shows it when stderr is a terminal.
    """
    prompts = _check_prompts(prompts)
    pipe = as_flow_pipeline(pipeline, image_size)
    scale = pipe.default_guidance_scale if guidance_scale is None else guidance_scale
    spec = build_spec(depth, width, num_inference_steps, sde_window, noise_levels, scale,
                      sde=sde, seed=seed, train_step=train_step)
    start = time.perf_counter()
    with torch.no_grad():
        show = sys.stderr.isatty() if progress is None else progress
        trees, nfe = _run(pipe, prompts, spec, seed, latents, show)
    seconds = time.perf_counter() - start
    for tree, count in zip(trees, nfe, strict=True):
        tree.stats = TreeStats(nfe=count, forward_passes=spec.num_steps, seconds=seconds)
    return trees


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts) or not prompts:
        raise ValueError(f"prompts={prompts!r}: give a non-empty list of strings")
    return list(prompts)


def _run(
    pipe: FlowPipeline,
    prompts: list[str],
    spec: FlowTreeSpec,
    seed: int,
    latents: Tensor | None,
    show: bool = False,
) -> tuple[list[Tree], list[int]]:
    # 1. Shared work, once per call: the schedule and the prompt encoding.
    schedule = _schedule(pipe, spec.num_steps)
    cond, uncond = pipe.encode_prompts(prompts, spec.do_cfg)
    trees, frontier = _roots(pipe, prompts, seed, latents, cond, uncond)
    nfe = [0] * len(prompts)
    fork_width = dict(zip(spec.level_starts, spec.widths, strict=True))
    # 2. The denoising loop: fork, one batched forward, step every row.
    for i in tqdm(range(spec.num_steps), desc="flow steps", disable=not show, leave=False):
        level = spec.level_of(i)
        if i in fork_width:
            frontier = _fork(frontier, fork_width[i], spec.noise_levels[level], i)
        rows = frontier.rows
        velocity = guided_velocity(
            pipe, frontier.latents, schedule.timesteps[i].expand(rows.shape[0]),
            cond.select(rows), uncond.select(rows) if uncond is not None else None,
            spec.guidance_scale)
        for p in frontier.prompt_index:
            nfe[p] += 1
        if level is None or spec.noise_levels[level] == 0.0:
            frontier.latents = euler_step(frontier.latents, velocity, schedule.sigmas[i],
                                          schedule.sigmas[i + 1])
        else:
            _sde_step(frontier, velocity, spec, level, i, schedule)
    # 3. Leaves: decode and close.
    _finish(pipe, frontier)
    return trees, nfe


def _schedule(pipe: FlowPipeline, num_steps: int) -> _Schedule:
    pipe.set_timesteps(num_steps)
    sigmas = pipe.scheduler.sigmas.to(device=pipe.device, dtype=torch.float32)
    timesteps = pipe.scheduler.timesteps.to(pipe.device)
    values = sigmas.tolist()
    return _Schedule(sigmas, timesteps, values, timesteps.float().tolist(),
                     values[1] if len(values) > 2 else 0.0)


def _roots(
    pipe: FlowPipeline, prompts: list[str], seed: int, latents: Tensor | None,
    cond: PromptEmbeds, uncond: PromptEmbeds | None,
) -> tuple[list[Tree], _Frontier]:
    shape = pipe.latent_shape()
    if latents is not None and tuple(latents.shape) != (len(prompts), *shape):
        raise ValueError(f"latents.shape={tuple(latents.shape)}: expected "
                         f"{(len(prompts), *shape)} (one initial latent per prompt)")
    trees, gens, init = [], [], []
    for p, prompt in enumerate(prompts):
        root = Node(id=0, depth=0, key=branch_key(seed, p), finish_reason="branch")
        gen = torch.Generator().manual_seed(root.key)
        x = (torch.randn(shape, generator=gen) if latents is None
             else latents[p].detach().to("cpu", torch.float32, copy=True))
        root.meta.update(prompt_index=p, latents=x, cond=_row(cond, p),
                         uncond=_row(uncond, p) if uncond is not None else None)
        trees.append(Tree(root=root, prompt=prompt))
        gens.append(gen)
        init.append(x)
    frontier = _Frontier(
        nodes=[t.root for t in trees], prompt_index=list(range(len(prompts))),
        rows=torch.arange(len(prompts), device=pipe.device),
        latents=torch.stack(init).to(device=pipe.device, dtype=torch.float32), generators=gens,
        roots=[t.root for t in trees], next_id=[1] * len(prompts))
    return trees, frontier


def _row(embeds: PromptEmbeds, p: int) -> PromptEmbeds:
    """Prompt `p`'s embeddings as tensors of their own (not views of the [P, ...] batch)."""
    return PromptEmbeds({k: v[p : p + 1].clone() for k, v in embeds.tensors.items()})


def _fork(frontier: _Frontier, width: int, noise_level: float, step: int) -> _Frontier:
    """Every live node gets `width` children that start from its latents: [N] -> [N * width]."""
    nodes, gens, prompt_index = [], [], []
    for parent, p in zip(frontier.nodes, frontier.prompt_index, strict=True):
        parent.finish_reason = "branch"
        for j in range(width):
            child = Node(id=frontier.next_id[p], depth=parent.depth + 1,
                         key=branch_key(parent.key, j), parent=parent)
            child.meta.update(start_step=step, noise_level=noise_level)
            frontier.next_id[p] += 1
            parent.children.append(child)
            nodes.append(child)
            prompt_index.append(p)
            gens.append(torch.Generator().manual_seed(child.key))
    return _Frontier(
        nodes=nodes, prompt_index=prompt_index, rows=frontier.rows.repeat_interleave(width),
        latents=frontier.latents.repeat_interleave(width, dim=0), generators=gens,
        roots=frontier.roots, next_id=frontier.next_id)


def _sde_step(
    frontier: _Frontier, velocity: Tensor, spec: FlowTreeSpec, level: int, i: int,
    schedule: _Schedule,
) -> None:
    """One SDE step of every row at this level's noise; record x, x', log p per node."""
    x = frontier.latents
    a = spec.noise_levels[level]
    gaussian = SDE_STEPS[spec.sde](x, velocity, schedule.sigmas[i], schedule.sigmas[i + 1], a,
                                   schedule.sigma_max)
    # NOTE: noise is drawn per node from its own generator (on the CPU), so it depends only on
    # the node's path, not on which rows share this batch.
    eps = torch.stack([torch.randn(x.shape[1:], generator=g) for g in frontier.generators])
    x_next = sde_sample(gaussian, eps.to(x.device))
    logprobs = gaussian_logprob(x_next, gaussian).tolist()  # [N], the step's one host sync
    for r, (node, p) in enumerate(zip(frontier.nodes, frontier.prompt_index, strict=True)):
        root = frontier.roots[p]
        node.steps.append(FlowStep(
            index=i, timestep=schedule.timestep_values[i], sigma=schedule.sigma_values[i],
            sigma_next=schedule.sigma_values[i + 1], sigma_max=schedule.sigma_max,
            noise_level=a, sde=spec.sde, guidance_scale=spec.guidance_scale,
            latents=_recorded_latents(node, i, x[r]), next_latents=x_next[r].clone(),
            logprob=logprobs[r], cond=root.meta["cond"],
            uncond=root.meta["uncond"]))
        node.logprobs.append(logprobs[r])
    frontier.latents = x_next


def _recorded_latents(node: Node, i: int, row: Tensor) -> Tensor:
    """Step `i`'s x for `node` as a tensor of its own: the x' that the node, or its parent at a
    fork, recorded at step `i - 1` (the same values), else a copy of `row` out of the batch."""
    steps = node.steps or (node.parent.steps if node.parent is not None else [])
    if steps and steps[-1].index == i - 1:
        return steps[-1].next_latents
    return row.clone()


def _finish(pipe: FlowPipeline, frontier: _Frontier, chunk: int = 16) -> None:
    """Decode the leaves' final latents in chunks; store latents and images on the leaves."""
    x = frontier.latents
    images = torch.cat([pipe.decode(x[k : k + chunk]) for k in range(0, x.shape[0], chunk)])
    for r, leaf in enumerate(frontier.nodes):
        leaf.finish_reason = "length"
        leaf.meta.update(latents=x[r].to("cpu", copy=True),
                         image=images[r].to("cpu", copy=True))
