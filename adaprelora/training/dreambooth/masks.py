"""Masked loss (kohya's `--masked_loss` and `--alpha_mask`): which pixels of an instance image teach the LoRA.

A mask weighs the denoising loss pixel by pixel: white (255) trains, black (0) is ignored, grey in
between weighs in proportion (127 is about 0.5). It comes either from a mask image per instance
image in `--conditioning_data_dir` (kohya's layout: the same file stem, any image extension, the
same size as its image; its red channel is read, as kohya reads it) or from the image's own alpha
channel (`--alpha_mask`; an image without one trains whole, as in kohya). Class images (prior
preservation) are never masked.

The mask goes through its image's resize, crop and flip (`buckets.fit_mask_to_bucket`), travels
beside the pixels or the cached latents as uint8, and in the loss is averaged down to latent size
(area interpolation) and multiplies the per-element squared error before the per-image mean. As in
kohya's `apply_masked_loss`, that mean is not divided by the mask's mean: an image whose mask keeps
a quarter of it contributes a quarter of its unmasked loss, so each kept pixel pulls as hard as in
an unmasked run and kohya's learning rates carry over; an all-white mask gives exactly the unmasked
loss.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional, Sequence

import torch
from PIL import Image, ImageOps

from ..errors import UserError, first_line
from .buckets import fit_mask_to_bucket
from .data import _ALPHA_MODES, _to_8bit, list_image_files

if TYPE_CHECKING:
    from .config import TrainConfig
    from .data import ImageRecord

# EXIF orientations that swap width and height (transpose, rotate 90/270, transverse).
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
_SHOWN = 3  # file names an error or warning lists before "and N more"


def _oriented_size(path: str) -> tuple[int, int]:
    """(width, height) of an image as `load_rgb` sees it (EXIF orientation applied), from its header."""
    with Image.open(path) as img:
        width, height = img.size
        orientation = img.getexif().get(0x0112, 1)
    return (height, width) if orientation in _SWAPPING_ORIENTATIONS else (width, height)


def has_alpha(path: str) -> bool:
    """Whether the image file has an alpha channel (RGBA, LA, palette with transparency...): what
    `--alpha_mask` trains with. The app can ask this of uploads to decide on `alpha_mask`."""
    try:
        with Image.open(path) as img:
            return img.mode in _ALPHA_MODES or (img.mode == "P" and "transparency" in img.info)
    except Exception:  # unreadable files are reported by the image checks
        return False


def _open_oriented(path: str) -> Image.Image:
    with Image.open(path) as img:
        img.load()
        return ImageOps.exif_transpose(img)


def read_mask_file(path: str) -> Image.Image:
    """A mask image as mode "L": its red channel (kohya's choice; a grayscale mask is its gray),
    EXIF orientation applied like its image's, 16-bit files scaled to 8 bits."""
    return _to_8bit(_open_oriented(path)).convert("RGB").getchannel("R")


def read_alpha(path: str) -> Optional[Image.Image]:
    """The alpha channel of an image as mode "L" (EXIF orientation applied), None when it has none."""
    img = _open_oriented(path)
    if img.mode in _ALPHA_MODES or (img.mode == "P" and "transparency" in img.info):
        return img.convert("RGBA").getchannel("A")
    return None


def _names(paths: Sequence[str]) -> str:
    shown = ", ".join(repr(os.path.basename(p)) for p in paths[:_SHOWN])
    return shown + (f" and {len(paths) - _SHOWN} more" if len(paths) > _SHOWN else "")


class LossMasks:
    """Where each masked image's loss mask comes from: {image path: mask file}, where with `alpha`
    the mask file is the image itself (its alpha channel). Images it does not list (class images,
    images without alpha) are unmasked."""

    def __init__(self, files: dict[str, str], alpha: bool = False):
        self.files = dict(files)
        self.alpha = alpha

    def source(self, record: ImageRecord) -> Optional[str]:
        """The file the mask of `record` is read from, None: unmasked."""
        return self.files.get(record.path)

    def load(self, record: ImageRecord) -> Optional[Image.Image]:
        """The mask of `record` at its image's size (mode "L"), None when it trains whole."""
        path = self.files.get(record.path)
        if path is None:
            return None
        return read_alpha(path) if self.alpha else read_mask_file(path)

    def view(self, record: ImageRecord, bucket: tuple[int, int], crop_top_left: tuple[int, int], *,
             flip: bool = False, resample=Image.Resampling.LANCZOS) -> torch.Tensor:
        """The mask of `record` under the resize, crop and flip its image got: uint8 (1, H, W); all
        255 (train everything) for an image without a mask."""
        mask = self.load(record)
        if mask is None:
            width, height = bucket
            return torch.full((1, height, width), 255, dtype=torch.uint8)
        return fit_mask_to_bucket(mask, bucket, crop_top_left, flip=flip, resample=resample)

    def cache_key(self, record: ImageRecord) -> list:
        """What a cached entry's mask depends on (the mask file, its size and mtime), for the disk
        cache's file names: a changed mask file is a new entry."""
        path = self.source(record)
        if path is None:
            return ["unmasked"]
        stat = os.stat(path)
        return ["alpha" if self.alpha else "file", os.path.abspath(path), stat.st_size, stat.st_mtime_ns]


def find_loss_masks(cfg: TrainConfig, records: Sequence[ImageRecord]) -> tuple[Optional[LossMasks], list[str]]:
    """The run's `LossMasks` (None without `--masked_loss` / `--alpha_mask`) and warnings.

    `UserError` for what would train wrongly: an image without its mask file, two mask files for one
    image, a mask of another size than its image, an unreadable mask, `--alpha_mask` when no image
    has an alpha channel. Cheap (file headers, and each mask decoded once to find empty ones), so it
    runs before anything is loaded or written.
    """
    if cfg.alpha_mask:
        return _alpha_masks(records)
    if not cfg.masked_loss:
        return None, []
    return _file_masks(cfg.conditioning_data_dir, records)


def _alpha_masks(records: Sequence[ImageRecord]) -> tuple[LossMasks, list[str]]:
    without = [r.path for r in records if not has_alpha(r.path)]
    if len(without) == len(records):
        raise UserError(f"--alpha_mask: none of the {len(records)} instance image(s) has an alpha channel "
                        f"(transparency), e.g. {_names(without)}, so nothing would be masked: save them as PNG or "
                        "WebP with a transparent background, or drop --alpha_mask")
    warnings = []
    if without:
        warnings.append(f"--alpha_mask: {len(without)} of {len(records)} instance image(s) have no alpha channel "
                        f"and train whole: {_names(without)}")
    return LossMasks({r.path: r.path for r in records if has_alpha(r.path)}, alpha=True), warnings


def _file_masks(folder: str, records: Sequence[ImageRecord]) -> tuple[LossMasks, list[str]]:
    flag = "--conditioning_data_dir"
    by_stem: dict[str, list[str]] = {}
    for path in list_image_files(folder):
        by_stem.setdefault(os.path.splitext(os.path.basename(path))[0], []).append(path)
    files, missing = {}, []
    for record in records:
        stem = os.path.splitext(os.path.basename(record.path))[0]
        found = by_stem.get(stem, [])
        if not found:
            missing.append(record.path)
            continue
        if any(os.path.abspath(path) == os.path.abspath(record.path) for path in found):
            raise UserError(f"{flag}: folder {folder!r} holds the training images themselves: put the masks in a "
                            "folder of their own, one per image with its file name")
        if len(found) > 1:
            raise UserError(f"{flag}: {len(found)} mask files for image {os.path.basename(record.path)!r} "
                            f"({_names(found)}) in folder {folder!r}: keep one")
        files[record.path] = found[0]
    if missing:
        raise UserError(f"{flag}: no mask for {len(missing)} of {len(records)} instance image(s): {_names(missing)}; "
                        f"each image needs a mask of the same name (any image extension) in folder {folder!r}")
    warnings, empty = [], []
    for image, mask in files.items():
        try:
            mask_size = _oriented_size(mask)
            pixels = read_mask_file(mask)
        except Exception as err:  # PIL raises many types for broken files
            raise UserError(f"{flag}: cannot read mask {mask!r}: {first_line(err)}") from None
        image_size = _oriented_size(image)
        if mask_size != image_size:
            raise UserError(f"{flag}: mask {os.path.basename(mask)!r} is {mask_size[0]}x{mask_size[1]} but its image "
                            f"{os.path.basename(image)!r} is {image_size[0]}x{image_size[1]}: a mask must have its "
                            "image's size (white trains, black is ignored)")
        if pixels.getextrema()[1] == 0:
            empty.append(mask)
    if empty:
        warnings.append(f"{flag}: {len(empty)} mask(s) are black everywhere, so their images teach nothing: "
                        f"{_names(empty)}")
    used = set(files.values())
    extra = [p for stem_paths in by_stem.values() for p in stem_paths if p not in used]
    if extra:
        warnings.append(f"{flag}: {len(extra)} mask file(s) match no instance image and are not used: {_names(extra)}")
    return LossMasks(files), warnings


def latent_weights(masks: torch.Tensor, size: tuple[int, int], dtype=torch.float32) -> torch.Tensor:
    """Pixel masks (uint8 (B, 1, H, W)) as loss weights at latent `size`: each latent cell gets the
    mean of the pixels it covers (area interpolation, kohya's), scaled to [0, 1]."""
    import torch.nn.functional as F

    weights = masks.to(dtype) / 255.0
    return F.interpolate(weights, size=tuple(size), mode="area")


def masked_mse(pred: torch.Tensor, target: torch.Tensor, masks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-image mean squared error (B,) in float32; with `masks` (uint8 (B, 1, H, W) at pixel size)
    each element is weighted by its latent cell's mask before the mean (not renormalised: kohya's)."""
    import torch.nn.functional as F

    loss = F.mse_loss(pred.float(), target.float(), reduction="none")
    if masks is not None:
        loss = loss * latent_weights(masks.to(loss.device), loss.shape[-2:])
    return loss.mean(dim=list(range(1, loss.ndim)))


__all__ = ["LossMasks", "find_loss_masks", "has_alpha", "latent_weights", "masked_mse", "read_alpha",
           "read_mask_file"]
