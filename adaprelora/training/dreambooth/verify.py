"""Checking the written LoRA files the way their users will load them, before the run reports success.

Each file (the diffusers one and the kohya one) is loaded into a fresh copy of the base model's UNet
and text encoder with diffusers' `load_lora_weights`, and the copy is run on a fixed input (seeded
latents, one timestep, the run's prompt): its outputs must match the trained model's. A file that
does not reproduce the trained model is reported loudly (log warning, the run's warnings and its
final line), never silently; the files stay on disk either way.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

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
def _outputs(unet, text_encoder, inputs: dict, text_encoder_2=None) -> dict[str, torch.Tensor]:
    """The text encoders' hidden states (SDXL: both, side by side) and the UNet's prediction."""
    extra = {}
    if text_encoder_2 is None:
        hidden = text_encoder(inputs["input_ids"], return_dict=False)[0]
    else:
        states, pooled = [], None
        for encoder, ids in ((text_encoder, inputs["input_ids"]), (text_encoder_2, inputs["input_ids_2"])):
            out = encoder(ids, output_hidden_states=True)
            pooled = out[0]
            states.append(out.hidden_states[-2])
        hidden = torch.cat(states, dim=-1)
        extra["added_cond_kwargs"] = {"text_embeds": pooled.to(unet.dtype), "time_ids": inputs["time_ids"].to(unet.dtype)}
    sample = unet(inputs["latents"].to(unet.dtype), inputs["timestep"], hidden.to(unet.dtype), return_dict=False,
                  **extra)[0]
    return {"text_encoder": hidden.float(), "unet": sample.float()}


def _fixed_inputs(unet, tokenizer, prompt: str, resolution: int, device, tokenizer_2=None) -> dict:
    side = max(1, min(resolution // 8, 8))
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, unet.config.in_channels, side, side, generator=generator)

    def ids(tok):
        return tok([prompt], padding="max_length", truncation=True, max_length=tok.model_max_length,
                   return_tensors="pt").input_ids.to(device)

    inputs = {"latents": latents.to(device), "timestep": torch.tensor([500], device=device), "input_ids": ids(tokenizer)}
    if tokenizer_2 is not None:
        inputs["input_ids_2"] = ids(tokenizer_2)
        inputs["time_ids"] = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], device=device)
    return inputs


def _load_fresh(cfg, device, dtype, sdxl: bool = False):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    variant = {"variant": cfg.variant} if cfg.variant else {}
    common = dict(revision=cfg.revision, dtype=dtype, **variant)
    path = cfg.pretrained_model_name_or_path
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **common)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **common)
    unet.to(device).eval()
    text_encoder.to(device).eval()
    # Only the parts a LoRA touches: load_lora_weights needs the pipeline's unet and text encoder(s).
    if sdxl:
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **common)
        text_encoder_2.to(device).eval()
        return StableDiffusionXLPipeline(vae=None, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=None, tokenizer_2=None, unet=unet, scheduler=None,
                                         add_watermarker=False)
    return StableDiffusionPipeline(vae=None, text_encoder=text_encoder, tokenizer=None, unet=unet, scheduler=None,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def verify_exports(cfg, files: dict[str, str], unet, text_encoder, tokenizer, *, dtype: torch.dtype,
                   text_encoder_trained: bool, text_encoder_2=None, tokenizer_2=None) -> ExportCheck:
    """Load each of `files` ({"diffusers": path, "kohya": path}) into a fresh copy of
    `cfg.pretrained_model_name_or_path` with `load_lora_weights`, and compare the UNet's (and, when
    trained, the text encoder's) output with the trained `unet` / `text_encoder` on a fixed input.

    `dtype` is the frozen weights' dtype of the run (the fresh copy is loaded in it, on the trained
    model's device). Never raises for a bad file: a file that fails to load or differs becomes a
    failed `FileCheck`. With `text_encoder_2` (SDXL) both encoders and the UNet's added
    conditioning take part.
    """
    device = next(unet.parameters()).device
    sdxl = text_encoder_2 is not None
    modes = [(m, m.training) for m in (unet, text_encoder, text_encoder_2) if m is not None]
    try:
        for model, _ in modes:
            model.eval()
        inputs = _fixed_inputs(unet, tokenizer, cfg.instance_prompt or "a photo", cfg.resolution, device,
                               tokenizer_2=tokenizer_2 if sdxl else None)
        trained = _outputs(unet, text_encoder, inputs, text_encoder_2)
    finally:
        for model, was_training in modes:
            model.train(was_training)
    compared = ["unet"] + (["text_encoder"] if text_encoder_trained else [])
    scale = max(float(trained[k].abs().max()) for k in compared)
    tolerance = _tolerance(dtype, scale, bool(cfg.allow_tf32 and device.type == "cuda"))

    pipe = _load_fresh(cfg, device, dtype, sdxl=sdxl)
    fresh_te2 = pipe.text_encoder_2 if sdxl else None
    base = _outputs(pipe.unet, pipe.text_encoder, inputs, fresh_te2)
    report = ExportCheck(lora_effect=max(float((base[k] - trained[k]).abs().max()) for k in compared))
    for kind, path in files.items():
        try:
            pipe.load_lora_weights(os.path.dirname(os.path.abspath(path)), weight_name=os.path.basename(path),
                                   adapter_name=f"check_{kind}")
            loaded = _outputs(pipe.unet, pipe.text_encoder, inputs, fresh_te2)
            diff = max(float((loaded[k] - trained[k]).abs().max()) for k in compared)
            report.files.append(FileCheck(kind, ok=diff <= tolerance, max_diff=diff, tolerance=tolerance))
        except Exception as err:  # a file users cannot load is the failure this check exists for
            report.files.append(FileCheck(kind, ok=False, error=f"{type(err).__name__}: {err}".splitlines()[0]))
        finally:
            try:
                pipe.unload_lora_weights()
            except Exception:  # nothing was loaded
                pass
    del pipe, fresh_te2
    for warning in report.warnings():
        logger.warning("EXPORT CHECK: %s", warning)
    return report


__all__ = ["ExportCheck", "FileCheck", "verify_exports"]
