"""Flow tasks: prompts per step and an image reward, in a registry like trainers/text/tasks.py.

- `digits`: prompts "a handwritten <d>" with d drawn per step; reward = the digit classifier's
  probability of d (`rollout.flow.DigitReward`), in [0, 1]. Runs offline in seconds.
- `prompt_file`: one prompt per line of `task.data_path`; reward = a CLIP-style preference
  scorer loaded with `from_pretrained` (`ClipPreferenceReward`): PickScore
  (yuvalkirstain/PickScore_v1 with the laion/CLIP-ViT-H-14-laion2B-s32B-b79K processor) or any
  CLIPModel checkpoint. HPS v2.1 ships as an open_clip checkpoint, not a transformers one; wrap it
  in the same `RewardFunction` interface to use it.
Prompts are pure functions of (seed, step), so resumed runs see the same prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rollout.flow import DigitReward
from rollout.flow.digits import digit_prompts

from ..config import RunConfig
from ..policy import Task, step_rng


class ClipPreferenceReward:
    """PickScore-style reward: logit_scale * cos(image embedding, prompt embedding) of a CLIP
    model, for images [N, C, H, W] in [0, 1] (grey images are repeated to RGB)."""

    def __init__(self, model: Any, tokenizer: Any, size: tuple[int, int],
                 mean: Sequence[float], std: Sequence[float]) -> None:
        self.model, self.tokenizer, self.size = model.eval(), tokenizer, size
        self.mean = torch.tensor(mean).reshape(1, -1, 1, 1)
        self.std = torch.tensor(std).reshape(1, -1, 1, 1)

    @classmethod
    def from_pretrained(cls, name: str, processor: str = "") -> ClipPreferenceReward:
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        source = processor or name
        model = CLIPModel.from_pretrained(name).requires_grad_(False)
        if torch.cuda.is_available():
            model = model.to("cuda")
        images = CLIPImageProcessor.from_pretrained(source)
        crop = images.crop_size
        return cls(model, AutoTokenizer.from_pretrained(source), (crop["height"], crop["width"]),
                   images.image_mean, images.image_std)

    def _pixels(self, images: Tensor) -> Tensor:
        """Resize the short side to the crop size, centre-crop, normalize: [N, 3, h, w]."""
        images = images.float()
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        h, w = self.size
        scale = max(h / images.shape[2], w / images.shape[3])
        new = (max(h, round(images.shape[2] * scale)), max(w, round(images.shape[3] * scale)))
        images = F.interpolate(images, size=new, mode="bicubic", antialias=True).clamp(0, 1)
        top, left = (new[0] - h) // 2, (new[1] - w) // 2
        images = images[:, :, top : top + h, left : left + w]
        return (images - self.mean) / self.std

    @staticmethod
    def _features(out: Any) -> Tensor:
        feats = getattr(out, "pooler_output", out)
        return F.normalize(feats.float(), dim=-1)

    def __call__(self, outputs: Sequence[Tensor] | Tensor, prompts: Sequence[Any]) -> Tensor:
        images = outputs if isinstance(outputs, Tensor) else torch.stack(list(outputs))
        device = next(self.model.parameters()).device
        text = self.tokenizer([str(p) for p in prompts], padding=True, truncation=True,
                              max_length=77, return_tensors="pt").to(device)
        pixels = self._pixels(images.cpu()).to(device, next(self.model.parameters()).dtype)
        with torch.no_grad():
            img = self._features(self.model.get_image_features(pixel_values=pixels))
            txt = self._features(self.model.get_text_features(**text))
            return (self.model.logit_scale.exp().float() * (img * txt).sum(-1)).cpu()


def digits_task(cfg: RunConfig, tokenizer: Any = None) -> Task:
    del tokenizer
    seed = cfg.train.seed

    def prompts(step: int, n: int) -> list[str]:
        rng = step_rng(seed, step)
        return digit_prompts([rng.randrange(10) for _ in range(n)])

    return Task(prompts=prompts, reward_fn=DigitReward())


def check_prompt_file(cfg: RunConfig) -> None:
    """The prompt file and the scorer's name, checked before any model loads."""
    if not cfg.task.data_path or not Path(cfg.task.data_path).is_file():
        raise ValueError(f"task.data_path={cfg.task.data_path!r}: the prompt_file task needs a "
                         "text file with one prompt per line")
    if not cfg.task.reward_model:
        raise ValueError("task.reward_model='': give a CLIP-style scorer, e.g. "
                         "yuvalkirstain/PickScore_v1 (and task.reward_processor)")


def prompt_file_task(cfg: RunConfig, tokenizer: Any = None) -> Task:
    del tokenizer
    check_prompt_file(cfg)
    path = Path(cfg.task.data_path)
    items = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    reward = ClipPreferenceReward.from_pretrained(cfg.task.reward_model, cfg.task.reward_processor)
    seed = cfg.train.seed

    def prompts(step: int, n: int) -> list[str]:
        rng = step_rng(seed, step)
        return [items[rng.randrange(len(items))] for _ in range(n)]

    return Task(prompts=prompts, reward_fn=reward)


FLOW_TASKS: dict[str, Callable[[RunConfig, Any], Task]] = {
    "digits": digits_task,
    "prompt_file": prompt_file_task,
}
