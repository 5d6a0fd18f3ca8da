"""Shared pieces of the flow-tree tests: the trained digits pipeline, a tiny SD3 pipeline, and
the plain diffusers sampling loop the trees are held against."""

from __future__ import annotations

from functools import lru_cache

import torch

from rollout.flow import PromptEmbeds, as_flow_pipeline
from rollout.flow.digits import DigitsPipeline, load_digits_pipeline
from rollout.flow.tiny_pipelines import build_tiny_flux_pipeline, build_tiny_sd3_pipeline


@lru_cache(maxsize=1)
def digits_pipe() -> DigitsPipeline:
    return load_digits_pipeline()


@lru_cache(maxsize=1)
def sd3_pipe():
    return build_tiny_sd3_pipeline(seed=0)


@lru_cache(maxsize=1)
def flux_pipe():
    return build_tiny_flux_pipeline(seed=0)


def plain_digits_loop(pipe: DigitsPipeline, prompts: list[str], latents: torch.Tensor,
                      num_steps: int, guidance_scale: float) -> torch.Tensor:
    """diffusers' denoising loop (scheduler.step with its own step index), as the SD3 pipeline
    runs it: latents [P, 1, 8, 8] -> final latents [P, 1, 8, 8]."""
    flow = as_flow_pipeline(pipe)
    cond, uncond = flow.encode_prompts(prompts, guidance_scale > 1)
    embeds = uncond.cat(cond) if uncond is not None else cond
    pipe.scheduler.set_timesteps(num_steps)
    x = latents.clone()
    with torch.no_grad():
        for t in pipe.scheduler.timesteps:
            inp = torch.cat([x, x]) if uncond is not None else x
            v = flow.predict_velocity(inp, t.expand(inp.shape[0]), PromptEmbeds(embeds.tensors))
            if uncond is not None:
                v_neg, v_pos = v.chunk(2)
                v = v_neg + guidance_scale * (v_pos - v_neg)
            x = pipe.scheduler.step(v, t, x, return_dict=False)[0]
    return x
