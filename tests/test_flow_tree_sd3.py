"""Flow trees through a real diffusers StableDiffusion3Pipeline (tiny, random, built from configs):
zero-noise leaves equal the pipeline's own `__call__`, log-probs recompute, NFE is analytic."""

from __future__ import annotations

import pytest
import torch
from flow_cases import sd3_pipe

from rollout.flow import as_flow_pipeline, build_spec, recompute_logprobs, sample_flow_tree

PROMPTS = ["a red cube", "a blue sphere"]


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_zero_noise_leaves_equal_the_sd3_pipeline(guidance):
    pipe = sd3_pipe()
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    trees = sample_flow_tree(PROMPTS, 2, 1, pipe, num_inference_steps=5, sde_window=(1, 4),
                             noise_levels=[0.0, 0.0], guidance_scale=guidance, latents=latents)
    embeds = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=guidance > 1)
    names = ["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
             "negative_pooled_prompt_embeds"]
    kwargs = dict(zip(names, embeds, strict=True), latents=latents, num_inference_steps=5,
                  guidance_scale=guidance, height=32, width=32)
    expected = pipe(**kwargs, output_type="latent").images
    images = pipe(**kwargs, output_type="pt").images
    for p, tree in enumerate(trees):
        for leaf in tree.leaves():
            torch.testing.assert_close(leaf.meta["latents"], expected[p], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(leaf.meta["image"], images[p], atol=1e-5, rtol=1e-5)


def test_sd3_logprobs_recompute_and_nfe():
    pipe = sd3_pipe()
    trees = sample_flow_tree(PROMPTS, 2, 2, pipe, num_inference_steps=6, sde_window=(0, 4),
                             guidance_scale=3.0, seed=4)
    steps = [s for tree in trees for node in tree.nodes() for s in node.steps]
    recorded = torch.tensor([s.logprob for s in steps])
    with torch.no_grad():
        again = recompute_logprobs(as_flow_pipeline(pipe), steps)
    torch.testing.assert_close(again, recorded, atol=1e-5 * recorded.abs().max().item(), rtol=0)
    spec = build_spec(2, 2, 6, (0, 4), None, 3.0)
    assert [t.stats.nfe for t in trees] == [spec.nfe_per_tree()] * 2 == [2 * 2 + 4 * 4] * 2
    assert trees[0].leaves()[0].meta["image"].shape == (3, 32, 32)


def test_image_size_must_fit_the_latent_grid():
    with pytest.raises(ValueError, match="image_size"):
        sample_flow_tree(PROMPTS, 1, 2, sd3_pipe(), image_size=(30, 32))
