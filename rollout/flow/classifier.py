"""A small 8x8 digit classifier and the reward built on it.

`DigitReward` is a `rollout.rewards.RewardFunction`: given decoded leaf images and their prompts
("a handwritten 3") it returns the classifier's probability of the asked-for digit, one float per
image, for all trees of a step in one batched call. It is the reward the digits demo and tests
optimize; the classifier is trained beside the flow model by `rollout.flow.train_digits`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from trees import Trajectory

from .digits import NULL_CLASS, WEIGHTS_DIR, prompt_to_class

CLASSIFIER_WEIGHTS = WEIGHTS_DIR / "digits_classifier.safetensors"


class DigitClassifier(nn.Module):
    """Images [N, 1, 8, 8] in [0, 1] -> logits [N, 10]."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # [N, 32, 4, 4]
            nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, 10),
        )

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images.float())


def load_digit_classifier(path: str | Path = CLASSIFIER_WEIGHTS) -> DigitClassifier:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `python -m rollout.flow.train_digits`")
    model = DigitClassifier()
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return model.eval().requires_grad_(False)


def leaf_image(trajectory: Trajectory) -> Tensor:
    """The `decode` for `rollout.rewards.score_trees` on flow trees: the leaf's image [C, H, W]."""
    return trajectory.leaf.meta["image"]


class DigitReward:
    """Reward = p(asked-for digit | image) under the digit classifier, in [0, 1]."""

    def __init__(self, classifier: DigitClassifier | None = None) -> None:
        self.classifier = classifier if classifier is not None else load_digit_classifier()

    def __call__(self, outputs: Sequence[Any] | Tensor, prompts: Sequence[Any]) -> Tensor:
        images = outputs if isinstance(outputs, Tensor) else torch.stack(list(outputs))
        if images.ndim != 4 or tuple(images.shape[1:]) != (1, 8, 8):
            raise ValueError(f"DigitReward: images of shape {tuple(images.shape)}; expected "
                             "[N, 1, 8, 8] in [0, 1] (decoded leaves of the digits pipeline)")
        classes = torch.tensor([prompt_to_class(str(p)) for p in prompts])
        if (classes == NULL_CLASS).any():
            raise ValueError("DigitReward: every prompt must name a digit, e.g. 'a handwritten 3'")
        with torch.no_grad():
            probs = self.classifier(images.cpu()).softmax(dim=-1)  # [N, 10]
        return probs.gather(1, classes[:, None]).squeeze(1)
