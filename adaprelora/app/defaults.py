"""The app's defaults in one place: the base model, and per kind of base model the presets and the
values the forms start with.

The default base model is the built-in `assets/tiny-sd` (works offline, 64 x 64 shapes); Stable
Diffusion 1.x/2.x and SDXL models get settings for photos (SDXL at 1024 px). `profile_for(model_id)`
picks the profile (`model_family` tells the families apart); the Train form starts from its
`TrainProfile` (`form.TrainForm.from_profile`), the Generate form from its `GenerateProfile`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from adaprelora.tiny_t2i import TINY_SD_DIR
from adaprelora.tiny_t2i.personalise import DREAMBOOTH_DEFAULTS, trigger_prompt, write_class_images
from adaprelora.training.dreambooth.family import detect_family
from adaprelora.training.errors import MAX_SEED  # the seeds a run takes (numpy's 32 bits); the page's bound too

# The base model `python app.py` trains and generates with unless `--base-model` says otherwise.
DEFAULT_BASE_MODEL = TINY_SD_DIR
# What the page and the error messages suggest for real photos.
SD15_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"

# Presets for Stable Diffusion: settings that work for the usual kinds of subject, and their prompts.
PRESETS: dict[str, dict[str, Any]] = {
    "object": dict(instance_prompt="a photo of sks object", max_train_steps=500, learning_rate=1e-4, rank=8,
                   train_text_encoder=False, validation_prompt="a photo of sks object on a beach"),
    "face": dict(instance_prompt="a photo of sks person", max_train_steps=800, learning_rate=1e-4, rank=16,
                 train_text_encoder=True, validation_prompt="a portrait of sks person, studio lighting"),
    "style": dict(instance_prompt="an image in sks style", max_train_steps=1000, learning_rate=1e-4, rank=32,
                  train_text_encoder=False, validation_prompt="a city street in sks style"),
}
# Presets for the built-in shapes model: its trigger prompt is "a sks shape on a ... background".
TINY_PRESETS: dict[str, dict[str, Any]] = {
    "shape": dict(instance_prompt=trigger_prompt("white"), max_train_steps=DREAMBOOTH_DEFAULTS["max_train_steps"],
                  learning_rate=DREAMBOOTH_DEFAULTS["learning_rate"], rank=DREAMBOOTH_DEFAULTS["rank"],
                  train_text_encoder=DREAMBOOTH_DEFAULTS["train_text_encoder"],
                  validation_prompt=trigger_prompt("green")),
}
# The form fields a preset fills, in the order `/apply_preset` returns them.
PRESET_FIELDS = ("instance_prompt", "max_train_steps", "learning_rate", "rank", "train_text_encoder", "validation_prompt")

# Presets for SDXL: the same subjects at SDXL's usual LoRA settings (it learns faster per step).
SDXL_PRESETS: dict[str, dict[str, Any]] = {
    "object": dict(PRESETS["object"], max_train_steps=400, learning_rate=1e-4, rank=8),
    "face": dict(PRESETS["face"], max_train_steps=600, learning_rate=5e-5, rank=16),
    "style": dict(PRESETS["style"], max_train_steps=800, learning_rate=1e-4, rank=32),
}
# Family names the page shows.
FAMILY_SD1, FAMILY_SD2, FAMILY_SDXL = "Stable Diffusion 1.x", "Stable Diffusion 2.x", "SDXL"

@dataclass(frozen=True)
class TrainProfile:
    """Where the Train form starts for one kind of base model, and the run settings it does not show.

    The first group is named as the `form.TrainForm` fields it fills (`TrainForm.from_profile`);
    the page's components start at these values, so they are also the `/train` API's values for
    parameters left out."""

    max_train_steps: int = 500
    learning_rate: float = 1e-4
    rank: int = 8
    # AdamW: on DreamBooth at the built-in model's defaults AdaPreLoRA did not beat it (4 subjects x 5
    # seeds: AdamW drew the subject more often and its prior drifted less; docs/results.md), so the
    # form starts with the optimizer the data favours and AdaPreLoRA is one choice away.
    optimizer: str = "adamw"
    resolution: int = 512
    class_prompt: str = ""
    train_text_encoder: bool = False
    validation_steps: int = 100
    seed: int = 0
    num_samples: int = 2
    # "More settings": which layers (kohya's presets), LoCon, alpha (0: the rank), DoRA, EMA, and the
    # share of the images held out for the validation loss (0: none).
    lora_layers: str = "attn"
    conv_rank: int = 0
    lora_alpha: float = 0.0
    use_dora: bool = False
    use_ema: bool = False
    validation_split: float = 0.0
    # Run settings the page does not show.
    train_batch_size: int = 1
    num_class_images: Optional[int] = None  # None: TrainConfig's default
    class_caption_dropout_rate: float = 0.0
    snr_gamma: Optional[float] = None
    # Writes the prior-preservation images for `class_prompt` (folder, count), used while the form
    # keeps that class prompt; None: the trainer generates them with the base model.
    class_images: Optional[Callable[[str, int], Any]] = None


@dataclass(frozen=True)
class GenerateProfile:
    """Where the Generate form starts (and the `/generate` API's values for parameters left out)."""

    num_inference_steps: int = 30
    seed: int = 0
    guidance_scale: float = 7.5
    lora_scale: float = 1.0
    num_images: int = 1


# Where the forms start for Stable Diffusion.
TRAIN_DEFAULTS = TrainProfile()
GENERATE_DEFAULTS = GenerateProfile()


@dataclass(frozen=True)
class ModelProfile:
    """What the forms start with for one kind of base model."""

    family: str
    builtin: bool
    train: TrainProfile = field(default_factory=TrainProfile)
    generate: GenerateProfile = field(default_factory=GenerateProfile)
    presets: dict = field(default_factory=dict)
    prompt_hint: str = "a photo of sks dog"
    generate_hint: str = "a photo of sks dog in a bucket"


TINY_PROFILE = ModelProfile(
    family="built-in tiny-sd (64 x 64 shapes)",
    builtin=True,
    train=TrainProfile(max_train_steps=DREAMBOOTH_DEFAULTS["max_train_steps"],
                       learning_rate=DREAMBOOTH_DEFAULTS["learning_rate"], rank=DREAMBOOTH_DEFAULTS["rank"],
                       resolution=DREAMBOOTH_DEFAULTS["resolution"], validation_steps=100, num_samples=4,
                       train_text_encoder=DREAMBOOTH_DEFAULTS["train_text_encoder"],
                       train_batch_size=DREAMBOOTH_DEFAULTS["train_batch_size"],
                       class_prompt=DREAMBOOTH_DEFAULTS["class_prompt"],
                       num_class_images=DREAMBOOTH_DEFAULTS["num_class_images"],
                       class_images=write_class_images,  # captioned scenes from the model's own data generator
                       class_caption_dropout_rate=DREAMBOOTH_DEFAULTS["class_caption_dropout_rate"],
                       snr_gamma=DREAMBOOTH_DEFAULTS["snr_gamma"]),
    generate=GenerateProfile(num_inference_steps=25, guidance_scale=5.0, num_images=4),
    presets=TINY_PRESETS,
    prompt_hint=trigger_prompt("white"),
    generate_hint=trigger_prompt("green"),
)


def _native_resolution(folder: str, default: int = TRAIN_DEFAULTS.resolution) -> int:
    """Pixels per side the pipeline in `folder` was trained at (UNet sample size x VAE factor)."""
    try:
        with open(os.path.join(folder, "unet", "config.json")) as f:
            sample = int(json.load(f)["sample_size"])
        with open(os.path.join(folder, "vae", "config.json")) as f:
            factor = 2 ** (len(json.load(f)["block_out_channels"]) - 1)
        return sample * factor
    except (OSError, KeyError, ValueError, TypeError):
        return default


def is_builtin_model(model_id: str) -> bool:
    """The shipped tiny-sd, or a copy made by `scripts/train_tiny_sd.py` (it has the judge beside it)."""
    return os.path.isdir(model_id) and (
        os.path.realpath(model_id) == os.path.realpath(TINY_SD_DIR)
        or os.path.isfile(os.path.join(model_id, "judge", "config.json")))


def model_family(model_id: str) -> str:
    """The name the page shows for the model's family (SD 1.x, SD 2.x or SDXL), by the trainer's own
    rule (`detect_family`: a local folder's configs, else a Hub id's name; no network)."""
    family = detect_family(model_id, hub=False)
    return FAMILY_SDXL if family.sdxl else FAMILY_SD2 if family.v2 else FAMILY_SD1


def profile_for(model_id: str) -> ModelProfile:
    if is_builtin_model(model_id):
        return TINY_PROFILE
    family = model_family(model_id)
    default_resolution = 1024 if family == FAMILY_SDXL else TRAIN_DEFAULTS.resolution
    resolution = _native_resolution(model_id, default_resolution) if os.path.isdir(model_id) else default_resolution
    train = dataclasses.replace(TRAIN_DEFAULTS, resolution=resolution)
    if family == FAMILY_SDXL:
        return ModelProfile(family=family, builtin=False, train=train,
                            generate=dataclasses.replace(GENERATE_DEFAULTS, guidance_scale=5.0), presets=SDXL_PRESETS)
    return ModelProfile(family=family, builtin=False, train=train, generate=GENERATE_DEFAULTS, presets=PRESETS)


__all__ = ["DEFAULT_BASE_MODEL", "FAMILY_SD1", "FAMILY_SD2", "FAMILY_SDXL", "GENERATE_DEFAULTS", "GenerateProfile",
           "MAX_SEED", "ModelProfile", "PRESETS", "PRESET_FIELDS", "SD15_MODEL", "SDXL_PRESETS", "TINY_PRESETS",
           "TINY_PROFILE", "TRAIN_DEFAULTS", "TrainProfile", "is_builtin_model", "model_family", "profile_for"]
