"""Flow trees through a real diffusers FluxPipeline (tiny, random, packed latents): zero-noise
leaves equal the pipeline's own `__call__` (true CFG on and off), log-probs recompute."""

from __future__ import annotations

import pytest
import torch
from flow_cases import flux_pipe

from rollout.flow import as_flow_pipeline, build_spec, recompute_logprobs, sample_flow_tree

PROMPTS = ["a red cube", "a blue sphere"]
SIZE = (32, 32)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_zero_noise_leaves_equal_the_flux_pipeline(guidance):
    pipe = flux_pipe()
    latents = torch.randn(2, 64, 16, generator=torch.Generator().manual_seed(2))
    trees = sample_flow_tree(PROMPTS, 2, 1, pipe, num_inference_steps=5, sde_window=(1, 4),
                             noise_levels=[0.0, 0.0], guidance_scale=guidance, latents=latents,
                             image_size=SIZE)
    embeds, pooled, _ = pipe.encode_prompt(PROMPTS)
    kwargs = dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled, latents=latents,
                  num_inference_steps=5, height=SIZE[0], width=SIZE[1])
    if guidance > 1:
        neg, neg_pooled, _ = pipe.encode_prompt(["", ""])
        kwargs.update(negative_prompt_embeds=neg, negative_pooled_prompt_embeds=neg_pooled,
                      true_cfg_scale=guidance)
    expected = pipe(**kwargs, output_type="latent").images
    images = pipe(**kwargs, output_type="pt").images
    for p, tree in enumerate(trees):
        for leaf in tree.leaves():
            torch.testing.assert_close(leaf.meta["latents"], expected[p], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(leaf.meta["image"], images[p], atol=1e-5, rtol=1e-5)


def test_flux_logprobs_recompute_and_nfe():
    pipe = flux_pipe()
    trees = sample_flow_tree(PROMPTS, 2, 2, pipe, num_inference_steps=5, sde_window=(0, 4),
                             guidance_scale=3.0, image_size=SIZE, seed=5)
    steps = [s for tree in trees for node in tree.nodes() for s in node.steps]
    assert steps[0].sigma == 1.0  # the first step uses the s = 1 branch of the std
    recorded = torch.tensor([s.logprob for s in steps])
    with torch.no_grad():
        again = recompute_logprobs(as_flow_pipeline(pipe, SIZE), steps)
    torch.testing.assert_close(again, recorded, atol=1e-5 * recorded.abs().max().item(), rtol=0)
    assert trees[0].stats.nfe == build_spec(2, 2, 5, (0, 4), None, 3.0).nfe_per_tree()
