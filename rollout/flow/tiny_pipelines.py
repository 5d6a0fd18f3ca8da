"""Tiny SD3 and Flux pipelines built from configs, with random weights and no download.

For tests, benchmarks and demos of the diffusers paths: a real `StableDiffusion3Pipeline` or
`FluxPipeline` (transformer, VAE, flow-matching scheduler) whose text encoders are replaced by a
deterministic stand-in, `HashPromptEncoder`, because CLIP and T5 tokenizers need files from a model
hub. The stand-in returns `encode_prompt`'s tensors with the shapes the transformer expects; the
pipeline's own `__call__` runs unchanged when given those embeddings.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from torch import Tensor

TINY_SD3_TRANSFORMER = dict(
    sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
    attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
    caption_projection_dim=64, pooled_projection_dim=32, pos_embed_max_size=16,
)
TINY_FLUX_TRANSFORMER = dict(
    patch_size=1, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1,
    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
    pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 4, 8),
)
TINY_SD3_VAE = dict(
    in_channels=3, out_channels=3, block_out_channels=(8, 8), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    latent_channels=4, norm_num_groups=4, sample_size=32, use_quant_conv=False,
    use_post_quant_conv=False, scaling_factor=1.5, shift_factor=0.06,
)


class HashPromptEncoder:
    """`encode_prompt` for a pipeline without text encoders: seeded by a CRC of each prompt.

    Returns (prompt_embeds [P, tokens, joint_dim], negative [P, tokens, joint_dim],
    pooled [P, pooled_dim], negative pooled [P, pooled_dim]) like SD3's `encode_prompt`.
    """

    def __init__(self, joint_dim: int, pooled_dim: int, tokens: int = 8) -> None:
        self.joint_dim, self.pooled_dim, self.tokens = joint_dim, pooled_dim, tokens

    def _embed(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        hidden, pooled = [], []
        for prompt in prompts:
            gen = torch.Generator().manual_seed(zlib.crc32(prompt.encode()))
            hidden.append(torch.randn(self.tokens, self.joint_dim, generator=gen))
            pooled.append(torch.randn(self.pooled_dim, generator=gen))
        return torch.stack(hidden), torch.stack(pooled)

    def __call__(self, prompt: str | Sequence[str] | None = None, *args: object,
                 device: torch.device | None = None, do_classifier_free_guidance: bool = True,
                 negative_prompt: str | Sequence[str] | None = None, **kwargs: object
                 ) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        if kwargs.get("prompt_embeds") is not None:  # precomputed: pass through, as SD3 does
            return (kwargs["prompt_embeds"], kwargs.get("negative_prompt_embeds"),
                    kwargs["pooled_prompt_embeds"], kwargs.get("negative_pooled_prompt_embeds"))
        prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
        embeds, pooled = self._embed(prompts)
        if not do_classifier_free_guidance:
            return embeds.to(device), None, pooled.to(device), None
        negative = negative_prompt or ""
        negatives = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
        neg_embeds, neg_pooled = self._embed(negatives)
        return (embeds.to(device), neg_embeds.to(device), pooled.to(device),
                neg_pooled.to(device))


def build_tiny_sd3_pipeline(
    seed: int = 0, **transformer_overrides: int
) -> StableDiffusion3Pipeline:
    """A random-weight SD3 pipeline (32x32 images, 4x16x16 latents), fp32 on the CPU."""
    torch.manual_seed(seed)
    config = {**TINY_SD3_TRANSFORMER, **transformer_overrides}
    transformer = SD3Transformer2DModel(**config)
    vae = AutoencoderKL(**TINY_SD3_VAE)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipe.encode_prompt = HashPromptEncoder(config["joint_attention_dim"],
                                           config["pooled_projection_dim"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


class HashFluxEncoder(HashPromptEncoder):
    """Flux's `encode_prompt`: (prompt_embeds [P, tokens, dim], pooled [P, dim], text_ids)."""

    def __call__(self, prompt: str | Sequence[str] | None = None, *args: object,
                 device: torch.device | None = None, **kwargs: object
                 ) -> tuple[Tensor, Tensor, Tensor]:
        if kwargs.get("prompt_embeds") is not None:
            embeds, pooled = kwargs["prompt_embeds"], kwargs["pooled_prompt_embeds"]
        else:
            embeds, pooled = self._embed([prompt] if isinstance(prompt, str) else list(prompt))
        text_ids = torch.zeros(embeds.shape[1], 3)
        return embeds.to(device), pooled.to(device), text_ids.to(device)


def build_tiny_flux_pipeline(seed: int = 0) -> FluxPipeline:
    """A random-weight Flux pipeline (use image_size=(32, 32): 64 packed tokens of 16), fp32."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**TINY_FLUX_TRANSFORMER)
    vae = AutoencoderKL(**TINY_SD3_VAE)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.encode_prompt = HashFluxEncoder(TINY_FLUX_TRANSFORMER["joint_attention_dim"],
                                         TINY_FLUX_TRANSFORMER["pooled_projection_dim"])
    pipe.set_progress_bar_config(disable=True)
    return pipe
