"""The tiny embedded flow-matching model: class-conditional 8x8 digits, no download needed.

The denoiser is a real diffusers `SD3Transformer2DModel` (a tiny config), so the digits model runs
through the same transformer call as Stable Diffusion 3. The "text encoder" parses prompts like
"a handwritten 3" into a class and looks up learned embeddings (the negative prompt, used by
classifier-free guidance, is the null class 10). Latents are the images themselves scaled to
[-1, 1] (1 x 8 x 8), so "decoding" is a rescale. Weights are trained by
`python -m rollout.flow.train_digits` and shipped in rollout/flow/weights/.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from torch import Tensor, nn

from .pipeline import PromptEmbeds, sd3_velocity

WEIGHTS_DIR = Path(__file__).parent / "weights"
FLOW_WEIGHTS = WEIGHTS_DIR / "digits_flow.safetensors"
NULL_CLASS = 10  # the unconditional class (empty / negative prompt)
TEXT_TOKENS = 2  # encoder_hidden_states tokens per prompt
TRANSFORMER_CONFIG = dict(
    sample_size=8, patch_size=2, in_channels=1, out_channels=1, num_layers=3,
    attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
    caption_projection_dim=64, pooled_projection_dim=32, pos_embed_max_size=8,
)
_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def prompt_to_class(prompt: str) -> int:
    """The digit a prompt asks for ("a handwritten 3", "three"), or NULL_CLASS for ""."""
    if not prompt.strip():
        return NULL_CLASS
    found = re.findall(r"\b([0-9]|" + "|".join(_WORDS) + r")\b", prompt.lower())
    if len(set(found)) != 1:
        raise ValueError(f"prompt={prompt!r}: name exactly one digit, e.g. 'a handwritten 3'")
    word = found[0]
    return int(word) if word.isdigit() else _WORDS.index(word)


def digit_prompts(classes: Sequence[int]) -> list[str]:
    return [f"a handwritten {c}" for c in classes]


class DigitTextEncoder(nn.Module):
    """Prompt -> (encoder_hidden_states [P, TEXT_TOKENS, 32], pooled_projections [P, 32])."""

    def __init__(self) -> None:
        super().__init__()
        dim = TRANSFORMER_CONFIG["joint_attention_dim"]
        self.tokens = nn.Embedding(NULL_CLASS + 1, TEXT_TOKENS * dim)
        self.pooled = nn.Embedding(NULL_CLASS + 1, TRANSFORMER_CONFIG["pooled_projection_dim"])

    def embed_classes(self, classes: Tensor) -> PromptEmbeds:
        hidden = self.tokens(classes).reshape(classes.shape[0], TEXT_TOKENS, -1)
        return PromptEmbeds({"encoder_hidden_states": hidden,
                             "pooled_projections": self.pooled(classes)})

    def forward(self, prompts: Sequence[str]) -> PromptEmbeds:
        device = self.tokens.weight.device
        classes = torch.tensor([prompt_to_class(p) for p in prompts], device=device)
        return self.embed_classes(classes)


def images_to_latents(images: Tensor) -> Tensor:
    """Digit images [N, 1, 8, 8] with values 0..16 (scikit-learn's scale) -> latents in [-1, 1]."""
    return images.float() / 8.0 - 1.0


class DigitsPipeline(nn.Module):
    """A `FlowPipeline` over the tiny digits transformer (see rollout/flow/pipeline.py)."""

    default_guidance_scale = 2.0

    def __init__(self, transformer: SD3Transformer2DModel | None = None,
                 text_encoder: DigitTextEncoder | None = None) -> None:
        super().__init__()
        self.transformer = transformer or SD3Transformer2DModel(**TRANSFORMER_CONFIG)
        self.text_encoder = text_encoder or DigitTextEncoder()
        self.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    def latent_shape(self) -> tuple[int, ...]:
        return (1, 8, 8)

    def set_timesteps(self, num_steps: int) -> None:
        self.scheduler.set_timesteps(num_steps, device=self.device)

    def encode_prompts(
        self, prompts: Sequence[str], do_cfg: bool
    ) -> tuple[PromptEmbeds, PromptEmbeds | None]:
        cond = self.text_encoder(prompts)
        return cond, (self.text_encoder([""] * len(prompts)) if do_cfg else None)

    def predict_velocity(self, latents: Tensor, timestep: Tensor, embeds: PromptEmbeds) -> Tensor:
        return sd3_velocity(self.transformer, latents, timestep, embeds)

    def decode(self, latents: Tensor) -> Tensor:
        """Latents [N, 1, 8, 8] -> grey images in [0, 1]."""
        return ((latents.float() + 1.0) / 2.0).clamp(0, 1)


def load_digits_pipeline(path: str | Path = FLOW_WEIGHTS) -> DigitsPipeline:
    """The trained digits model (fp32, CPU, eval mode)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `python -m rollout.flow.train_digits`")
    pipe = DigitsPipeline()
    pipe.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return pipe.eval().requires_grad_(False)
