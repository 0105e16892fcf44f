"""The app's defaults in one place: the base model, the presets and the values the form starts with.

Change the default model or a preset here; `ui.py` builds the form from these values and
`handlers.py` uses the same ones as the API's parameter defaults.
"""
from __future__ import annotations

from typing import Any

# The base model `python app.py` trains and generates with unless `--base-model` says otherwise.
DEFAULT_BASE_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"

# Presets: settings that work for the usual kinds of subject, and the prompts that go with them.
PRESETS: dict[str, dict[str, Any]] = {
    "object": dict(instance_prompt="a photo of sks object", max_train_steps=500, learning_rate=1e-4, rank=8,
                   train_text_encoder=False, validation_prompt="a photo of sks object on a beach"),
    "face": dict(instance_prompt="a photo of sks person", max_train_steps=800, learning_rate=1e-4, rank=16,
                 train_text_encoder=True, validation_prompt="a portrait of sks person, studio lighting"),
    "style": dict(instance_prompt="an image in sks style", max_train_steps=1000, learning_rate=1e-4, rank=32,
                  train_text_encoder=False, validation_prompt="a city street in sks style"),
}
# The form fields a preset fills, in the order `/apply_preset` returns them.
PRESET_FIELDS = ("instance_prompt", "max_train_steps", "learning_rate", "rank", "train_text_encoder", "validation_prompt")

# Where the Train form starts (and the `/train` API's defaults).
TRAIN_DEFAULTS: dict[str, Any] = dict(max_train_steps=500, learning_rate=1e-4, rank=8, optimizer="adaprelora",
                                      resolution=512, validation_steps=100, seed=0, num_samples=2)
# Where the Generate form starts (and the `/generate` API's defaults).
GENERATE_DEFAULTS: dict[str, Any] = dict(num_inference_steps=30, seed=0, guidance_scale=7.5, lora_scale=1.0,
                                         num_images=1)

__all__ = ["DEFAULT_BASE_MODEL", "GENERATE_DEFAULTS", "PRESETS", "PRESET_FIELDS", "TRAIN_DEFAULTS"]
