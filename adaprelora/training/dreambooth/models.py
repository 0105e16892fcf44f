"""The Stable Diffusion parts DreamBooth trains: loading them from the base model, adding LoRA.

Kept apart from the training loop so that what gets loaded (and in which dtype) can be read in one
place: frozen weights load directly in the mixed-precision dtype, while the LoRA tensors added on
top stay fp32 so that they, and the optimizer state, train at full precision. Loading problems
become one-line `UserError`s naming `--pretrained_model_name_or_path`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..errors import UserError, first_line
from .config import TrainConfig
from .export import TEXT_ENCODER_TARGET_MODULES, UNET_TARGET_MODULES


@dataclass
class DreamBoothModels:
    """The pipeline parts one run uses (the VAE, text encoder and UNet already on the device)."""

    tokenizer: object
    noise_scheduler: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    weight_dtype: torch.dtype


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype of the frozen weights for accelerate's `mixed_precision` setting."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def _load_pretrained(cfg: TrainConfig, cls, subfolder: str, **kw):
    try:
        return cls.from_pretrained(
            cfg.pretrained_model_name_or_path, subfolder=subfolder, revision=cfg.revision, **kw
        )
    except (OSError, ValueError, EnvironmentError) as err:
        raise UserError(
            f"--pretrained_model_name_or_path: cannot load {subfolder} of "
            f"{cfg.pretrained_model_name_or_path!r}: {first_line(err)}"
        ) from None


def load_models(cfg: TrainConfig, accelerator) -> DreamBoothModels:
    """Load tokenizer, noise scheduler, text encoder, VAE and UNet, frozen and on the device, with
    xformers attention and gradient checkpointing as `cfg` asks."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = cfg.pretrained_model_name_or_path
    if os.path.isabs(path) or path.startswith((".", "~")) or os.path.exists(path):
        if not os.path.isdir(path):
            raise UserError(f"--pretrained_model_name_or_path: folder {path!r} does not exist")
        if not os.path.isdir(os.path.join(path, "unet")):
            raise UserError(f"--pretrained_model_name_or_path: {path!r} is not a Stable Diffusion pipeline "
                            "folder (no unet/ subfolder)")
    tokenizer = _load_pretrained(cfg, CLIPTokenizer, "tokenizer")
    if len(tokenizer) < 256:  # offline Hub lookups can return an almost empty tokenizer
        raise UserError(f"--pretrained_model_name_or_path: the tokenizer of {path!r} did not load "
                        f"(only {len(tokenizer)} tokens: offline without a cached copy, or not an "
                        "SD 1.x/2.x model?)")
    noise_scheduler = _load_pretrained(cfg, DDPMScheduler, "scheduler")
    variant = {"variant": cfg.variant} if cfg.variant else {}
    # Frozen weights load directly in the mixed-precision dtype (modules the model wants in
    # fp32 stay fp32); the LoRA tensors added later are kept in fp32.
    dtype = weight_dtype(accelerator.mixed_precision)
    text_encoder = _load_pretrained(cfg, CLIPTextModel, "text_encoder", dtype=dtype, **variant)
    vae = _load_pretrained(cfg, AutoencoderKL, "vae", dtype=dtype, **variant)
    unet = _load_pretrained(cfg, UNet2DConditionModel, "unet", dtype=dtype, **variant)
    for model in (vae, text_encoder, unet):
        model.requires_grad_(False)
        model.to(accelerator.device)

    if cfg.enable_xformers_memory_efficient_attention:
        try:
            unet.enable_xformers_memory_efficient_attention()
        except Exception as err:
            raise UserError(f"--enable_xformers_memory_efficient_attention: {first_line(err)}") from None
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            if hasattr(text_encoder, "activation_checkpointing_enable"):  # transformers >= 5.2x
                text_encoder.activation_checkpointing_enable(
                    activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                text_encoder.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False})
    return DreamBoothModels(tokenizer=tokenizer, noise_scheduler=noise_scheduler, text_encoder=text_encoder,
                            vae=vae, unet=unet, weight_dtype=dtype)


def add_lora_adapters(cfg: TrainConfig, unet, text_encoder, dtype: torch.dtype) -> None:
    """Add the "default" LoRA adapter to the UNet (and the text encoder with
    `--train_text_encoder`); under mixed precision the LoRA tensors are cast to fp32."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    common = dict(r=cfg.rank, lora_alpha=cfg.effective_lora_alpha, lora_dropout=cfg.lora_dropout,
                  init_lora_weights="gaussian")
    unet.add_adapter(LoraConfig(target_modules=list(UNET_TARGET_MODULES), **common))
    if cfg.train_text_encoder:
        text_encoder.add_adapter(LoraConfig(target_modules=list(TEXT_ENCODER_TARGET_MODULES), **common))
    if dtype != torch.float32:
        # Only the LoRA tensors are trained: keep them (and so the optimizer state) in fp32.
        trained = [unet, text_encoder] if cfg.train_text_encoder else [unet]
        cast_training_params(trained, dtype=torch.float32)
