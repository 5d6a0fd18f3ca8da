"""The `FlowPipeline` adapter for diffusers' `FluxPipeline` (a Flux-style transformer).

Flux works on packed latents: each latent is [seq, 4 C] (2x2 patches of the VAE latent), its
transformer takes the timestep divided by 1000, positional ids for text and image tokens, and (for
guidance-distilled checkpoints) an embedded guidance value. The tree sampler is shape-agnostic,
so it samples packed latents directly; this adapter mirrors `FluxPipeline.__call__`: its sigma
schedule (`linspace(1, 1/T, T)` with resolution shift `mu`), its true classifier-free guidance
(negative prompt "" when the sampler's `guidance_scale` > 1), and its unpacking before the VAE.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .pipeline import PromptEmbeds, check_flow_scheduler


class FluxAdapter:
    """Drive a diffusers `FluxPipeline`; `embedded_guidance` feeds distilled-guidance models."""

    default_guidance_scale = 1.0  # true CFG off, as FluxPipeline's `true_cfg_scale` default

    def __init__(self, pipe: Any, image_size: tuple[int, int] | None = None,
                 embedded_guidance: float = 3.5) -> None:
        check_flow_scheduler(pipe.scheduler)
        self.pipe, self.scheduler, self.transformer = pipe, pipe.scheduler, pipe.transformer
        self.embedded_guidance = embedded_guidance
        scale = pipe.vae_scale_factor
        default = pipe.default_sample_size * scale
        height, width = image_size if image_size is not None else (default, default)
        if height % (2 * scale) or width % (2 * scale):
            raise ValueError(f"image_size={(height, width)}: use multiples of {2 * scale} "
                             "for this pipeline")
        self.height, self.width = height, width
        self.grid = (height // scale // 2, width // scale // 2)  # packed tokens per side

    @property
    def device(self) -> torch.device:
        return self.pipe._execution_device

    def latent_shape(self) -> tuple[int, ...]:
        return (self.grid[0] * self.grid[1], self.transformer.config.in_channels)

    def set_timesteps(self, num_steps: int) -> None:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        config = self.scheduler.config
        sigmas = None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / num_steps,
                                                                         num_steps)
        mu = calculate_shift(self.latent_shape()[0], config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        self.scheduler.set_timesteps(num_steps, device=self.device, sigmas=sigmas, mu=mu)

    def encode_prompts(
        self, prompts: Sequence[str], do_cfg: bool
    ) -> tuple[PromptEmbeds, PromptEmbeds | None]:
        def encode(texts: list[str]) -> PromptEmbeds:
            embeds, pooled, _ = self.pipe.encode_prompt(prompt=texts, prompt_2=None,
                                                        device=self.device)
            return PromptEmbeds({"encoder_hidden_states": embeds, "pooled_projections": pooled})

        cond = encode(list(prompts))
        return cond, (encode([""] * len(prompts)) if do_cfg else None)

    def predict_velocity(self, latents: Tensor, timestep: Tensor, embeds: PromptEmbeds) -> Tensor:
        """latents [N, seq, 4 C] -> v [N, seq, 4 C]."""
        dtype, n = self.transformer.dtype, latents.shape[0]
        text = embeds.tensors["encoder_hidden_states"].to(dtype)
        txt_ids = torch.zeros(text.shape[1], 3, device=latents.device, dtype=dtype)
        img_ids = self.pipe._prepare_latent_image_ids(n, *self.grid, latents.device, dtype)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full([n], self.embedded_guidance, device=latents.device,
                                  dtype=torch.float32)
        return self.transformer(
            hidden_states=latents.to(dtype), timestep=timestep.to(dtype) / 1000,
            guidance=guidance, pooled_projections=embeds.tensors["pooled_projections"].to(dtype),
            encoder_hidden_states=text, txt_ids=txt_ids, img_ids=img_ids, return_dict=False,
        )[0]

    def decode(self, latents: Tensor) -> Tensor:
        vae = self.pipe.vae
        z = self.pipe._unpack_latents(latents, self.height, self.width, self.pipe.vae_scale_factor)
        z = z.to(vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        image = vae.decode(z, return_dict=False)[0]  # [N, 3, H, W] in [-1, 1]
        return (image.float() / 2 + 0.5).clamp(0, 1)
