"""Which Stable Diffusion family a base model belongs to: SD 1.x, SD 2.x or SDXL, one rule for all.

The trainer (SDXL loads a second tokenizer and text encoder), the files' header keys (kohya's
`ss_base_model_version`, `modelspec.architecture`), the writers (kohya's SDXL block names, the
pipeline class that saves) and the app (the presets it offers) all ask `detect_family()`.
The signs, strongest first: the parts' configs (a UNet with SDXL's `addition_embed_type="text_time"`,
a cross-attention width or text encoder of 1024, OpenCLIP's: SD 2.x), the pipeline class in
`model_index.json` (`StableDiffusionXLPipeline`...), a `text_encoder_2/` folder, and only when none
of these can be read, a Hub id's name. The built-in tiny-sd is an SD 1.x pipeline by all of them.
Adding a family means adding its sign here.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class ModelFamily:
    """A base model's family: SD 1.x (all False), SD 2.x (`v2`), SDXL (`sdxl`); `v_parameterization`
    for v-prediction models (SD 2.x 768-v)."""

    v2: bool = False
    v_parameterization: bool = False
    sdxl: bool = False

    @property
    def pipeline_class_name(self) -> str:
        """The diffusers pipeline class that loads the base model and its LoRA files."""
        return "StableDiffusionXLPipeline" if self.sdxl else "StableDiffusionPipeline"

    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)


def _get(config, name: str, default=None):
    if config is None:
        return default
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def read_pipeline_class(model_name_or_path: str, revision: Optional[str] = None, hub: bool = True) -> Optional[str]:
    """The `_class_name` of a diffusers pipeline's `model_index.json` (a local folder's, or with `hub`
    a Hub id's through diffusers' cache), or None when it cannot be read."""
    if os.path.isdir(model_name_or_path):
        return (_read_json(os.path.join(model_name_or_path, "model_index.json")) or {}).get("_class_name")
    if not hub:
        return None
    try:
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.load_config(model_name_or_path, revision=revision).get("_class_name")
    except Exception:  # offline without a cache, not a pipeline: the other signs still decide
        return None


def detect_family(
    model_name_or_path: Optional[str] = None,
    revision: Optional[str] = None,
    *,
    unet_config=None,
    text_encoder_config=None,
    prediction_type: Optional[str] = None,
    pipeline_class: Optional[str] = None,
    hub: bool = True,
) -> ModelFamily:
    """The family of a base model, from the parts' configs (dicts or config objects) given, and what
    `model_name_or_path` tells besides: a local folder's `model_index.json`, `unet/config.json`,
    `text_encoder/config.json` and `scheduler/scheduler_config.json`; a Hub id's `model_index.json`
    (with `hub`; the app passes False to stay off the network) or else its name ("xl": SDXL,
    "stable-diffusion-2": SD 2.x). Configs given win over the ones read."""
    has_text_encoder_2 = False
    name_hint = ""
    if model_name_or_path:
        path = str(model_name_or_path)
        if os.path.isdir(path):
            read = lambda *parts: _read_json(os.path.join(path, *parts))  # noqa: E731
            unet_config = unet_config if unet_config is not None else read("unet", "config.json")
            text_encoder_config = (text_encoder_config if text_encoder_config is not None
                                   else read("text_encoder", "config.json"))
            if prediction_type is None:
                prediction_type = _get(read("scheduler", "scheduler_config.json"), "prediction_type")
            has_text_encoder_2 = os.path.isdir(os.path.join(path, "text_encoder_2"))
        pipeline_class = pipeline_class or read_pipeline_class(path, revision, hub=hub)
        if not os.path.isdir(path) and pipeline_class is None and unet_config is None:
            name_hint = path.lower()
    sdxl = (bool(pipeline_class and "XL" in pipeline_class)
            or _get(unet_config, "addition_embed_type") == "text_time"
            or (not pipeline_class and has_text_encoder_2)
            or "xl" in name_hint)
    cross_dim = _get(unet_config, "cross_attention_dim")
    if isinstance(cross_dim, (list, tuple)):
        cross_dim = cross_dim[0] if cross_dim else None
    v2 = not sdxl and (cross_dim == 1024 or _get(text_encoder_config, "hidden_size") == 1024
                       or "stable-diffusion-2" in name_hint)
    return ModelFamily(v2=v2, v_parameterization=prediction_type == "v_prediction", sdxl=sdxl)


__all__ = ["ModelFamily", "detect_family", "read_pipeline_class"]
