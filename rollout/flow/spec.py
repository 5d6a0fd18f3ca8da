"""The validated shape of a flow-matching tree: which steps are SDE steps, where levels fork.

A schedule of `num_steps` Euler steps; inside the SDE window `[start, end)` the steps are split
into `depth` contiguous levels (earlier levels take the remainder steps), each level with its own
noise level (0 is a plain Euler level). At the first step of level k every live node forks
`widths[k]` children; with every level at noise 0 they would all be the same image, so a width > 1
is refused there. The window is fixed (`(start, end)`) or a `SlidingWindow` that moves per call
(seeded) or per training step (a sweep, as MixGRPO moves its window). All checks happen here, at
the door, with errors that name the argument, the value and the fix.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from .sde import SDE_STEPS


def default_noise_levels(depth: int) -> tuple[float, ...]:
    """Noise per level, decreasing with depth: 1.0, 0.7, 0.49, ... (explore early, refine late)."""
    return tuple(round(0.7**k, 6) for k in range(depth))


def default_window(num_steps: int, depth: int) -> tuple[int, int]:
    """The first half of the schedule (at least one step per level)."""
    return 0, min(num_steps, max(depth, num_steps // 2))


@dataclass(frozen=True)
class SlidingWindow:
    """An SDE window of `size` steps whose start moves over `first..last` (inclusive).

    `last=None` means `num_steps - size`. Without a training step the start is drawn from the
    call's seed; with `train_step` it sweeps `first, first + stride, ...` and wraps around.
    """

    size: int
    first: int = 0
    last: int | None = None
    stride: int = 1

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"SlidingWindow.size={self.size}: use at least 1 step")
        if self.first < 0:
            raise ValueError(f"SlidingWindow.first={self.first}: use a start step >= 0")
        if self.last is not None and self.last < self.first:
            raise ValueError(f"SlidingWindow.last={self.last} < first={self.first}: swap them")
        if self.stride < 1:
            raise ValueError(f"SlidingWindow.stride={self.stride}: use a stride >= 1")

    def resolve(self, num_steps: int, *, seed: int, train_step: int | None) -> tuple[int, int]:
        """The `(start, end)` for this call."""
        last = num_steps - self.size if self.last is None else self.last
        if last + self.size > num_steps or last < self.first:
            raise ValueError(
                f"sde_window={self} does not fit num_inference_steps={num_steps}: "
                f"need first <= last and last + size <= {num_steps}"
            )
        span = last - self.first + 1
        if train_step is None:
            start = self.first + random.Random(seed).randrange(span)
        else:
            start = self.first + (train_step * self.stride) % span
        return start, start + self.size


@dataclass(frozen=True)
class FlowTreeSpec:
    """A resolved tree shape: every field checked, the window fixed for this call."""

    depth: int
    widths: tuple[int, ...]
    num_steps: int
    window: tuple[int, int]
    noise_levels: tuple[float, ...]
    guidance_scale: float
    sde: str = "flow_grpo"

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise ValueError(f"depth={self.depth}: a flow tree needs depth >= 1")
        if len(self.widths) != self.depth or any(w < 1 for w in self.widths):
            raise ValueError(f"width={list(self.widths)}: give one int >= 1 or one per level "
                             f"({self.depth} levels)")
        if self.num_steps < 1:
            raise ValueError(f"num_inference_steps={self.num_steps}: use at least 1 step")
        start, end = self.window
        if not (0 <= start < end <= self.num_steps) or end - start < self.depth:
            raise ValueError(
                f"sde_window={self.window}: need 0 <= start < end <= num_inference_steps="
                f"{self.num_steps} and at least one step per level (end - start >= depth="
                f"{self.depth})"
            )
        if len(self.noise_levels) != self.depth:
            raise ValueError(f"noise_levels={list(self.noise_levels)}: give one level per depth "
                             f"({self.depth}), e.g. {list(default_noise_levels(self.depth))}")
        if any(not math.isfinite(a) or a < 0 for a in self.noise_levels):
            raise ValueError(f"noise_levels={list(self.noise_levels)}: use finite values >= 0")
        if all(a == 0.0 for a in self.noise_levels) and any(w > 1 for w in self.widths):
            raise ValueError(
                f"noise_levels={list(self.noise_levels)}: every level is noise-free, so the "
                f"width={list(self.widths)} children would be identical copies that still pay the "
                f"tree's NFE; use a positive noise level, e.g. "
                f"{list(default_noise_levels(self.depth))}, or width=1 for one plain ODE sample"
            )
        if not math.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise ValueError(f"guidance_scale={self.guidance_scale}: use a finite value >= 0 "
                             "(<= 1 turns classifier-free guidance off)")
        if self.sde not in SDE_STEPS:
            raise ValueError(f"sde={self.sde!r}: use one of {sorted(SDE_STEPS)}")

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    @property
    def level_starts(self) -> tuple[int, ...]:
        """The step index at which each level begins (every node forks there)."""
        start, end = self.window
        base, extra = divmod(end - start, self.depth)
        starts, pos = [], start
        for k in range(self.depth):
            starts.append(pos)
            pos += base + (1 if k < extra else 0)
        return tuple(starts)

    def level_of(self, step: int) -> int | None:
        """The 0-based level that step `step` belongs to, None outside the SDE window."""
        start, end = self.window
        if not start <= step < end:
            return None
        return max(k for k, s in enumerate(self.level_starts) if s <= step)

    def nodes_at(self, step: int) -> int:
        """Live latents of one tree at step `step` (the product of the widths forked so far)."""
        return math.prod(w for w, s in zip(self.widths, self.level_starts, strict=True)
                         if s <= step)

    def nfe_per_tree(self) -> int:
        """Analytic transformer evaluations per latent for one tree (shared steps once per node)."""
        return sum(self.nodes_at(i) for i in range(self.num_steps))

    @property
    def num_leaves(self) -> int:
        return math.prod(self.widths)


def build_spec(
    depth: int,
    width: int | Sequence[int],
    num_steps: int,
    sde_window: tuple[int, int] | SlidingWindow | None,
    noise_levels: Sequence[float] | None,
    guidance_scale: float,
    *,
    sde: str = "flow_grpo",
    seed: int = 0,
    train_step: int | None = None,
) -> FlowTreeSpec:
    """Resolve defaults and the sliding window, then validate (raises ValueError)."""
    if isinstance(width, bool) or not isinstance(width, (int, Sequence)):
        raise ValueError(f"width={width!r}: give an int or a list of ints, one per level")
    widths = (width,) * depth if isinstance(width, int) else tuple(int(w) for w in width)
    if isinstance(sde_window, SlidingWindow):
        window = sde_window.resolve(num_steps, seed=seed, train_step=train_step)
    elif sde_window is None:
        window = default_window(num_steps, depth)
    elif isinstance(sde_window, Sequence) and len(sde_window) == 2:
        window = (int(sde_window[0]), int(sde_window[1]))
    else:
        raise ValueError(f"sde_window={sde_window!r}: give (start, end), a SlidingWindow or None")
    levels = (default_noise_levels(depth) if noise_levels is None
              else tuple(float(a) for a in noise_levels))
    return FlowTreeSpec(depth, widths, num_steps, window, levels, float(guidance_scale), sde)
