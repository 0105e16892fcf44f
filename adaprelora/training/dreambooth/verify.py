"""Checking the written LoRA files the way their users will load them, before the run reports success.

Each file (the diffusers one and the kohya one) is loaded into a fresh copy of the base model's UNet
and text encoder with diffusers' `load_lora_weights`, and the copy is run on a fixed input (seeded
latents, one timestep, the run's prompt): its outputs must match the trained model's. A file that
does not reproduce the trained model is reported loudly (log warning, the run's warnings and its
final line), never silently; the files stay on disk either way.

A kohya file with DoRA is the exception to `load_lora_weights`: diffusers 0.42 drops its
`dora_scale` tensors on loading (with a warning), although its own kohya conversion reads them.
That file goes through the same steps `load_lora_weights` takes, with diffusers' conversion
(SDXL block names, kohya keys, `dora_scale` as `lora_magnitude_vector`) and loaders, keeping the
magnitudes (in PEFT's shape): `_load_kohya_with_dora`.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .family import ModelFamily, detect_family
from .models import TEXT_ENCODER_NAMES, as_list

logger = logging.getLogger(__name__)

FILE_LABELS = {"diffusers": "diffusers file", "kohya": "kohya file"}


@dataclass
class FileCheck:
    """How one file compared with the trained model."""

    kind: str
    ok: bool
    max_diff: float = float("nan")
    tolerance: float = float("nan")
    error: Optional[str] = None

    def describe(self) -> str:
        label = FILE_LABELS.get(self.kind, self.kind)
        if self.error:
            return f"{label} FAILED to load ({self.error})"
        return f"{label} {'ok' if self.ok else 'MISMATCH'}"


@dataclass
class ExportCheck:
    """The result of `verify_exports`: one `FileCheck` per file, and how much the LoRA changes the
    base model's output on the same input (a check is only meaningful when that is above the
    tolerance)."""

    files: list[FileCheck] = field(default_factory=list)
    lora_effect: float = float("nan")

    @property
    def ok(self) -> bool:
        return bool(self.files) and all(f.ok for f in self.files)

    @property
    def max_diff(self) -> float:
        diffs = [f.max_diff for f in self.files if f.error is None]
        return max(diffs) if diffs else float("nan")

    def summary(self) -> str:
        """`verified: diffusers file ok, kohya file ok (max diff 2.4e-07)`."""
        verb = "verified" if self.ok else "export check FAILED"
        return f"{verb}: {', '.join(f.describe() for f in self.files)} (max diff {self.max_diff:.2g})"

    def warnings(self) -> list[str]:
        out = []
        for f in self.files:
            if f.error:
                out.append(f"the {FILE_LABELS.get(f.kind, f.kind)} could not be loaded back into the base model: "
                           f"{f.error}")
            elif not f.ok:
                out.append(f"the {FILE_LABELS.get(f.kind, f.kind)} does not reproduce the trained model: max diff "
                           f"{f.max_diff:.3g} > tolerance {f.tolerance:.3g}; do not publish it before checking")
        return out

    def to_dict(self) -> dict:
        return {"ok": self.ok, "summary": self.summary(), "lora_effect": self.lora_effect,
                "files": {f.kind: {"ok": f.ok, "max_diff": f.max_diff, "tolerance": f.tolerance, "error": f.error}
                          for f in self.files}}


def _tolerance(dtype: torch.dtype, scale: float, tf32: bool) -> float:
    relative = 1e-4 if dtype == torch.float32 and not tf32 else 2e-2
    return relative * max(scale, 1e-3)


@torch.no_grad()
def _outputs(unet, text_encoders: list, inputs: dict, sdxl: bool) -> dict[str, torch.Tensor]:
    """The text encoders' hidden states (SDXL: both, side by side) and the UNet's prediction."""
    extra = {}
    if not sdxl:
        hidden = text_encoders[0](inputs["input_ids"][0], return_dict=False)[0]
    else:
        states, pooled = [], None
        for encoder, ids in zip(text_encoders, inputs["input_ids"]):
            out = encoder(ids, output_hidden_states=True)
            pooled = out[0]
            states.append(out.hidden_states[-2])
        hidden = torch.cat(states, dim=-1)
        extra["added_cond_kwargs"] = {"text_embeds": pooled.to(unet.dtype),
                                      "time_ids": inputs["time_ids"].to(unet.dtype)}
    sample = unet(inputs["latents"].to(unet.dtype), inputs["timestep"], hidden.to(unet.dtype), return_dict=False,
                  **extra)[0]
    return {"text_encoder": hidden.float(), "unet": sample.float()}


def _fixed_inputs(unet, tokenizers: list, prompt: str, resolution: int, device, sdxl: bool) -> dict:
    side = max(1, min(resolution // 8, 8))
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, unet.config.in_channels, side, side, generator=generator)

    def ids(tok):
        return tok([prompt], padding="max_length", truncation=True, max_length=tok.model_max_length,
                   return_tensors="pt").input_ids.to(device)

    inputs = {"latents": latents.to(device), "timestep": torch.tensor([500], device=device),
              "input_ids": [ids(tok) for tok in tokenizers]}
    if sdxl:
        inputs["time_ids"] = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], device=device)
    return inputs


def _load_fresh(cfg, device, dtype, family: ModelFamily):
    """The base model's UNet and text encoder(s) in a pipeline of its family: only the parts a LoRA
    touches (`load_lora_weights` needs the pipeline's UNet and text encoders)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    variant = {"variant": cfg.variant} if cfg.variant else {}
    common = dict(revision=cfg.revision, dtype=dtype, **variant)
    path = cfg.pretrained_model_name_or_path
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **common)
    classes = (CLIPTextModel, CLIPTextModelWithProjection)[: 2 if family.sdxl else 1]
    encoders = {name: cls.from_pretrained(path, subfolder=name, **common)
                for cls, name in zip(classes, TEXT_ENCODER_NAMES)}
    for model in (unet, *encoders.values()):
        model.to(device).eval()
    if family.sdxl:
        extra = dict(tokenizer=None, tokenizer_2=None, add_watermarker=False)
    else:
        extra = dict(tokenizer=None, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return family.pipeline_class()(vae=None, unet=unet, scheduler=None, **encoders, **extra)


def _has_dora_scale(path: str) -> bool:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as fh:
        return any(key.endswith(".dora_scale") for key in fh.keys())


def _load_kohya_with_dora(pipe, path: str, adapter_name: str) -> None:
    """`pipe.load_lora_weights(path)` for a kohya/LyCORIS file with `dora_scale`, which diffusers'
    `lora_state_dict` would drop: its kohya conversion and loaders, the magnitudes kept."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )
    from safetensors.torch import load_file

    from .export.keys import dora_scale_to_magnitude

    state_dict = _maybe_map_sgm_blocks_to_diffusers(load_file(path), pipe.unet.config)
    state_dict, alphas = _convert_non_diffusers_lora_to_diffusers(state_dict)
    # diffusers names a text-encoder MLP's magnitude `<module>.lora_magnitude_vector.down.weight`
    # (its conversion replaces only the `.lora_linear_layer.` part); the loaders want `.weight`.
    state_dict = {k.replace(".lora_magnitude_vector.down.weight", ".lora_magnitude_vector.weight"):
                  dora_scale_to_magnitude(v) if "lora_magnitude_vector" in k else v for k, v in state_dict.items()}
    pipe.load_lora_into_unet(state_dict, network_alphas=alphas, unet=pipe.unet, adapter_name=adapter_name,
                             _pipeline=pipe)
    for name in TEXT_ENCODER_NAMES:
        if getattr(pipe, name, None) is not None:
            pipe.load_lora_into_text_encoder(state_dict, network_alphas=alphas, text_encoder=getattr(pipe, name),
                                             prefix=name, adapter_name=adapter_name, _pipeline=pipe)


def _load_lora_file(pipe, kind: str, path: str, encoders: list) -> None:
    """Load a diffusers or kohya file as users do (`load_lora_weights`); a kohya file with DoRA
    through diffusers' own conversion, keeping the magnitudes its loader drops."""
    if kind == "kohya" and _has_dora_scale(path):
        _load_kohya_with_dora(pipe, path, adapter_name=f"check_{kind}")
    else:
        pipe.load_lora_weights(os.path.dirname(os.path.abspath(path)), weight_name=os.path.basename(path),
                               adapter_name=f"check_{kind}")


def verify_exports(cfg, files: dict[str, str], unet, text_encoders, tokenizers, *, dtype: torch.dtype,
                   text_encoder_trained: bool, load: Optional[Callable] = None) -> ExportCheck:
    """Load each of `files` ({"diffusers": path, "kohya": path}) into a fresh copy of
    `cfg.pretrained_model_name_or_path` with `load_lora_weights`, and compare the UNet's (and, when
    trained, the text encoders') output with the trained `unet` / `text_encoders` on a fixed input.

    `text_encoders` and `tokenizers` are one model each or sequences in the pipeline's order (SDXL:
    two each; then both encoders and the UNet's added conditioning take part). `dtype` is the frozen
    weights' dtype of the run (the fresh copy is loaded in it, on the trained model's device).
    Never raises for a bad file: a file that fails to load or differs becomes a failed `FileCheck`.
    `load(pipe, kind, path, encoders)` puts a file into the fresh pipeline (`encoders`: its trained
    text encoders); default `load_lora_weights` (a LyCORIS file brings its own loader).
    """
    device = next(unet.parameters()).device
    family = detect_family(unet_config=unet.config)
    encoders, tokenizers = as_list(text_encoders), as_list(tokenizers)
    modes = [(m, m.training) for m in (unet, *encoders)]
    try:
        for model, _ in modes:
            model.eval()
        inputs = _fixed_inputs(unet, tokenizers, cfg.instance_prompt or "a photo", cfg.resolution, device,
                               family.sdxl)
        trained = _outputs(unet, encoders, inputs, family.sdxl)
    finally:
        for model, was_training in modes:
            model.train(was_training)
    compared = ["unet"] + (["text_encoder"] if text_encoder_trained else [])
    scale = max(float(trained[k].abs().max()) for k in compared)
    tolerance = _tolerance(dtype, scale, bool(cfg.allow_tf32 and device.type == "cuda"))

    pipe = _load_fresh(cfg, device, dtype, family)
    fresh_encoders = [getattr(pipe, name) for name in TEXT_ENCODER_NAMES[: len(encoders)]]
    base = _outputs(pipe.unet, fresh_encoders, inputs, family.sdxl)
    report = ExportCheck(lora_effect=max(float((base[k] - trained[k]).abs().max()) for k in compared))
    for kind, path in files.items():
        try:
            (load or _load_lora_file)(pipe, kind, path, fresh_encoders if text_encoder_trained else [])
            for model in (pipe.unet, *fresh_encoders):  # new LoRA layers (and their dropout) start in train mode
                model.eval()
            loaded = _outputs(pipe.unet, fresh_encoders, inputs, family.sdxl)
            diff = max(float((loaded[k] - trained[k]).abs().max()) for k in compared)
            report.files.append(FileCheck(kind, ok=diff <= tolerance, max_diff=diff, tolerance=tolerance))
        except Exception as err:  # a file users cannot load is the failure this check exists for
            report.files.append(FileCheck(kind, ok=False, error=f"{type(err).__name__}: {err}".splitlines()[0]))
        finally:
            try:
                pipe.unload_lora_weights()
            except Exception:  # nothing was loaded
                pass
    del pipe, fresh_encoders
    for warning in report.warnings():
        logger.warning("EXPORT CHECK: %s", warning)
    return report


__all__ = ["ExportCheck", "FileCheck", "verify_exports"]
