"""What the flow tree sampler needs from a model, and the adapter for diffusers' SD3 pipelines.

The sampler talks to a `FlowPipeline`: encode prompts once, predict velocities for a batch of
latents (each row with its own prompt embedding and, when guided, the negative one), decode leaves.
`SD3Adapter` wraps a `StableDiffusion3Pipeline` (its transformer, scheduler, VAE and
`encode_prompt`), `FluxAdapter` (rollout/flow/flux.py) a `FluxPipeline`; the tiny digits model
implements the protocol itself (rollout/flow/digits.py).
Only flow-matching Euler schedulers are accepted: the SDE steps read the scheduler's sigma table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import Tensor


@dataclass(frozen=True)
class PromptEmbeds:
    """Prompt conditioning as named batch-first tensors (the transformer's keyword arguments)."""

    tensors: dict[str, Tensor]

    def select(self, rows: Tensor) -> PromptEmbeds:
        """Rows `rows` ([N] long) of every tensor: one embedding per live latent."""
        return PromptEmbeds({k: v.index_select(0, rows) for k, v in self.tensors.items()})

    def cat(self, other: PromptEmbeds) -> PromptEmbeds:
        return PromptEmbeds({k: torch.cat([v, other.tensors[k]]) for k, v in self.tensors.items()})


@runtime_checkable
class FlowPipeline(Protocol):
    """A flow-matching model the tree sampler can drive (all tensors batch-first)."""

    scheduler: FlowMatchEulerDiscreteScheduler
    default_guidance_scale: float
    device: torch.device

    def latent_shape(self) -> tuple[int, ...]:
        """One latent's shape, without the batch dim."""
        ...

    def set_timesteps(self, num_steps: int) -> None: ...

    def encode_prompts(
        self, prompts: Sequence[str], do_cfg: bool
    ) -> tuple[PromptEmbeds, PromptEmbeds | None]:
        """(positive [P, ...], negative [P, ...] or None without guidance)."""
        ...

    def predict_velocity(self, latents: Tensor, timestep: Tensor, embeds: PromptEmbeds) -> Tensor:
        """latents [N, ...], timestep [N] (scheduler units), embeds with N rows -> v [N, ...]."""
        ...

    def decode(self, latents: Tensor) -> Tensor:
        """Latents [N, ...] -> images [N, C, H, W], fp32 in [0, 1]."""
        ...


def guided_velocity(
    pipe: FlowPipeline,
    latents: Tensor,
    timestep: Tensor,
    cond: PromptEmbeds,
    uncond: PromptEmbeds | None,
    guidance_scale: float,
) -> Tensor:
    """One transformer call for all rows; with guidance the batch is [negative; positive] as in
    diffusers' pipelines and v = v_neg + g (v_pos - v_neg). latents [N, ...], timestep [N]."""
    if uncond is None:
        return pipe.predict_velocity(latents, timestep, cond)
    doubled = torch.cat([latents, latents])  # [2N, ...]
    out = pipe.predict_velocity(doubled, torch.cat([timestep, timestep]), uncond.cat(cond))
    v_neg, v_pos = out.chunk(2)
    return v_neg + guidance_scale * (v_pos - v_neg)


def check_flow_scheduler(scheduler: Any) -> None:
    """Raise unless `scheduler` is a deterministic flow-matching Euler scheduler."""
    if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        raise TypeError(
            f"pipeline.scheduler is {type(scheduler).__name__}: flow trees need a "
            "FlowMatchEulerDiscreteScheduler (set pipe.scheduler = "
            "FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config) if the model is "
            "a flow-matching model)"
        )
    if scheduler.config.get("stochastic_sampling") or scheduler.config.get("invert_sigmas"):
        raise ValueError("pipeline.scheduler: stochastic_sampling and invert_sigmas are not "
                         "supported; use the default deterministic Euler configuration")


class SD3Adapter:
    """Drive a diffusers `StableDiffusion3Pipeline` (or any pipeline with its components)."""

    def __init__(self, pipe: Any, image_size: tuple[int, int] | None = None) -> None:
        check_flow_scheduler(pipe.scheduler)
        self.pipe = pipe
        self.scheduler = pipe.scheduler
        self.transformer = pipe.transformer
        self.default_guidance_scale = 7.0  # StableDiffusion3Pipeline.__call__'s default
        scale = pipe.vae_scale_factor
        default = pipe.default_sample_size * scale
        self.height, self.width = image_size if image_size is not None else (default, default)
        if self.height % (scale * pipe.patch_size) or self.width % (scale * pipe.patch_size):
            raise ValueError(f"image_size={(self.height, self.width)}: use multiples of "
                             f"{scale * pipe.patch_size} for this pipeline")

    @property
    def device(self) -> torch.device:
        return self.pipe._execution_device

    def latent_shape(self) -> tuple[int, ...]:
        scale = self.pipe.vae_scale_factor
        return (self.transformer.config.in_channels, self.height // scale, self.width // scale)

    def set_timesteps(self, num_steps: int) -> None:
        """As the pipeline does, including resolution-dependent shifting (`mu`) when configured."""
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
            calculate_shift,
        )

        kwargs = {}
        config = self.scheduler.config
        if config.get("use_dynamic_shifting", None):
            _, h, w = self.latent_shape()
            patch = self.transformer.config.patch_size
            kwargs["mu"] = calculate_shift(
                (h // patch) * (w // patch), config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                config.get("max_shift", 1.16))
        self.scheduler.set_timesteps(num_steps, device=self.device, **kwargs)

    def encode_prompts(
        self, prompts: Sequence[str], do_cfg: bool
    ) -> tuple[PromptEmbeds, PromptEmbeds | None]:
        pe, neg_pe, pooled, neg_pooled = self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, device=self.device,
            do_classifier_free_guidance=do_cfg)
        cond = PromptEmbeds({"encoder_hidden_states": pe, "pooled_projections": pooled})
        if not do_cfg:
            return cond, None
        return cond, PromptEmbeds({"encoder_hidden_states": neg_pe,
                                   "pooled_projections": neg_pooled})

    def predict_velocity(self, latents: Tensor, timestep: Tensor, embeds: PromptEmbeds) -> Tensor:
        return sd3_velocity(self.transformer, latents, timestep, embeds)

    def decode(self, latents: Tensor) -> Tensor:
        vae = self.pipe.vae
        shift = vae.config.shift_factor or 0.0
        z = latents.to(vae.dtype) / vae.config.scaling_factor + shift
        image = vae.decode(z, return_dict=False)[0]  # [N, 3, H, W] in [-1, 1]
        return (image.float() / 2 + 0.5).clamp(0, 1)


def sd3_velocity(
    transformer: Any, latents: Tensor, timestep: Tensor, embeds: PromptEmbeds
) -> Tensor:
    """An SD3-style transformer call: latents [N, C, h, w] -> v [N, C, h, w], the model's dtype."""
    return transformer(
        hidden_states=latents.to(transformer.dtype),
        timestep=timestep,
        return_dict=False,
        **{k: v.to(transformer.dtype) for k, v in embeds.tensors.items()},
    )[0]


def as_flow_pipeline(pipeline: Any, image_size: tuple[int, int] | None = None) -> FlowPipeline:
    """Return `pipeline` itself if it implements `FlowPipeline`, an adapter for a diffusers SD3
    pipeline, or raise TypeError naming what is accepted."""
    if isinstance(pipeline, FlowPipeline):
        check_flow_scheduler(pipeline.scheduler)
        return pipeline
    transformer = getattr(pipeline, "transformer", None)
    if transformer is not None and hasattr(pipeline, "encode_prompt"):
        from diffusers import SD3Transformer2DModel

        if isinstance(transformer, SD3Transformer2DModel):
            return SD3Adapter(pipeline, image_size)
        if type(transformer).__name__ == "FluxTransformer2DModel":
            from .flux import FluxAdapter

            return FluxAdapter(pipeline, image_size)
    raise TypeError(
        f"pipeline={type(pipeline).__name__}: pass a diffusers StableDiffusion3Pipeline or "
        "FluxPipeline, "
        "rollout.flow.load_digits_pipeline(), or an object implementing rollout.flow.FlowPipeline"
    )
