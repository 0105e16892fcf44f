"""What the files' safetensors headers say about the run (both files carry the same entries).

kohya's `ss_*` names where kohya has one and the `modelspec.*` keys (see `kohya_metadata`), so that
AUTOMATIC1111, ComfyUI and LoRA browsers show the settings, plus `adaprelora_config`: the whole
TrainConfig as JSON.
"""
from __future__ import annotations

import json
import os
import random
import time
from typing import Optional

from ..family import ModelFamily
from ..kohya_metadata import base_model_metadata, dataset_metadata, modelspec_metadata


def training_metadata(
    config,
    extra: Optional[dict] = None,
    *,
    base: Optional[ModelFamily] = None,
    instance_records=None,
    class_records=None,
    started_at: Optional[float] = None,
    finished_at: Optional[float] = None,
) -> dict[str, str]:
    """safetensors header entries (strings only) describing the run: kohya's `ss_*` names where
    kohya has one, the `modelspec.*` keys (see `kohya_metadata`), and `adaprelora_config` (the
    whole TrainConfig as JSON).

    `base` is the base model's family (SD 1.x when not given); `instance_records` and
    `class_records` (the images trained on) give the image counts and caption tag frequencies;
    `started_at` / `finished_at` are `time.time()` values (now when not given).
    """
    now = time.time()
    base = base or ModelFamily()
    finished_at = now if finished_at is None else finished_at
    meta = {
        "ss_session_id": str(random.randint(0, 2**32 - 1)),
        "ss_training_started_at": str(now if started_at is None else started_at),
        "ss_training_finished_at": str(finished_at),
        **base_model_metadata(base),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(config.rank),
        "ss_network_alpha": str(config.effective_lora_alpha),
        **network_metadata(config),
        "ss_network_dropout": str(config.lora_dropout),
        # kohya: the folder's (or file's) name for a local model, the Hub id otherwise
        "ss_sd_model_name": _model_name(config.pretrained_model_name_or_path),
        "ss_output_name": config.effective_output_name,
        "ss_training_comment": "DreamBooth LoRA trained with adaprelora",
        "ss_optimizer": f"adaprelora.create_optimizer({config.optimizer!r})",
        "ss_optimizer_args": json.dumps(config.optimizer_args, default=str),
        "ss_learning_rate": str(config.learning_rate),
        "ss_unet_lr": str(config.learning_rate),
        "ss_text_encoder_lr": str(config.learning_rate if config.train_text_encoder else 0.0),
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_lr_warmup_steps": str(config.lr_warmup_steps),
        "ss_max_train_steps": str(config.max_train_steps),
        "ss_batch_size_per_device": str(config.train_batch_size),
        "ss_gradient_accumulation_steps": str(config.gradient_accumulation_steps),
        "ss_gradient_checkpointing": str(config.gradient_checkpointing),
        "ss_max_grad_norm": str(config.max_grad_norm),
        "ss_mixed_precision": str(config.mixed_precision or "no"),
        "ss_resolution": f"({config.resolution}, {config.resolution})",
        "ss_seed": str(config.seed),
        "ss_min_snr_gamma": str(config.snr_gamma),
        "ss_noise_offset": str(config.noise_offset),
        # kohya's key for --masked_loss (a mask folder or, with --alpha_mask, the images' alpha)
        "ss_masked_loss": str(bool(config.masked_loss or config.alpha_mask)),
        "ss_prior_loss_weight": str(config.prior_loss_weight if config.with_prior_preservation else 0.0),
        "ss_caption_dropout_rate": str(config.caption_dropout_rate),
        "ss_network_train_unet_only": str(not config.train_text_encoder),
        "ss_instance_prompt": str(config.instance_prompt or ""),
        "ss_enable_bucket": str(bool(config.enable_bucket)),
        "ss_min_bucket_reso": str(config.min_bucket_reso),
        "ss_max_bucket_reso": str(config.max_bucket_reso),
        "ss_bucket_no_upscale": str(bool(config.bucket_no_upscale)),
        "ss_cache_latents": str(bool(config.uses_latent_cache)),
        "ss_flip_aug": str(bool(config.random_flip)),
        "adaprelora_config": json.dumps(_jsonable_config(config), sort_keys=True, default=str),
    }
    if instance_records:
        meta.update(dataset_metadata(instance_records, config.instance_prompt, class_records or [],
                                     config.class_prompt if config.with_prior_preservation else None))
    meta.update(modelspec_metadata(base, title=config.effective_output_name, resolution=config.resolution,
                                   timestamp=finished_at, trigger_phrase=config.instance_prompt))
    for key, value in (extra or {}).items():
        meta[key] = value if isinstance(value, str) else json.dumps(value, default=str)
    return meta


def network_metadata(config) -> dict[str, str]:
    """kohya's `ss_network_module` / `ss_network_args` for LoCon and DoRA, as kohya writes the
    `--network_args` its users give: LoCon is networks.lora with `conv_dim` / `conv_alpha`; DoRA
    is LyCORIS's (`lycoris.kohya`, `algo=lora` or `locon` with convolutions, `dora_wd=True`).
    kohya keeps the values as the strings parsed from `key=value`. Empty for a plain LoRA."""
    args: dict[str, str] = {}
    if getattr(config, "use_dora", False):
        args.update(algo="locon" if config.conv_rank is not None else "lora", dora_wd="True")
    if getattr(config, "conv_rank", None) is not None:
        args.update(conv_dim=str(config.conv_rank), conv_alpha=str(config.effective_conv_alpha))
    if not args:
        return {}
    module = "lycoris.kohya" if "dora_wd" in args else "networks.lora"
    return {"ss_network_module": module, "ss_network_args": json.dumps(args)}


def _model_name(name_or_path) -> str:
    name = str(name_or_path)
    return os.path.basename(os.path.normpath(name)) if os.path.exists(name) else name


def _jsonable_config(config) -> dict:
    data = config.to_dict()
    if data.get("instance_images"):
        data["instance_images"] = [os.path.basename(p) for p in data["instance_images"]]
    if data.get("instance_captions"):
        data["instance_captions"] = {os.path.basename(k): v for k, v in data["instance_captions"].items()}
    return data


__all__ = ["network_metadata", "training_metadata"]
