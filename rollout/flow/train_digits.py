"""Train the tiny digits flow model and its classifier; write rollout/flow/weights/.

    python -m rollout.flow.train_digits [--steps 2000] [--threads 1]

Data: scikit-learn's 8x8 digits (1,797 images, offline). The flow model learns rectified-flow
velocities v = noise - x0 at sigma ~ U(0, 1) (diffusers' convention x_s = (1 - s) x0 + s noise),
with the prompt dropped to the null class 10% of the time for classifier-free guidance. The
classifier is a small CNN trained on 80% of the images (with light noise so it tolerates samples)
and checked on the rest. Weights are saved in fp16 to stay small; they load as fp32.
Takes three to four minutes on one CPU thread (the shipped weights: 2,000 steps, seed 0).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from .classifier import CLASSIFIER_WEIGHTS, DigitClassifier
from .digits import FLOW_WEIGHTS, NULL_CLASS, DigitsPipeline, digit_prompts, images_to_latents
from .sampler import sample_flow_tree


def load_data() -> tuple[torch.Tensor, torch.Tensor]:
    """(latents [1797, 1, 8, 8] in [-1, 1], labels [1797])."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None]
    return images_to_latents(images), torch.tensor(data.target)


def train_flow(x: torch.Tensor, y: torch.Tensor, steps: int, seed: int) -> DigitsPipeline:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    pipe = DigitsPipeline().train()
    opt = torch.optim.AdamW(pipe.parameters(), lr=2e-3, weight_decay=0.0)
    warm = max(1, steps // 20)  # linear warm-up, then cosine decay to 0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / warm) * 0.5
                                              * (1 + math.cos(math.pi * min(1.0, k / steps))))
    for step in range(steps):
        idx = torch.randint(0, x.shape[0], (128,), generator=gen)
        x0, labels = x[idx], y[idx].clone()
        labels[torch.rand(128, generator=gen) < 0.1] = NULL_CLASS  # guidance dropout
        sigma = torch.rand(128, generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        s = sigma[:, None, None, None]
        xs = (1 - s) * x0 + s * noise
        v = pipe.predict_velocity(xs, sigma * 1000, pipe.text_encoder.embed_classes(labels))
        loss = F.mse_loss(v, noise - x0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            print(f"flow step {step:5d}  loss {loss.item():.4f}", flush=True)
    return pipe.eval().requires_grad_(False)


def train_classifier(x: torch.Tensor, y: torch.Tensor, seed: int) -> DigitClassifier:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    perm = torch.randperm(x.shape[0], generator=gen)
    cut = int(0.8 * x.shape[0])
    images = (x + 1) / 2  # classifier input: [0, 1] as decoded
    train, test = perm[:cut], perm[cut:]
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(600):
        idx = train[torch.randint(0, cut, (128,), generator=gen)]
        batch = (images[idx] + 0.05 * torch.randn(images[idx].shape, generator=gen)).clamp(0, 1)
        loss = F.cross_entropy(model(batch), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().requires_grad_(False)
    acc = (model(images[test]).argmax(-1) == y[test]).float().mean().item()
    print(f"classifier held-out accuracy {acc:.3f}", flush=True)
    return model


def check_samples(pipe: DigitsPipeline, classifier: DigitClassifier) -> None:
    """Sample 20 images per class (plain ODE and SDE, guided) and report the classifier's accuracy.

    ODE samples are 20 one-leaf trees per class (a noise-free tree's leaves would be identical).
    """
    classes = [c for c in range(10) for _ in range(20)]
    ode = sample_flow_tree(digit_prompts(classes), 1, 1, pipe, num_inference_steps=20,
                           noise_levels=[0.0], seed=1)
    sde = sample_flow_tree(digit_prompts(range(10)), 1, 20, pipe, num_inference_steps=20,
                           sde_window=(0, 20), noise_levels=[0.7], seed=2)
    for name, trees, asked in (("ode", ode, classes), ("sde", sde, range(10))):
        leaves = [(leaf, c) for t, c in zip(trees, asked, strict=True) for leaf in t.leaves()]
        images = torch.stack([leaf.meta["image"] for leaf, _ in leaves])
        labels = torch.tensor([c for _, c in leaves])
        hits = classifier(images).argmax(-1).eq(labels).float().mean().item()
        print(f"{name} samples classified as asked: {hits:.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    x, y = load_data()
    classifier = train_classifier(x, y, args.seed)
    pipe = train_flow(x, y, args.steps, args.seed)
    check_samples(pipe, classifier)
    FLOW_WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in pipe.state_dict().items()}, str(FLOW_WEIGHTS))
    save_file({k: v.half().contiguous() for k, v in classifier.state_dict().items()},
              str(CLASSIFIER_WEIGHTS))
    print(f"wrote {FLOW_WEIGHTS} and {CLASSIFIER_WEIGHTS} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
