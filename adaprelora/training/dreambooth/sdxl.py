"""What SDXL adds to Stable Diffusion: its own flags, and the UNet's extra conditioning.

SDXL's UNet sees the hidden states of two text encoders side by side (CLIP ViT-L and OpenCLIP
ViT-bigG, penultimate layer each), plus "added conditioning": the second encoder's pooled,
projected embedding and six `time_ids`, the original image size, the crop's top-left corner and
the target size, each as (height, width). Training passes each image's real values (so a model
learns what a crop looks like); sampling passes (0, 0) as the crop unless
`--crops_coords_top_left_h/_w` say otherwise.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..errors import UserError
from .config import TrainConfig
from .family import ModelFamily

SDXL_ONLY_FLAGS = ("crops_coords_top_left_h", "crops_coords_top_left_w")


def check_flags_for_family(cfg: TrainConfig, family: ModelFamily) -> None:
    """SDXL-only flags on an SD 1.x/2.x model are a `UserError` naming them."""
    if family.sdxl:
        return
    given = [f"--{name}" for name in SDXL_ONLY_FLAGS if getattr(cfg, name) is not None]
    if given:
        raise UserError(f"{' and '.join(given)} {'applies' if len(given) == 1 else 'apply'} only to SDXL models; "
                        f"{cfg.pretrained_model_name_or_path!r} is a Stable Diffusion 1.x/2.x model")


def sampling_crop(cfg: TrainConfig) -> tuple[int, int]:
    """The crop top-left (top, left) SDXL sees when drawing validation and class images."""
    return (cfg.crops_coords_top_left_h or 0, cfg.crops_coords_top_left_w or 0)


def tokenize(tokenizer, prompts: Sequence[str], device) -> torch.Tensor:
    return tokenizer(list(prompts), padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                     return_tensors="pt").input_ids.to(device)


def encode_prompts_sdxl(text_encoders, tokenizers, prompts: Sequence[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states of both encoders concatenated, pooled embedding of the second), as the SDXL
    pipeline's `encode_prompt` computes them (penultimate hidden layer of each encoder)."""
    hidden, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        out = encoder(tokenize(tokenizer, prompts, device), output_hidden_states=True)
        pooled = out[0]
        hidden.append(out.hidden_states[-2])
    return torch.cat(hidden, dim=-1), pooled.reshape(len(prompts), -1)


def time_ids(original_sizes: Sequence[tuple[int, int]], crop_top_lefts: Sequence[tuple[int, int]],
             target_size: tuple[int, int], device, dtype) -> torch.Tensor:
    """SDXL's `time_ids` (B, 6): original (h, w) + crop top-left (top, left) + target (h, w) per image."""
    rows = [list(o) + list(c) + list(target_size) for o, c in zip(original_sizes, crop_top_lefts)]
    return torch.tensor(rows, device=device, dtype=dtype)


def unet_added_conditioning(pooled: torch.Tensor, batch: dict, target_size: tuple[int, int],
                            dtype: Optional[torch.dtype] = None) -> dict:
    """`added_cond_kwargs` of the UNet for a training batch."""
    ids = time_ids(batch["original_sizes"], batch["crop_top_lefts"], target_size, pooled.device,
                   dtype or pooled.dtype)
    return {"text_embeds": pooled.to(dtype or pooled.dtype), "time_ids": ids}


__all__ = ["SDXL_ONLY_FLAGS", "check_flags_for_family", "encode_prompts_sdxl", "sampling_crop",
           "time_ids", "tokenize", "unet_added_conditioning"]
