"""Aspect-ratio buckets: train on images of any shape without cropping them square (kohya's scheme).

A bucket is a (width, height) of about `resolution x resolution` pixels whose sides are multiples
of `bucket_reso_steps` and lie between `min_bucket_reso` and `max_bucket_reso`. Each image goes to
the bucket nearest its aspect ratio, is resized to cover it and loses only the remainder to the
crop (a few pixels, not half of its long side). With `bucket_no_upscale` a small image keeps its own
size (rounded down to the steps) instead of being enlarged.

Every batch holds images of one bucket (so they stack); `BucketBatchSampler` draws the batches
from a generator seeded with (seed, epoch), so an epoch's order is the same whether the run was
interrupted and resumed or not.
"""
from __future__ import annotations

import math
import random
from collections import Counter
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image

Size = tuple[int, int]  # (width, height)


def make_buckets(resolution: int, min_reso: int = 256, max_reso: int = 1024, step: int = 64) -> list[Size]:
    """The bucket sizes for a `resolution x resolution` pixel budget, sorted by aspect ratio.

    For each width from `min_reso` to `max_reso` (in `step`s) the tallest height within the
    budget, rounded down to a multiple of `step`, plus the square bucket and every transpose.
    """
    area = resolution * resolution
    side = max(step, int(math.sqrt(area)) // step * step)
    buckets = {(side, side)}
    width = min_reso
    while width <= max_reso:
        height = min(max_reso, int(area // width) // step * step)
        if height >= min_reso:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    return sorted(buckets, key=lambda s: (s[0] / s[1], s[0]))


def bucket_for(size: Size, buckets: Sequence[Size], *, resolution: int, step: int,
               no_upscale: bool = False) -> Size:
    """The bucket of an image of `size`: the one nearest its aspect ratio; with `no_upscale` a
    bucket of the image's own size (shrunk to the pixel budget if larger, sides rounded down to
    `step`), so small images are never enlarged."""
    width, height = size
    if no_upscale:
        scale = min(1.0, math.sqrt(resolution * resolution / (width * height)))
        w = max(step, int(width * scale) // step * step)
        h = max(step, int(height * scale) // step * step)
        return (w, h)
    ratio = width / height
    return min(buckets, key=lambda b: (abs(b[0] / b[1] - ratio), -b[0] * b[1]))


def _cover_size(size: Size, bucket: Size) -> Size:
    """The size an image of `size` is resized to before the crop: the smallest that covers `bucket`."""
    width, height = size
    bw, bh = bucket
    scale = max(bw / width, bh / height)
    return max(bw, round(width * scale)), max(bh, round(height * scale))


def fit_to_bucket(img: Image.Image, bucket: Size, *, center_crop: bool = True, resample=Image.Resampling.LANCZOS,
                  rng: Optional[random.Random] = None, flip: bool = False) -> tuple[torch.Tensor, Size, Size]:
    """Resize `img` to cover `bucket` and crop the remainder; scale to [-1, 1].

    Returns (pixels float32 (3, H, W), original size (height, width), crop top-left (top, left)
    in the resized image): the two pairs SDXL's time ids are made of.
    """
    width, height = img.size
    bw, bh = bucket
    new_w, new_h = _cover_size(img.size, bucket)
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), resample=resample)
    if center_crop:
        left, top = (new_w - bw) // 2, (new_h - bh) // 2
    else:
        rng = rng or random
        left, top = rng.randint(0, new_w - bw), rng.randint(0, new_h - bh)
    img = img.crop((left, top, left + bw, top + bh))
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array.transpose(2, 0, 1).copy()), (height, width), (top, left)


def fit_mask_to_bucket(mask: Image.Image, bucket: Size, crop_top_left: tuple[int, int], *, flip: bool = False,
                       resample=Image.Resampling.LANCZOS) -> torch.Tensor:
    """A loss mask (mode "L", its image's size) through the resize, crop (`fit_to_bucket`'s returned
    top-left) and flip its image went through: uint8 (1, H, W), so mask and pixels stay aligned."""
    bw, bh = bucket
    size = _cover_size(mask.size, bucket)
    if size != mask.size:
        mask = mask.resize(size, resample=resample)
    top, left = crop_top_left
    mask = mask.crop((left, top, left + bw, top + bh))
    if flip:
        mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(mask, dtype=np.uint8).copy())[None]


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of dataset indices that share a bucket, in an order seeded by (seed, epoch).

    Each epoch shuffles the indices within every bucket, cuts them into batches of `batch_size`
    (the last batch of a bucket may be smaller) and shuffles the batches. Call `set_epoch` at the
    start of each epoch (the DataLoader's `set_epoch` does). Its state is only (seed, epoch), so a
    resumed run, which skips the batches already trained on, continues exactly where it stopped.
    """

    def __init__(self, item_buckets: Sequence[Size], batch_size: int, seed: Optional[int] = None):
        self.item_buckets = list(item_buckets)
        self.batch_size = batch_size
        self.seed = 0 if seed is None else seed
        self.epoch = 0
        groups: dict[Size, list[int]] = {}
        for index, bucket in enumerate(self.item_buckets):
            groups.setdefault(bucket, []).append(index)
        self.groups = dict(sorted(groups.items()))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(math.ceil(len(ids) / self.batch_size) for ids in self.groups.values())

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(f"buckets-{self.seed}-{self.epoch}")
        batches = []
        for ids in self.groups.values():
            ids = list(ids)
            rng.shuffle(ids)
            batches += [ids[i:i + self.batch_size] for i in range(0, len(ids), self.batch_size)]
        rng.shuffle(batches)
        return iter(batches)


def bucket_table(item_buckets: Sequence[Size], batch_size: int) -> str:
    """A few lines for the run's log: each bucket used, its images and its batches per epoch."""
    counts = Counter(item_buckets)
    lines = [f"aspect-ratio buckets ({len(counts)} used):", "  bucket (w x h)  ratio  images  batches"]
    for (w, h), n in sorted(counts.items(), key=lambda kv: kv[0][0] / kv[0][1]):
        lines.append(f"  {w:>5} x {h:<5}  {w / h:5.2f}  {n:>6}  {math.ceil(n / batch_size):>7}")
    return "\n".join(lines)


__all__ = ["BucketBatchSampler", "bucket_for", "bucket_table", "fit_mask_to_bucket", "fit_to_bucket", "make_buckets"]
