"""The Stable Diffusion (1.x/2.x or SDXL) parts DreamBooth trains: loading them, adding LoRA.

Kept apart from the training loop so that what gets loaded (and in which dtype) can be read in one
place: frozen weights load directly in the mixed-precision dtype, while the LoRA tensors added on
top stay fp32 so that they, and the optimizer state, train at full precision. Loading problems
become one-line `UserError`s naming `--pretrained_model_name_or_path`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import UserError, first_line
from .config import TrainConfig
from .export import TEXT_ENCODER_TARGET_MODULES, UNET_TARGET_MODULES


@dataclass
class DreamBoothModels:
    """The pipeline parts one run uses (the VAE, text encoders and UNet already on the device).
    SDXL has a second tokenizer and text encoder (`CLIPTextModelWithProjection`); SD has None."""

    tokenizer: object
    noise_scheduler: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    weight_dtype: torch.dtype
    tokenizer_2: object = None
    text_encoder_2: Optional[torch.nn.Module] = None

    @property
    def sdxl(self) -> bool:
        return self.text_encoder_2 is not None


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype of the frozen weights for accelerate's `mixed_precision` setting."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def _load_pretrained(cfg: TrainConfig, cls, subfolder: Optional[str], path: Optional[str] = None,
                     flag: str = "--pretrained_model_name_or_path", **kw):
    path = path or cfg.pretrained_model_name_or_path
    try:
        return cls.from_pretrained(path, subfolder=subfolder, revision=cfg.revision, **kw)
    except (OSError, ValueError, EnvironmentError) as err:
        raise UserError(f"{flag}: cannot load {subfolder or 'the model'} of {path!r}: {first_line(err)}") from None


def _load_tokenizer(cfg: TrainConfig, subfolder: str):
    from transformers import CLIPTokenizer

    tokenizer = _load_pretrained(cfg, CLIPTokenizer, subfolder)
    if len(tokenizer) < 256:  # offline Hub lookups can return an almost empty tokenizer
        raise UserError(f"--pretrained_model_name_or_path: the {subfolder} of {cfg.pretrained_model_name_or_path!r} "
                        f"did not load (only {len(tokenizer)} tokens: offline without a cached copy, or not a "
                        "Stable Diffusion model?)")
    return tokenizer


def _load_vae(cfg: TrainConfig, dtype: torch.dtype, sdxl: bool, variant: dict):
    """The model's VAE or `--pretrained_vae_model_name_or_path`. SDXL's own VAE overflows in fp16,
    so it stays fp32 when its config asks (`force_upcast`), as diffusers' SDXL script keeps it."""
    from diffusers import AutoencoderKL

    if cfg.pretrained_vae_model_name_or_path:
        return _load_pretrained(cfg, AutoencoderKL, None, path=cfg.pretrained_vae_model_name_or_path,
                                flag="--pretrained_vae_model_name_or_path", dtype=dtype)
    vae = _load_pretrained(cfg, AutoencoderKL, "vae", dtype=dtype, **variant)
    if sdxl and dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        vae.to(torch.float32)
    return vae


def load_models(cfg: TrainConfig, accelerator, sdxl: bool = False) -> DreamBoothModels:
    """Load tokenizer(s), noise scheduler, text encoder(s), VAE and UNet, frozen and on the device,
    with xformers attention and gradient checkpointing as `cfg` asks; `sdxl` adds SDXL's second
    tokenizer and text encoder."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    path = cfg.pretrained_model_name_or_path
    if os.path.isabs(path) or path.startswith((".", "~")) or os.path.exists(path):
        if not os.path.isdir(path):
            raise UserError(f"--pretrained_model_name_or_path: folder {path!r} does not exist")
        if not os.path.isdir(os.path.join(path, "unet")):
            raise UserError(f"--pretrained_model_name_or_path: {path!r} is not a Stable Diffusion pipeline "
                            "folder (no unet/ subfolder)")
    tokenizer = _load_tokenizer(cfg, "tokenizer")
    tokenizer_2 = _load_tokenizer(cfg, "tokenizer_2") if sdxl else None
    noise_scheduler = _load_pretrained(cfg, DDPMScheduler, "scheduler")
    variant = {"variant": cfg.variant} if cfg.variant else {}
    # Frozen weights load directly in the mixed-precision dtype (modules the model wants in
    # fp32 stay fp32); the LoRA tensors added later are kept in fp32.
    dtype = weight_dtype(accelerator.mixed_precision)
    text_encoder = _load_pretrained(cfg, CLIPTextModel, "text_encoder", dtype=dtype, **variant)
    text_encoder_2 = (_load_pretrained(cfg, CLIPTextModelWithProjection, "text_encoder_2", dtype=dtype, **variant)
                      if sdxl else None)
    vae = _load_vae(cfg, dtype, sdxl, variant)
    unet = _load_pretrained(cfg, UNet2DConditionModel, "unet", dtype=dtype, **variant)
    text_encoders = [m for m in (text_encoder, text_encoder_2) if m is not None]
    for model in (vae, *text_encoders, unet):
        model.requires_grad_(False)
        model.to(accelerator.device)

    if cfg.enable_xformers_memory_efficient_attention:
        try:
            unet.enable_xformers_memory_efficient_attention()
        except Exception as err:
            raise UserError(f"--enable_xformers_memory_efficient_attention: {first_line(err)}") from None
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for encoder in (text_encoders if cfg.train_text_encoder else []):
            if hasattr(encoder, "activation_checkpointing_enable"):  # transformers >= 5.2x
                encoder.activation_checkpointing_enable(
                    activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                encoder.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False})
    return DreamBoothModels(tokenizer=tokenizer, noise_scheduler=noise_scheduler, text_encoder=text_encoder,
                            vae=vae, unet=unet, weight_dtype=dtype, tokenizer_2=tokenizer_2,
                            text_encoder_2=text_encoder_2)


def add_lora_adapters(cfg: TrainConfig, unet, text_encoder, dtype: torch.dtype, text_encoder_2=None) -> None:
    """Add the "default" LoRA adapter to the UNet (and the text encoder(s) with
    `--train_text_encoder`); under mixed precision the LoRA tensors are cast to fp32."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    common = dict(r=cfg.rank, lora_alpha=cfg.effective_lora_alpha, lora_dropout=cfg.lora_dropout,
                  init_lora_weights="gaussian")
    unet.add_adapter(LoraConfig(target_modules=list(UNET_TARGET_MODULES), **common))
    encoders = [m for m in (text_encoder, text_encoder_2) if m is not None] if cfg.train_text_encoder else []
    for encoder in encoders:
        encoder.add_adapter(LoraConfig(target_modules=list(TEXT_ENCODER_TARGET_MODULES), **common))
    if dtype != torch.float32:
        # Only the LoRA tensors are trained: keep them (and so the optimizer state) in fp32.
        cast_training_params([unet, *encoders], dtype=torch.float32)
