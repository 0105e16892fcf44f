"""The Train and Generate forms -> checked settings: uploads, numbers, captions, `TrainConfig`.

Every check raises `gr.Error` with a message that says what to change. The form checks what only
the app knows (uploads, its ranges for a web page); `TrainConfig.validate()` then checks the run's
settings as it does for the command line, its messages reworded for the page.
"""
from __future__ import annotations

import math
import os
from typing import Any, Optional

import gradio as gr

MAX_UPLOAD_BYTES = 50 * 1024 * 1024
MAX_IMAGES = 200


# -- uploads ---------------------------------------------------------------------------------------
def as_paths(images: Any) -> list[str]:
    """Gradio gives a list of paths (or one path, or file dicts from some clients)."""
    if images is None:
        return []
    if isinstance(images, (str, os.PathLike, dict)):
        images = [images]
    paths = []
    for item in images:
        if isinstance(item, dict):
            item = item.get("path") or item.get("name")
        elif hasattr(item, "name") and not isinstance(item, (str, os.PathLike)):
            item = item.name
        if item:
            paths.append(os.fspath(item))
    return paths


def upload_folder() -> str:
    from gradio.utils import get_upload_folder

    return os.path.realpath(get_upload_folder())


def _inside(path: str, folder: str) -> bool:
    real = os.path.realpath(path)
    return os.path.commonpath([real, folder]) == folder


def check_uploaded_images(images: Any, upload_root: Optional[str] = None) -> list[str]:
    """The uploaded images as paths, each one checked to be a readable image in Gradio's upload
    folder. Raises `gr.Error` naming the first bad file."""
    from PIL import Image, UnidentifiedImageError

    paths = as_paths(images)
    if not paths:
        raise gr.Error("Upload at least one image of your subject (PNG, JPEG or WebP; 3 to 20 photos work well).")
    if len(paths) > MAX_IMAGES:
        raise gr.Error(f"{len(paths)} images is too many for one run; upload at most {MAX_IMAGES}.")
    root = upload_root or upload_folder()
    for path in paths:
        shown = os.path.basename(path)
        if not _inside(path, root) or not os.path.isfile(path):
            raise gr.Error(f"`{shown}` was not uploaded through this page; upload the image again.")
        if os.path.getsize(path) > MAX_UPLOAD_BYTES:
            raise gr.Error(f"`{shown}` is larger than {MAX_UPLOAD_BYTES // 2**20} MB; use a smaller image.")
        try:
            with Image.open(path) as img:
                img.verify()
            with Image.open(path) as img:  # verify() does not decode pixels: a truncated file passes it
                img.load()
                width, height = img.size
        except (UnidentifiedImageError, Image.DecompressionBombError) as err:
            reason = "it is too large" if isinstance(err, Image.DecompressionBombError) else "it is not an image"
            raise gr.Error(f"`{shown}` cannot be used: {reason}. Upload PNG, JPEG or WebP photos.") from None
        except Exception as err:  # truncated or corrupt data
            raise gr.Error(f"`{shown}` could not be read as an image ({err}). Upload it again or use another photo.") from None
        if min(width, height) < 8:
            raise gr.Error(f"`{shown}` is only {width}x{height} pixels; use real photos.")
    return paths


def captions_by_image(paths: list[str], captions: Any) -> dict[str, str]:
    """Rows of the caption table [[file name, caption], ...] -> {path: caption} (empty ones dropped).

    Rows match images in upload order; a table of another length matches by file name."""
    rows = []
    if captions is None:
        return {}
    if hasattr(captions, "values") and hasattr(captions, "columns"):  # a pandas DataFrame
        captions = captions.values.tolist()
    if isinstance(captions, dict) and "data" in captions:
        captions = captions["data"]
    for row in captions or []:
        if isinstance(row, (list, tuple)) and len(row) >= 2:
            rows.append((str(row[0] or ""), str(row[1] or "").strip()))
    out: dict[str, str] = {}
    if len(rows) == len(paths):
        for path, (_, caption) in zip(paths, rows):
            if caption:
                out[path] = caption
        return out
    by_name = {name: caption for name, caption in rows if caption}
    for path in paths:
        caption = by_name.get(os.path.basename(path))
        if caption:
            out[path] = caption
    return out


# -- numbers ---------------------------------------------------------------------------------------
def _number(value: Any, label: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise gr.Error(f"{label} must be a number, got {value!r}.") from None
    if not math.isfinite(number):
        raise gr.Error(f"{label} must be a finite number, got {value!r}.")
    return number


def whole(value: Any, label: str, low: Optional[float] = None, high: Optional[float] = None, hint: str = "") -> int:
    """A whole number from a form field, optionally within [low, high]."""
    number = _number(value, label)
    if number != int(number):
        raise gr.Error(f"{label} must be a whole number, got {value!r}.")
    return in_range(int(number), low, high, label, hint)


def real(value: Any, label: str, low: Optional[float] = None, high: Optional[float] = None, hint: str = "") -> float:
    """A finite number from a form field, optionally within [low, high]."""
    return in_range(_number(value, label), low, high, label, hint)


def in_range(value, low, high, label: str, hint: str = ""):
    if low is not None and not low <= value <= high:
        raise gr.Error(f"{label} must be between {low:g} and {high:g}, got {value:g}.{(' ' + hint) if hint else ''}")
    return value


# -- the Train form --------------------------------------------------------------------------------
# TrainConfig's messages name the CLI's flags; on the page, the fields.
_FLAG_LABELS = {
    "--pretrained_model_name_or_path": "the base model (--base-model)",
    "--resolution": "Resolution",
    "--learning_rate": "Learning rate",
    "--rank": "LoRA rank",
    "--optimizer": "Optimizer",
}


def train_config(base_model: str, *, images, instance_prompt, max_train_steps, learning_rate, rank, optimizer,
                 resolution, captions, class_prompt, train_text_encoder, validation_prompt, validation_steps,
                 seed, num_samples, device_type: str, train_batch_size: int = 1,
                 num_class_images: Optional[int] = None, class_caption_dropout_rate: float = 0.0,
                 snr_gamma: Optional[float] = None):
    """The Train form as a checked `TrainConfig`, with the uploaded paths and their captions.

    The config's images and output folder are set when the uploads are staged (`jobs.stage_images`).
    """
    from adaprelora.training.dreambooth import TrainConfig
    from adaprelora.training.errors import UserError

    paths = check_uploaded_images(images)
    prompt = (instance_prompt or "").strip()
    if not prompt:
        raise gr.Error("Write an instance prompt with a trigger word, e.g. \"a photo of sks dog\".")
    steps = whole(max_train_steps, "Training steps", 1, 100_000, "A few hundred steps is typical.")
    lr = real(learning_rate, "Learning rate")
    if lr <= 0 or lr > 1:
        raise gr.Error(f"Learning rate must be above 0 and at most 1, got {lr:g}. 1e-4 is a good start.")
    rank = whole(rank, "LoRA rank", 1, 512, "4 to 32 is typical.")
    res = whole(resolution, "Resolution", 32, 2048, "Use 512 for SD 1.5.")
    val_steps = whole(validation_steps, "Sample interval", 1, 100_000)
    n_samples = whole(num_samples, "Sample images each time", 0, 8)
    class_prompt = (class_prompt or "").strip()
    config = TrainConfig(
        pretrained_model_name_or_path=base_model,
        instance_prompt=prompt,
        instance_images=paths,
        class_prompt=class_prompt or None,
        class_data_dir="class_images" if class_prompt else None,
        with_prior_preservation=bool(class_prompt),
        **({"num_class_images": num_class_images} if num_class_images else {}),
        class_caption_dropout_rate=class_caption_dropout_rate if class_prompt else 0.0,
        snr_gamma=snr_gamma,
        resolution=res,
        max_train_steps=steps,
        learning_rate=lr,
        rank=rank,
        optimizer=optimizer,
        train_text_encoder=bool(train_text_encoder),
        validation_prompt=((validation_prompt or "").strip() or prompt) if n_samples else None,
        validation_steps=min(val_steps, steps),
        num_validation_images=n_samples,
        seed=whole(seed, "Seed"),
        train_batch_size=train_batch_size,
        # About ten LoRA-only checkpoints per run (small files; two are kept), so that a run whose
        # app died can be resumed without losing much.
        checkpointing_steps=max(1, min(500, steps // 10)),
        checkpoints_total_limit=2,
        mixed_precision="fp16" if device_type == "cuda" else "no",
        report_to="none",
    )
    try:
        config.validate()
    except UserError as err:
        raise gr.Error(page_wording(str(err)) + ".") from None
    config.instance_images = None  # set to the staged copies before the run
    return config, paths, captions_by_image(paths, captions)


def page_wording(message: str) -> str:
    """A trainer's message (worded for the command line) with the page's names for its flags."""
    for flag, label in _FLAG_LABELS.items():
        message = message.replace(flag, label)
    return message


__all__ = ["MAX_IMAGES", "MAX_UPLOAD_BYTES", "as_paths", "captions_by_image", "check_uploaded_images",
           "in_range", "page_wording", "real", "train_config", "upload_folder", "whole"]
