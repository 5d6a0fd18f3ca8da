"""Loading a flow-matching policy: the tiny digits model, or any diffusers SD3 / Flux pipeline.

`model.name: digits` loads the shipped 8x8 digits model (nothing downloaded); anything else goes
to `DiffusionPipeline.from_pretrained` (a hub id such as stabilityai/stable-diffusion-3-medium-
diffusers, or a local directory) and through `rollout.flow.as_flow_pipeline`. Only the
transformer trains; text encoders and the VAE are frozen (the sampler stores prompt embeddings
once per tree, so they never see a gradient anyway).

The digits start point: the shipped model follows its prompt almost perfectly (classifier reward
~1.0 for every sampler setting), which leaves RL nothing to show. `model.prompt_strength` < 1
moves each digit's text embedding toward the unconditional (null-class) embedding, so the model
starts by drawing mostly prompt-agnostic digits (reward ~0.3 at 0.3) and RL must teach the
transformer to amplify the weakened prompt signal. The text encoder stays frozen, so the only way
up is through the trained transformer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rollout.flow import as_flow_pipeline, load_digits_pipeline
from rollout.flow.digits import NULL_CLASS, DigitsPipeline
from rollout.flow.pipeline import FlowPipeline

from ..config import RunConfig
from ..policy import DTYPES


def weaken_prompts(pipe: DigitsPipeline, strength: float) -> None:
    """e_c <- e_null + strength * (e_c - e_null) for every digit class c (in place)."""
    encoder = pipe.text_encoder
    with torch.no_grad():
        for table in (encoder.tokens, encoder.pooled):
            null = table.weight[NULL_CLASS].clone()
            table.weight[:NULL_CLASS] = null + strength * (table.weight[:NULL_CLASS] - null)


def _digits(cfg: RunConfig) -> FlowPipeline:
    pipe = load_digits_pipeline()
    if cfg.model.prompt_strength < 1.0:
        weaken_prompts(pipe, cfg.model.prompt_strength)
    return pipe


def _pretrained(cfg: RunConfig) -> FlowPipeline:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(cfg.model.name, dtype=DTYPES[cfg.model.dtype])
    pipe.set_progress_bar_config(disable=True)
    if torch.cuda.is_available():
        pipe.to("cuda")
    size = tuple(cfg.flow.image_size) if cfg.flow.image_size is not None else None
    return as_flow_pipeline(pipe, size)


PIPELINES: dict[str, Callable[[RunConfig], FlowPipeline]] = {"digits": _digits}


def _modules(pipe: FlowPipeline) -> list[torch.nn.Module]:
    """Every torch module of `pipe` (the adapter's wrapped diffusers pipeline included)."""
    inner = getattr(pipe, "pipe", pipe)
    found = [inner] if isinstance(inner, torch.nn.Module) else []
    components = getattr(inner, "components", {}) or {}
    return found + [m for m in components.values() if isinstance(m, torch.nn.Module)]


def load_flow_policy(cfg: RunConfig) -> tuple[FlowPipeline, torch.nn.Module]:
    """(pipeline, its transformer): everything frozen but the transformer, which is in eval mode
    (the trainer switches it to train mode for updates)."""
    pipe = PIPELINES.get(cfg.model.name, _pretrained)(cfg)
    for module in _modules(pipe):
        module.requires_grad_(False)
    transformer = pipe.transformer
    transformer.requires_grad_(True)
    return pipe, transformer.eval()
