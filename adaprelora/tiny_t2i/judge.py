"""The judge: a small CNN, trained on the scene generator's ground truth, that reads a 64 x 64 image
and says which shape (the base shapes and the reserved subjects), which colour and which background
it shows, and gives an embedding for subject-similarity scores (like CLIP-I / DINO for real photos).

It is how tests and benchmarks tell that a model drew what was asked, or that a LoRA learned its
subject, without a person looking.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch import nn
from torch.nn import functional as F

from .scenes import ALL_SHAPES, COLOURS, render, sample_scene

COLOUR_NAMES = tuple(COLOURS)
EMBED_DIM = 128


class Judge(nn.Module):
    """Four conv stages (64 -> 4 px), a 128-d embedding, three classification heads."""

    def __init__(self, num_shapes: int = len(ALL_SHAPES), num_colours: int = len(COLOUR_NAMES)):
        super().__init__()
        chans = (3, 32, 64, 96, 128)
        layers: list[nn.Module] = []
        for a, b in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU(inplace=True),
                       nn.Conv2d(b, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        self.embed = nn.Linear(128 * 4 * 4, EMBED_DIM)
        self.shape_head = nn.Linear(EMBED_DIM, num_shapes)
        self.colour_head = nn.Linear(EMBED_DIM, num_colours)
        self.background_head = nn.Linear(EMBED_DIM, num_colours)

    def forward(self, x: torch.Tensor):
        """`x`: (N, 3, 64, 64) in [-1, 1] -> (embedding, shape logits, colour logits, background logits)."""
        h = self.features(x).flatten(1)
        e = F.relu(self.embed(h))
        return e, self.shape_head(e), self.colour_head(e), self.background_head(e)


@dataclass
class Verdict:
    """What the judge saw in one image."""

    shape: str
    colour: str
    background: str
    embedding: np.ndarray


def to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    arr = np.stack([np.asarray(im.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR), dtype=np.float32)
                    for im in images])
    return torch.from_numpy(arr / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()


def _augment(image: Image.Image, rng: random.Random) -> Image.Image:
    """Blur, noise and a colour cast: the ways a generated image differs from a drawn one."""
    if rng.random() < 0.6:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 1.2)))
    arr = np.asarray(image, dtype=np.float32)
    arr = arr + np.array([rng.uniform(-18, 18) for _ in range(3)], dtype=np.float32)
    arr = arr + np.random.default_rng(rng.randrange(1 << 30)).normal(0, rng.uniform(0, 10), arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _labelled_batch(rng: random.Random, n: int, augment: bool):
    scenes = [sample_scene(rng, ALL_SHAPES, held_out=None) for _ in range(n)]
    images = [render(s) for s in scenes]
    if augment:
        images = [_augment(im, rng) for im in images]
    labels = torch.tensor([[ALL_SHAPES.index(s.shape), COLOUR_NAMES.index(s.colour),
                            COLOUR_NAMES.index(s.background)] for s in scenes])
    return to_tensor(images), labels


def train_judge(steps: int = 1500, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                progress: Optional[Callable[[int, float], None]] = None) -> Judge:
    """Train a judge from scratch on freshly drawn scenes (base shapes and subjects, any colours)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    judge = Judge()
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    judge.train()
    for step in range(steps):
        x, y = _labelled_batch(rng, batch_size, augment=True)
        _, s, c, b = judge(x)
        loss = F.cross_entropy(s, y[:, 0]) + F.cross_entropy(c, y[:, 1]) + F.cross_entropy(b, y[:, 2])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None:
            progress(step, float(loss))
    judge.eval()
    return judge


@torch.no_grad()
def judge_accuracy(judge: Judge, count: int = 1000, seed: int = 12345) -> dict[str, float]:
    """Accuracy on freshly drawn (not augmented) scenes the judge never saw."""
    x, y = _labelled_batch(random.Random(seed), count, augment=False)
    _, s, c, b = judge(x)
    return {"shape": float((s.argmax(1) == y[:, 0]).float().mean()),
            "colour": float((c.argmax(1) == y[:, 1]).float().mean()),
            "background": float((b.argmax(1) == y[:, 2]).float().mean())}


def save_judge(judge: Judge, folder: str, metrics: Optional[dict] = None) -> None:
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, os.path.join(folder, "judge.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"shapes": list(ALL_SHAPES), "colours": list(COLOUR_NAMES), "embed_dim": EMBED_DIM,
                   "input": "RGB 64x64 in [-1, 1]", "metrics": metrics or {}}, f, indent=2)


def load_judge(folder: str) -> Judge:
    from safetensors.torch import load_file

    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    judge = Judge(len(config["shapes"]), len(config["colours"]))
    judge.load_state_dict(load_file(os.path.join(folder, "judge.safetensors")))
    return judge.eval()


@torch.no_grad()
def judge_images(judge: Judge, images: Sequence[Image.Image]) -> list[Verdict]:
    if not images:
        return []
    e, s, c, b = judge(to_tensor(images))
    e = F.normalize(e, dim=1).numpy()
    return [Verdict(ALL_SHAPES[int(si)], COLOUR_NAMES[int(ci)], COLOUR_NAMES[int(bi)], ei)
            for si, ci, bi, ei in zip(s.argmax(1), c.argmax(1), b.argmax(1), e)]


def similarity(verdicts: Sequence[Verdict], references: Sequence[Verdict]) -> float:
    """Mean cosine similarity of each image's embedding to the mean reference embedding."""
    ref = np.mean([r.embedding for r in references], axis=0)
    ref = ref / (np.linalg.norm(ref) + 1e-12)
    return float(np.mean([v.embedding @ ref for v in verdicts]))


__all__ = ["COLOUR_NAMES", "Judge", "Verdict", "judge_accuracy", "judge_images", "load_judge", "save_judge",
           "similarity", "train_judge"]
