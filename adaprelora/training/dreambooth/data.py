"""DreamBooth images: finding them, captions, preprocessing with PIL/numpy, the dataset and collate.

- Images are PNG, JPEG or WebP files of any size. EXIF orientation is applied; transparent images
  (RGBA, LA, palette with transparency) are flattened on white; 16-bit grayscale is scaled to 8 bits;
  CMYK goes through its ICC profile when it has one; everything becomes RGB. Floating-point images
  are refused (`UnsupportedImage`), never trained on with guessed pixels.
- A caption file next to an image (`photo.txt`, or `photo.png.txt`) replaces the instance prompt
  for that image; otherwise `--instance_prompt` is used.
- With `--dataset_config` (kohya's TOML, `dataset_config`) the images come from its subsets: each
  record carries its `Subset` (repeats, caption options, flip and crop), reg subsets are the class
  images, and an image without a caption file is trained with its subset's `class_tokens`.
- Captions go through `captions.process_caption` each step (tag shuffling, `--keep_tokens`...),
  seeded like the crops.
- Files that cannot be decoded are skipped with a warning that names each one; a folder with no
  usable image is a `UserError` naming the folder.
- Resize (shorter side to `resolution`, or into an aspect-ratio bucket: `buckets`), crop (center or
  random), optional random flip and scale to [-1, 1] use PIL and numpy only (no torchvision).
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Optional, Sequence

import torch
from PIL import Image, ImageOps

from ..errors import UserError, first_line
from .buckets import fit_to_bucket
from .captions import CaptionOptions, process_caption

if TYPE_CHECKING:
    from .config import TrainConfig
    from .dataset_config import Subset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
CAPTION_EXTENSION = ".txt"

_RESAMPLING = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


@dataclass(frozen=True)
class ImageRecord:
    """One training image: its path, its own caption (None: use the run's prompt) and, from a dataset
    config, its subset (whose settings then apply to it)."""

    path: str
    caption: Optional[str] = None
    subset: Optional["Subset"] = None


def is_image_file(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


class UnsupportedImage(ValueError):
    """An image whose pixels cannot be turned into RGB without guessing (e.g. floating-point data)."""


# Modes with an alpha channel (premultiplied ones included): flattened on white.
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def load_rgb(path: str) -> Image.Image:
    """Open an image fully decoded, EXIF orientation applied, alpha flattened on white, as RGB.

    16-bit grayscale (PNG's `I;16`, or `I` in older Pillow) is scaled to 8 bits (65535 -> 255)
    instead of clipped, which would turn nearly every pixel white. CMYK with an embedded ICC profile
    is converted through it. Floating-point images and 32-bit integers beyond 16-bit range raise
    `UnsupportedImage` naming the mode. Other errors (OSError...) when the file cannot be decoded.
    """
    with Image.open(path) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
    img = _to_8bit(img)
    has_alpha = img.mode in _ALPHA_MODES or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    elif img.mode == "CMYK" and img.info.get("icc_profile"):
        img = _cmyk_through_profile(img)
    return img.convert("RGB")


def _to_8bit(img: Image.Image) -> Image.Image:
    """Integer images wider than 8 bits as 8-bit grayscale `L`; other modes unchanged."""
    import numpy as np

    if img.mode == "F":
        raise UnsupportedImage("floating-point pixels (mode F): save it as an 8-bit PNG or JPEG")
    if not (img.mode == "I" or img.mode.startswith("I;16")):
        return img
    pixels = np.asarray(img).astype(np.int64)
    if pixels.size and (pixels.min() < 0 or pixels.max() > 65535):
        raise UnsupportedImage(f"32-bit integer pixels outside 0..65535 (mode {img.mode}): save it as an 8-bit PNG")
    return Image.fromarray(np.round(pixels / 257.0).astype(np.uint8), mode="L")


def _cmyk_through_profile(img: Image.Image) -> Image.Image:
    """A CMYK image converted to sRGB with its own ICC profile (Pillow's plain conversion ignores it)."""
    import io

    from PIL import ImageCms

    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(img.info["icc_profile"]))
        return ImageCms.profileToProfile(img, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except Exception:  # a broken profile: the plain conversion is still a picture
        return img


def read_caption(image_path: str, extension: str = CAPTION_EXTENSION, keep_lines: bool = False) -> Optional[str]:
    """The caption in `<stem><extension>` or `<image file name><extension>` next to the image, if
    non-empty. Whitespace is collapsed; with `keep_lines` each non-empty line stays a line (kohya's
    multi-line captions, for wildcards)."""
    stem, _ = os.path.splitext(image_path)
    for candidate in (stem + extension, image_path + extension):
        if os.path.isfile(candidate):
            with open(candidate, encoding="utf-8", errors="replace") as fh:
                lines = [" ".join(line.split()) for line in fh.read().splitlines()]
            text = "\n".join(line for line in lines if line) if keep_lines else " ".join(" ".join(lines).split())
            if text:
                return text
    return None


def _check_readable(paths: Iterable[str]) -> tuple[list[str], list[str]]:
    """Split `paths` into decodable images and warnings (one per unreadable file, naming it and why)."""
    good, warnings = [], []
    for path in paths:
        try:
            load_rgb(path)
        except Exception as err:  # PIL raises many types for broken files
            warnings.append(f"skipping unreadable image {path}: {_reason(err)}")
            continue
        good.append(path)
    return good, warnings


def _reason(err: BaseException) -> str:
    """Why an image could not be used, in words (PIL's messages often repeat the path)."""
    text = first_line(err)
    if isinstance(err, Image.UnidentifiedImageError) or text.startswith("cannot identify image file"):
        return "not an image PIL can decode (broken, empty or another format)"
    if isinstance(err, Image.DecompressionBombError):
        return f"too large ({text})"
    return text


def list_image_files(folder: str) -> list[str]:
    """Image files (by extension) directly in `folder`, sorted; hidden files are ignored."""
    names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
    return [os.path.join(folder, n) for n in names if is_image_file(n) and os.path.isfile(os.path.join(folder, n))]


def scan_instance_images(
    folder: Optional[str] = None,
    files: Optional[Sequence[str]] = None,
    captions: Optional[dict] = None,
    flag: str = "--instance_data_dir",
) -> tuple[list[ImageRecord], list[str]]:
    """Find the usable images of a run and their captions.

    Either `folder` (every PNG/JPEG/WebP in it) or `files` (explicit paths) and optional
    `captions` {path: caption}. Returns (records, warnings). Raises `UserError` naming the folder
    when it is missing or empty, or when no image can be decoded.
    """
    captions = captions or {}
    if files:
        where = "the given image files"
        missing = [f for f in files if not os.path.isfile(f)]
        candidates = [f for f in files if os.path.isfile(f)]
        pre_warnings = [f"skipping missing image file {f}" for f in missing]
    else:
        if not folder:
            raise UserError(f"{flag} is required (a folder of PNG/JPEG/WebP images)")
        where = f"folder {folder!r}"
        if not os.path.isdir(folder):
            raise UserError(f"{flag}: folder {folder!r} does not exist")
        candidates = list_image_files(folder)
        pre_warnings = []
        if not candidates:
            raise UserError(f"{flag}: no PNG, JPEG or WebP image in folder {folder!r}")
    good, warnings = _check_readable(candidates)
    warnings = pre_warnings + warnings
    if not good:
        first = warnings[0].removeprefix("skipping ")
        more = f" (and {len(warnings) - 1} more unreadable or missing)" if len(warnings) > 1 else ""
        raise UserError(f"{flag}: no usable image in {where}: {first}{more}")
    records = []
    for path in good:
        caption = captions.get(path)
        caption = " ".join(caption.split()) if caption else None
        records.append(ImageRecord(path, caption or read_caption(path)))
    return records, warnings


def scan_dataset_config(config: TrainConfig) -> tuple[list[ImageRecord], list[ImageRecord], list[str]]:
    """(instance records, regularisation records, warnings) of `--dataset_config`'s subsets, one
    record per image (repeats are applied by the dataset), each with its subset and its caption (the
    caption file, else the subset's `class_tokens`). `UserError` naming the file and the subset
    when a subset has no usable image or an image has neither caption nor `class_tokens`."""
    from .dataset_config import load_dataset_config

    dataset = load_dataset_config(config.dataset_config, config)
    instance, reg, warnings = [], [], []
    for subset in dataset.subsets:
        where = f"--dataset_config {dataset.path}: {subset.where}.image_dir"
        good, bad = _check_readable(list_image_files(subset.image_dir))
        warnings += bad
        if not good:
            raise UserError(f"{where}: no usable image in folder {subset.image_dir!r}: {bad[0].removeprefix('skipping ')}")
        records = [ImageRecord(p, read_caption(p, subset.caption_extension, keep_lines=True) or subset.class_tokens,
                               subset) for p in good]
        uncaptioned = [r.path for r in records if not r.caption]
        if uncaptioned:
            raise UserError(f"--dataset_config {dataset.path}: {subset.where}.class_tokens is missing and "
                            f"{len(uncaptioned)} image(s) in {subset.image_dir!r} have no caption file "
                            f"(<image>{subset.caption_extension}), e.g. {os.path.basename(uncaptioned[0])!r}")
        (reg if subset.is_reg else instance).extend(records)
    return instance, reg, warnings


def check_instance_data(config: TrainConfig) -> tuple[list[ImageRecord], list[str]]:
    """The usable instance images and warnings; `UserError` when none is usable or a prompt is
    missing. Cheap (PIL only): the CLI and the app can call it before starting a run. With
    `--dataset_config`: the images of its training (not `is_reg`) subsets."""
    if config.dataset_config:
        instance, _, warnings = scan_dataset_config(config)
        return instance, warnings
    records, warnings = scan_instance_images(
        folder=None if config.instance_images else config.instance_data_dir,
        files=config.instance_images,
        captions=config.instance_captions,
    )
    if not config.instance_prompt:
        uncaptioned = [r.path for r in records if not r.caption]
        if uncaptioned:
            where = f"folder {config.instance_data_dir!r}" if not config.instance_images else "the given images"
            raise UserError(
                f"--instance_prompt is required: {len(uncaptioned)} image(s) in {where} have no caption "
                f"file (<image>.txt), e.g. {os.path.basename(uncaptioned[0])!r}"
            )
    return records, warnings


def check_reg_data(config: TrainConfig) -> tuple[list[ImageRecord], list[str]]:
    """The images of `--dataset_config`'s `is_reg` subsets (prior preservation) and warnings."""
    _, reg, warnings = scan_dataset_config(config)
    return reg, warnings


def expand_repeats(records: Sequence[ImageRecord]) -> list[ImageRecord]:
    """Each record as many times as its subset's `num_repeats` (once without a subset)."""
    return [r for r in records for _ in range(r.subset.num_repeats if r.subset else 1)]


def scan_class_images(folder: str) -> tuple[list[ImageRecord], list[str]]:
    """Usable images already in the class folder (may be none). A class image with a caption file
    (kohya's captioned regularization images) is trained with that caption instead of
    `--class_prompt`, so the prior can cover many prompts, not one."""
    if not os.path.isdir(folder):
        return [], []
    good, warnings = _check_readable(list_image_files(folder))
    return [ImageRecord(p, read_caption(p)) for p in good], warnings


def preprocess(
    img: Image.Image,
    resolution: int,
    center_crop: bool = False,
    interpolation: str = "lanczos",
    rng: Optional[random.Random] = None,
) -> torch.Tensor:
    """Resize the shorter side to `resolution`, crop a square, scale to [-1, 1]: float32 (3, H, W)
    (the square bucket of `fit_to_bucket`)."""
    return fit_to_bucket(img, (resolution, resolution), center_crop=center_crop,
                         resample=_RESAMPLING[interpolation], rng=rng)[0]


class DreamBoothDataset(torch.utils.data.Dataset):
    """Instance images with their prompts and, with prior preservation, class images.

    Its length is the larger of the two counts (diffusers' convention); item `i` pairs instance
    image `i % n_instance` with class image `i % n_class`. With `seed`, random crops and flips
    depend only on (seed, epoch, index), so a resumed run sees exactly what an uninterrupted one
    does; call `set_epoch` at the start of each epoch.

    Images are cropped square at `resolution`, or, with `buckets` (a list of (width, height)),
    resized into the bucket nearest each instance image's shape (`item_buckets`; an item's class
    image goes to the same bucket so the two stack). Each example also carries the original size
    and crop top-left of its images (SDXL's time ids). After `set_latents` (see `latent_cache`)
    examples hold the cached VAE latents instead of pixels. `caption_dropout_rate` and
    `class_caption_dropout_rate` give that share of items the empty prompt (seeded like the crops);
    `caption_options` (tag shuffling...) apply to every caption, seeded the same way. A record with
    a `subset` (dataset config) uses the subset's caption options, caption dropout, flip and crop
    instead (pass the records already repeated: `expand_repeats`).
    """

    def __init__(
        self,
        instance_records: Sequence[ImageRecord],
        instance_prompt: Optional[str],
        resolution: int,
        center_crop: bool = False,
        interpolation: str = "lanczos",
        class_records: Optional[Sequence[ImageRecord]] = None,
        class_prompt: Optional[str] = None,
        seed: Optional[int] = None,
        random_flip: bool = False,
        buckets: Optional[Sequence[tuple[int, int]]] = None,
        bucket_reso_steps: int = 64,
        bucket_no_upscale: bool = False,
        caption_dropout_rate: float = 0.0,
        class_caption_dropout_rate: float = 0.0,
        masks=None,
        caption_options: Optional[CaptionOptions] = None,
    ):
        if not instance_records:
            raise ValueError("no instance images")
        self.instance_records = list(instance_records)
        self.instance_prompt = instance_prompt
        self.class_records = list(class_records or [])
        self.class_prompt = class_prompt
        self.resolution = resolution
        self.center_crop = center_crop
        self.interpolation = interpolation
        self.seed = seed
        self.random_flip = random_flip
        self.caption_dropout_rate = caption_dropout_rate
        self.class_caption_dropout_rate = class_caption_dropout_rate
        self.caption_options = caption_options or CaptionOptions()
        self.epoch = 0
        self.latents: Optional[dict] = None
        self.masks = masks  # masks.LossMasks (--masked_loss / --alpha_mask): each view carries its loss mask
        if buckets:
            from .buckets import bucket_for

            by_path: dict = {}  # repeated records: each image read once
            for r in self.instance_records:
                if r.path not in by_path:
                    by_path[r.path] = bucket_for(load_rgb(r.path).size, buckets, resolution=resolution,
                                                 step=bucket_reso_steps, no_upscale=bucket_no_upscale)
            self.instance_buckets = [by_path[r.path] for r in self.instance_records]
        else:
            self.instance_buckets = [(resolution, resolution)] * len(self.instance_records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def prompt_for(self, record: ImageRecord) -> str:
        return record.caption or self.instance_prompt or ""

    def _caption_options(self, record: ImageRecord) -> CaptionOptions:
        return record.subset.caption if record.subset else self.caption_options

    def _prompt(self, record: ImageRecord, index: int, kind: str) -> str:
        """The prompt of item `index`'s `kind` ("instance" or "class") image this epoch: empty when
        its caption is dropped, else its caption (or the run's prompt) through the caption options."""
        subset = record.subset
        if subset is not None:
            rate = subset.caption_dropout_rate
            every = subset.caption_dropout_every_n_epochs
            if every and (self.epoch + 1) % every == 0:  # kohya counts epochs from 1
                return ""
        else:
            rate = self.caption_dropout_rate if kind == "instance" else self.class_caption_dropout_rate
        if self._dropped(rate, index, kind):
            return ""
        caption = record.caption or (self.instance_prompt if kind == "instance" else self.class_prompt) or ""
        options = self._caption_options(record)
        if options == CaptionOptions():
            return caption
        seed = f"{self.seed}-{self.epoch}-{index}-{kind}-tags" if self.seed is not None else None
        return process_caption(caption, options, random.Random(seed))

    def cacheable_prompts(self) -> Optional[set[str]]:
        """Every prompt the items can be trained with (for a prompt-embedding cache), or None when
        captions change from step to step (shuffled tags, tag dropout, wildcards)."""
        prompts: set[str] = set()
        for kind, records in (("instance", self.instance_records), ("class", self.class_records)):
            rate = self.caption_dropout_rate if kind == "instance" else self.class_caption_dropout_rate
            for record in dict.fromkeys(records):
                options = self._caption_options(record)
                if options.varies:
                    return None
                caption = record.caption or (self.instance_prompt if kind == "instance" else self.class_prompt) or ""
                prompts.add(process_caption(caption, options, random.Random(0)))
                subset = record.subset
                if (subset.caption_dropout_rate or subset.caption_dropout_every_n_epochs) if subset else rate:
                    prompts.add("")
        return prompts

    def __len__(self) -> int:
        return max(len(self.instance_records), len(self.class_records))

    @property
    def item_buckets(self) -> list[tuple[int, int]]:
        """(width, height) of every item's images, in index order."""
        return [self.instance_buckets[i % len(self.instance_records)] for i in range(len(self))]

    def views(self) -> list[tuple[ImageRecord, tuple[int, int]]]:
        """Every distinct (image, bucket) the items use: what a latent cache has to encode."""
        seen = {}
        for index, bucket in enumerate(self.item_buckets):
            seen.setdefault((self.instance_records[index % len(self.instance_records)], bucket), None)
            if self.class_records:
                seen.setdefault((self.class_records[index % len(self.class_records)], bucket), None)
        return list(seen)

    def load_view(self, record: ImageRecord, bucket: tuple[int, int], rng=None) -> tuple[torch.Tensor, tuple, tuple]:
        """(pixels, original (h, w), crop top-left (top, left)) of `record` fitted to `bucket`; with loss
        masks a 4th item, its mask (uint8 (1, H, W)) under the same resize, crop and flip."""
        subset = record.subset
        flip = (subset.flip_aug if subset else self.random_flip) and (rng or random).random() < 0.5
        center_crop = not subset.random_crop if subset else self.center_crop
        resample = _RESAMPLING[self.interpolation]
        view = fit_to_bucket(load_rgb(record.path), bucket, center_crop=center_crop, resample=resample,
                             rng=rng, flip=flip)
        if self.masks is None:
            return view
        return view + (self.masks.view(record, bucket, view[2], flip=flip, resample=resample),)

    def set_latents(self, latents: dict) -> None:
        """Serve cached latents: {(record, bucket): (latent parameters, original size, crop top-left[, mask])}."""
        self.latents = latents

    def _view(self, record: ImageRecord, bucket, rng) -> tuple[torch.Tensor, tuple, tuple]:
        if self.latents is not None:
            return self.latents[(record, bucket)]
        return self.load_view(record, bucket, rng)

    def _dropped(self, rate: float, index: int, kind: str) -> bool:
        """Whether item `index` trains on the empty prompt this epoch (seeded like the crops, from
        its own stream so that a rate of 0 changes nothing else)."""
        if rate <= 0:
            return False
        rng = random.Random(f"{self.seed}-{self.epoch}-{index}-{kind}-caption") if self.seed is not None else random
        return rng.random() < rate

    def __getitem__(self, index: int) -> dict:
        rng = random.Random(f"{self.seed}-{self.epoch}-{index}") if self.seed is not None else None
        record = self.instance_records[index % len(self.instance_records)]
        bucket = self.instance_buckets[index % len(self.instance_records)]
        kind = "latents" if self.latents is not None else "pixel_values"
        values, original, crop, *mask = self._view(record, bucket, rng)
        example = {f"instance_{kind}": values, "instance_original_size": original, "instance_crop_top_left": crop,
                   "instance_prompt": self._prompt(record, index, "instance"), **({"instance_mask": mask[0]} if mask else {})}
        if self.class_records:
            class_record = self.class_records[index % len(self.class_records)]
            values, original, crop, *mask = self._view(class_record, bucket, rng)
            example.update({f"class_{kind}": values, **({"class_mask": mask[0]} if mask else {})},
                           class_original_size=original, class_crop_top_left=crop,
                           class_prompt=self._prompt(class_record, index, "class"))
        return example


def collate_fn(examples: list[dict], with_prior_preservation: bool = False) -> dict:
    """Stack a batch: {"pixel_values" (or "latent_params" when latents are cached): (B, C, H, W),
    "prompts": [str] * B, "original_sizes" and "crop_top_lefts": [(int, int)] * B}.

    With prior preservation the class examples follow the instance ones (batch of 2B), so the loss
    can split the prediction in two halves. With loss masks, "masks": uint8 (B, 1, H, W) at pixel size.
    """
    kinds = ["instance"] + (["class"] if with_prior_preservation else [])
    cached = "instance_latents" in examples[0]
    values = [e[f"{k}_{'latents' if cached else 'pixel_values'}"] for k in kinds for e in examples]
    batch = {
        "latent_params" if cached else "pixel_values": torch.stack(values).contiguous().float(),
        "prompts": [e[f"{k}_prompt"] for k in kinds for e in examples],
        "original_sizes": [tuple(e[f"{k}_original_size"]) for k in kinds for e in examples],
        "crop_top_lefts": [tuple(e[f"{k}_crop_top_left"]) for k in kinds for e in examples],
    }
    if "instance_mask" in examples[0]:
        batch["masks"] = torch.stack([e[f"{k}_mask"] for k in kinds for e in examples])
    return batch


__all__ = [
    "IMAGE_EXTENSIONS", "ImageRecord", "DreamBoothDataset", "UnsupportedImage", "build_dataloader", "collate_fn", "is_image_file", "list_image_files",
    "load_rgb", "preprocess", "read_caption", "scan_class_images", "scan_instance_images",
    "check_reg_data", "expand_repeats", "scan_dataset_config",
]


def build_dataloader(cfg: TrainConfig, instance_records, class_records,
                     masks=None) -> tuple[DreamBoothDataset, object, str]:
    """The dataset and DataLoader of a run, and the bucket table to print ("" without buckets).

    Square crops: a shuffling DataLoader; buckets: `BucketBatchSampler`, batches of one bucket
    each. Both loaders have their own seeded generator: starting an epoch then draws nothing from
    the global RNG (which checkpoints restore), so a resumed run draws the same noise as an
    uninterrupted one. Records from a dataset config are repeated by their subset's `num_repeats`,
    and the regularisation items are cut to the number of training items (kohya's epoch: as many
    of each; reg items beyond that are not used).
    """
    import functools

    from .buckets import BucketBatchSampler, bucket_table, make_buckets

    buckets = (make_buckets(cfg.resolution, cfg.min_bucket_reso, cfg.max_bucket_reso, cfg.bucket_reso_steps)
               if cfg.enable_bucket else None)
    instance_records = expand_repeats(instance_records)
    if cfg.dataset_config:
        class_records = expand_repeats(class_records)[:len(instance_records)]
    dataset = DreamBoothDataset(
        instance_records, cfg.instance_prompt, cfg.resolution, center_crop=cfg.center_crop,
        interpolation=cfg.image_interpolation_mode, class_records=class_records, class_prompt=cfg.class_prompt,
        seed=cfg.seed, random_flip=cfg.random_flip, buckets=buckets, bucket_reso_steps=cfg.bucket_reso_steps,
        bucket_no_upscale=cfg.bucket_no_upscale, caption_dropout_rate=cfg.caption_dropout_rate,
        class_caption_dropout_rate=cfg.class_caption_dropout_rate, masks=masks,
        caption_options=CaptionOptions(shuffle_caption=cfg.shuffle_caption, keep_tokens=cfg.keep_tokens,
                                       caption_separator=cfg.caption_separator),
    )
    collate = functools.partial(collate_fn, with_prior_preservation=cfg.with_prior_preservation)
    seed = cfg.seed if cfg.seed is not None else 0
    if buckets:
        sampler = BucketBatchSampler(dataset.item_buckets, cfg.train_batch_size, seed=seed)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                             num_workers=cfg.dataloader_num_workers,
                                             generator=torch.Generator().manual_seed(seed))
        return dataset, loader, bucket_table(dataset.item_buckets, cfg.train_batch_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.train_batch_size, shuffle=True, collate_fn=collate,
                                         num_workers=cfg.dataloader_num_workers,
                                         generator=torch.Generator().manual_seed(seed))
    return dataset, loader, ""
