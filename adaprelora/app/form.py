"""The Train and Generate forms -> checked settings: uploads, numbers, captions, `TrainConfig`.

Every check raises `gr.Error` with a message that says what to change. The form checks what only
the app knows (uploads, its ranges for a web page); `TrainConfig.validate()` then checks the run's
settings as it does for the command line, its messages reworded for the page.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import gradio as gr

from .defaults import MAX_SEED, TrainProfile

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
    """The uploaded images as paths, each one checked to be a PNG, JPEG or WebP file in Gradio's
    upload folder that the trainer's own loader reads. Raises `gr.Error` naming the first bad file.

    The formats are the command line's (`train_dreambooth.py` reads PNG, JPEG and WebP, by file
    extension), so a run from the page trains on what the same files would give there."""
    from PIL import Image, UnidentifiedImageError

    from adaprelora.training.dreambooth.data import is_image_file, load_rgb
    from adaprelora.training.errors import UserError

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
        if not is_image_file(path):
            kind = os.path.splitext(shown)[1].lstrip(".").upper()
            raise gr.Error(f"`{shown}` is {'a ' + kind + ' file' if kind else 'a file without an extension'}: "
                           "training reads PNG, JPEG and WebP only (as train_dreambooth.py does). Save it as PNG "
                           "or JPEG and upload that.")
        if os.path.getsize(path) > MAX_UPLOAD_BYTES:
            raise gr.Error(f"`{shown}` is larger than {MAX_UPLOAD_BYTES // 2**20} MB; use a smaller image.")
        try:
            with Image.open(path) as img:
                img.verify()
            width, height = load_rgb(path).size  # the trainer's loader: what it cannot use is refused here
        except (UnidentifiedImageError, Image.DecompressionBombError) as err:
            reason = "it is too large" if isinstance(err, Image.DecompressionBombError) else "it is not an image"
            raise gr.Error(f"`{shown}` cannot be used: {reason}. Upload PNG, JPEG or WebP photos.") from None
        except UserError as err:
            raise gr.Error(f"`{shown}` cannot be used: {err}.") from None
        except Exception as err:  # truncated or corrupt data
            raise gr.Error(f"`{shown}` could not be read as an image ({err}). Upload it again or use another photo.") from None
        if min(width, height) < 8:
            raise gr.Error(f"`{shown}` is only {width}x{height} pixels; use real photos.")
    return paths


def _caption_rows(captions: Any) -> list[tuple[str, str]]:
    """The caption table (a list of rows, a pandas DataFrame or Gradio's {"data": rows}) as
    (file name, caption) pairs."""
    if captions is None:
        return []
    if hasattr(captions, "values") and hasattr(captions, "columns"):  # a pandas DataFrame
        captions = captions.values.tolist()
    if isinstance(captions, dict):
        captions = captions.get("data")
    rows = []
    for row in captions or []:
        if isinstance(row, (list, tuple)) and len(row) >= 2:
            rows.append((str(row[0] or "").strip(), str(row[1] or "").strip()))
    return rows


def captions_by_image(paths: list[str], captions: Any) -> dict[str, str]:
    """Rows of the caption table [[file name, caption], ...] -> {path: caption} (empty ones dropped).

    A row names its image by file name; a table of one row per image, each row named as its image
    or not named, matches in upload order (two uploads may share a name). A caption whose row
    names no uploaded image is an error naming it: it would otherwise be lost without a word."""
    rows = _caption_rows(captions)
    names = [os.path.basename(p) for p in paths]
    if len(rows) == len(paths) and all(row_name in ("", name) for (row_name, _), name in zip(rows, names)):
        return {path: caption for path, (_, caption) in zip(paths, rows) if caption}
    by_name, unmatched = {}, []
    for row_name, caption in rows:
        if caption and row_name in names:
            by_name[row_name] = caption
        elif caption:
            unmatched.append(row_name)
    if unmatched:
        shown = f"`{unmatched[0]}`" if unmatched[0] else "a row without a file name"
        more = f" (and {len(unmatched) - 1} more)" if len(unmatched) > 1 else ""
        raise gr.Error(f"The caption table names {shown}{more}, which is not among the uploaded images: put an "
                       "uploaded file's name in the first column, or remove the row.")
    return {path: by_name[name] for path, name in zip(paths, names) if name in by_name}


# -- numbers ---------------------------------------------------------------------------------------
def _number(value: Any, label: str) -> float:
    if value is None or (isinstance(value, str) and not value.strip()):  # a cleared field
        raise gr.Error(f"{label} is empty; enter a number.")
    if isinstance(value, bool):
        raise gr.Error(f"{label} must be a number, got {value!r}.")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond a float's range
        raise gr.Error(f"{label} must be a finite number, got {value!r}.") from None
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
        raise gr.Error(f"{label} must be between {_shown(low)} and {_shown(high)}, got {_shown(value)}."
                       f"{(' ' + hint) if hint else ''}")
    return value


def _shown(number) -> str:
    """Whole numbers in full (a seed's bound), others and huge ones short (1e-4, 1.2e+21)."""
    return str(number) if isinstance(number, int) and abs(number) < 10**12 else f"{number:g}"


# -- the Train form --------------------------------------------------------------------------------
# TrainConfig's messages name the CLI's flags; on the page, the fields.
_FLAG_LABELS = {
    "--pretrained_model_name_or_path": "the base model (--base-model)",
    "--resolution": "Resolution",
    "--learning_rate": "Learning rate",
    "--rank": "LoRA rank",
    "--optimizer": "Optimizer",
    "--seed": "Seed",
    "--lora_layers": "Layers",
    "--conv_rank": "Conv rank (LoCon)",
    "--lora_alpha": "LoRA alpha",
    "--use_dora": "DoRA",
    "--use_ema": "EMA of the weights",
    "--validation_split": "Held-out share",
}


@dataclass
class TrainForm:
    """The Train tab's fields as the page (and the `/train` API) sends them, unchecked.

    The fields are the `/train` API's parameters, in its positional order: a new field goes at the
    end. One with the name of a `TrainProfile` field starts at the profile's value
    (`from_profile`); the page's layout has a component of the same name (`ui.py`).
    `to_config()` checks every field and builds the run's `TrainConfig`.
    """

    images: Any
    instance_prompt: Optional[str]
    max_train_steps: Optional[float] = None
    learning_rate: Optional[float] = None
    rank: Optional[float] = None
    optimizer: Optional[str] = TrainProfile.optimizer  # the API's default is the profiles' (one home)
    resolution: Optional[float] = None
    lora_name: Optional[str] = None
    captions: Any = None
    class_prompt: Optional[str] = None
    train_text_encoder: Optional[bool] = None
    validation_prompt: Optional[str] = None
    validation_steps: Optional[float] = None
    seed: Optional[float] = None
    num_samples: Optional[float] = None
    lora_layers: Optional[str] = "attn"
    conv_rank: Optional[float] = 0
    lora_alpha: Optional[float] = 0
    use_dora: Optional[bool] = False
    use_ema: Optional[bool] = False
    validation_split: Optional[float] = 0

    @classmethod
    def names(cls) -> list[str]:
        """The fields in the API's order."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_profile(cls, profile: TrainProfile, **given) -> "TrainForm":
        """The form as it starts for a kind of base model (`given` values over the profile's)."""
        starting = {name: getattr(profile, name) for name in cls.names() if hasattr(profile, name)}
        return cls(**{**dict(images=None, instance_prompt=""), **starting, **given})

    def to_config(self, base_model: str, profile: TrainProfile, device_type: str):
        """The form as a checked `TrainConfig` over `base_model`; raises `gr.Error` naming the field.

        Its `instance_images` are the uploads and `instance_captions` their captions, until the
        uploads are staged into the LoRA folder (`jobs.stage_images`, which also sets the output
        folder). A field sent empty (None) is an error: a cleared number never becomes a default."""
        from adaprelora.training.dreambooth import TrainConfig
        from adaprelora.training.dreambooth.masks import has_alpha
        from adaprelora.training.errors import UserError

        paths = check_uploaded_images(self.images)
        prompt = text(self.instance_prompt)
        if not prompt:
            raise gr.Error("Write an instance prompt with a trigger word, e.g. \"a photo of sks dog\".")
        steps = whole(self.max_train_steps, "Training steps", 1, 100_000, "A few hundred steps is typical.")
        lr = real(self.learning_rate, "Learning rate")
        if lr <= 0 or lr > 1:
            raise gr.Error(f"Learning rate must be above 0 and at most 1, got {lr:g}. 1e-4 is a good start.")
        rank = whole(self.rank, "LoRA rank", 1, 512, "4 to 32 is typical.")
        res = whole(self.resolution, "Resolution", 32, 2048, "Use 512 for SD 1.5.")
        val_steps = whole(self.validation_steps, "Sample interval", 1, 100_000)
        n_samples = whole(self.num_samples, "Sample images each time", 0, 8)
        seed = whole(self.seed, "Seed", 0, MAX_SEED)
        optimizer = text(self.optimizer)
        if not optimizer:
            raise gr.Error("Choose an optimizer.")
        if not isinstance(self.train_text_encoder, bool):
            raise gr.Error(f"\"Train the text encoder too\" must be true or false, got {self.train_text_encoder!r}.")
        class_prompt = text(self.class_prompt)
        layers = self._layers()
        split = real(self.validation_split, "Held-out share", 0, 0.5, "0 turns the validation loss off.")
        config = TrainConfig(
            pretrained_model_name_or_path=base_model,
            instance_prompt=prompt,
            instance_images=paths,
            instance_captions=captions_by_image(paths, self.captions) or None,
            class_prompt=class_prompt or None,
            class_data_dir="class_images" if class_prompt else None,
            with_prior_preservation=bool(class_prompt),
            **({"num_class_images": profile.num_class_images} if profile.num_class_images else {}),
            class_caption_dropout_rate=profile.class_caption_dropout_rate if class_prompt else 0.0,
            snr_gamma=profile.snr_gamma,
            resolution=res,
            max_train_steps=steps,
            learning_rate=lr,
            rank=rank,
            **layers,
            # PNGs with transparency: what is transparent is not learned (kohya's --alpha_mask).
            alpha_mask=any(has_alpha(p) for p in paths),
            validation_split=split or None,
            optimizer=optimizer,
            train_text_encoder=self.train_text_encoder,
            validation_prompt=(text(self.validation_prompt) or prompt) if n_samples else None,
            validation_steps=min(val_steps, steps),
            num_validation_images=n_samples,
            seed=seed,
            train_batch_size=profile.train_batch_size,
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
        return config

    def _layers(self) -> dict:
        """The "More settings" choices of which layers and how: `TrainConfig` fields, checked."""
        from adaprelora.training.dreambooth.config import LORA_LAYERS

        layers = text(self.lora_layers)
        if layers not in LORA_LAYERS:
            raise gr.Error(f"Layers must be one of {', '.join(LORA_LAYERS)}, got {self.lora_layers!r}.")
        conv_rank = whole(self.conv_rank, "Conv rank (LoCon)", 0, 512, "0 adapts no convolution.")
        alpha = real(self.lora_alpha, "LoRA alpha", 0, 4096, "0 means the same as the rank.")
        for name, label in (("use_dora", "DoRA"), ("use_ema", "EMA of the weights")):
            if not isinstance(getattr(self, name), bool):
                raise gr.Error(f"\"{label}\" must be true or false, got {getattr(self, name)!r}.")
        return dict(lora_layers=layers, conv_rank=conv_rank or None, lora_alpha=alpha or None,
                    use_dora=self.use_dora, use_ema=self.use_ema)

    def run_name(self) -> str:
        """What the LoRA is named after: the LoRA name, else the instance prompt."""
        return text(self.lora_name) or text(self.instance_prompt)


def text(value: Any) -> str:
    """A text field's value, stripped; a cleared one (None) is empty."""
    return "" if value is None else str(value).strip()


def form_endpoint(form: type, handle: Callable, name: str) -> Callable:
    """The API function of a form dataclass: one parameter per field (the fields' names, order and
    defaults) and Gradio's progress tracker, calling the generator `handle(form(...), progress)`.

    Gradio reads the API's parameter names and defaults from this signature, so a field added to
    the dataclass is a parameter of the endpoint with nothing else to change."""
    params = [inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                default=inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default)
              for f in dataclasses.fields(form)]
    params.append(inspect.Parameter("progress", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=gr.Progress()))
    signature = inspect.Signature(params)

    def endpoint(*args, **kwargs):
        values = signature.bind(*args, **kwargs)
        values.apply_defaults()
        fields = dict(values.arguments)
        progress = fields.pop("progress")
        yield from handle(form(**fields), progress)

    endpoint.__signature__ = signature
    endpoint.__name__ = endpoint.__qualname__ = name
    endpoint.__doc__ = handle.__doc__
    return endpoint


def page_wording(message: str) -> str:
    """A trainer's message (worded for the command line) with the page's names for its flags."""
    for flag, label in _FLAG_LABELS.items():
        message = message.replace(flag, label)
    return message


__all__ = ["MAX_IMAGES", "MAX_UPLOAD_BYTES", "TrainForm", "as_paths", "captions_by_image", "check_uploaded_images",
           "form_endpoint", "in_range", "page_wording", "real", "text", "upload_folder", "whole"]
