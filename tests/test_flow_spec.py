"""Tree shapes, sliding windows, the analytic NFE count, and errors at the door."""

from __future__ import annotations

import pytest
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from flow_cases import digits_pipe

from rollout.flow import FlowTreeSpec, SlidingWindow, as_flow_pipeline, build_spec, sample_flow_tree
from rollout.flow.digits import prompt_to_class


def test_levels_split_the_window_earliest_first():
    spec = build_spec(3, 2, 12, (2, 9), None, 1.0)
    assert spec.level_starts == (2, 5, 7)  # 7 steps: 3 + 2 + 2
    assert [spec.level_of(i) for i in range(12)] == [None, None, 0, 0, 0, 1, 1, 2, 2, None,
                                                     None, None]
    assert spec.noise_levels == pytest.approx((1.0, 0.7, 0.49))


def test_analytic_nfe_by_hand():
    # 10 steps, window (1, 5), widths [3, 2]: 1 step of 1 node, 2 of 3, 7 of 6.
    spec = build_spec(2, [3, 2], 10, (1, 5), [0.5, 0.5], 1.0)
    assert spec.nfe_per_tree() == 1 + 2 * 3 + 7 * 6
    assert spec.num_leaves == 6


def test_sliding_window_per_call_and_per_train_step():
    window = SlidingWindow(size=3, first=1, last=5, stride=2)
    starts = {window.resolve(10, seed=s, train_step=None)[0] for s in range(40)}
    assert starts <= set(range(1, 6)) and len(starts) > 2
    assert [window.resolve(10, seed=0, train_step=k) for k in range(4)] == [
        (1, 4), (3, 6), (5, 8), (2, 5)]
    spec = build_spec(2, 2, 10, SlidingWindow(size=4), None, 1.0, seed=3)
    assert spec.window[1] - spec.window[0] == 4 and 0 <= spec.window[0] <= 6


@pytest.mark.parametrize("kwargs,match", [
    (dict(sde_window=(4, 2)), "sde_window"),
    (dict(sde_window=(0, 11)), "sde_window"),
    (dict(sde_window=(0, 2), depth=3), "at least one step per level"),
    (dict(sde_window=5), "sde_window"),
    (dict(noise_levels=[1.0]), "noise_levels"),
    (dict(noise_levels=[1.0, -0.1]), "noise_levels"),
    (dict(noise_levels=[0.0, 0.0]), r"noise_levels=\[0.0, 0.0\]: every level is noise-free"),
    (dict(noise_levels=[0, 0], width=[1, 2]), "use a positive noise level"),
    (dict(width=[2, 2, 2]), "width"),
    (dict(width=0), "width"),
    (dict(depth=0), "depth"),
    (dict(sde="ddpm"), "sde"),
])
def test_bad_shapes_raise_clear_errors(kwargs, match):
    args = dict(depth=2, width=2, num_steps=10, sde_window=(0, 4), noise_levels=None,
                guidance_scale=1.0)
    args.update(kwargs)
    sde = args.pop("sde", "flow_grpo")
    with pytest.raises(ValueError, match=match):
        build_spec(args.pop("depth"), args.pop("width"), args.pop("num_steps"),
                   args.pop("sde_window"), args.pop("noise_levels"), args.pop("guidance_scale"),
                   sde=sde)


def test_noise_free_trees_are_refused_unless_width_one():
    with pytest.raises(ValueError, match=r"noise_levels=\[0.0\]: every level.*or width=1"):
        sample_flow_tree(["a handwritten 3"], 1, 4, digits_pipe(), noise_levels=[0.0])
    assert build_spec(2, 1, 10, (0, 4), [0.0, 0.0], 1.0).num_leaves == 1  # one plain ODE sample
    assert build_spec(2, 2, 10, (0, 4), [0.0, 0.5], 1.0).num_leaves == 4  # one noisy level


def test_sliding_window_that_does_not_fit():
    with pytest.raises(ValueError, match="does not fit"):
        build_spec(2, 2, 6, SlidingWindow(size=4, first=4), None, 1.0)
    with pytest.raises(ValueError, match="size"):
        SlidingWindow(size=0)


def test_non_flow_scheduler_is_rejected():
    pipe = digits_pipe()
    original = pipe.scheduler
    try:
        pipe.scheduler = DDIMScheduler()
        with pytest.raises(TypeError, match="FlowMatchEulerDiscreteScheduler"):
            sample_flow_tree(["a handwritten 1"], 1, 2, pipe, num_inference_steps=4)
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)
        with pytest.raises(ValueError, match="stochastic_sampling"):
            as_flow_pipeline(pipe)
    finally:
        pipe.scheduler = original


def test_bad_pipeline_prompts_and_latents():
    with pytest.raises(TypeError, match="pipeline="):
        sample_flow_tree(["a handwritten 1"], 1, 2, object())
    with pytest.raises(ValueError, match="prompts="):
        sample_flow_tree("a handwritten 1", 1, 2, digits_pipe())
    with pytest.raises(ValueError, match="latents.shape"):
        import torch

        sample_flow_tree(["a handwritten 1"], 1, 2, digits_pipe(), latents=torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match="exactly one digit"):
        prompt_to_class("a handwritten 3 or 4")
    assert prompt_to_class("Seven, please") == 7 and prompt_to_class("") == 10


def test_spec_is_frozen():
    spec = build_spec(1, 2, 4, None, None, 1.0)
    assert isinstance(spec, FlowTreeSpec)
    with pytest.raises(AttributeError):
        spec.depth = 3
