"""A tiny Stable Diffusion XL pipeline built in code, for tests and benchmarks (no downloads).

Same structure as SDXL base 1.0: a UNet with SDXL's added conditioning (`addition_embed_type=
"text_time"`: pooled text embeddings of the second encoder plus the size/crop time ids), two CLIP
text encoders (the second with a projection) whose hidden states are concatenated, two tokenizers,
a VAE with SDXL's scaling factor and an Euler scheduler; random but seeded weights. A 32x32 step
takes a fraction of a second on a CPU.

    pipe = build_tiny_sdxl_pipeline("/tmp/tiny-sdxl")   # also saved there
    StableDiffusionXLPipeline.from_pretrained("/tmp/tiny-sdxl")
"""
from __future__ import annotations

from typing import Optional

import torch

from .tiny_sd import build_tiny_tokenizer, saved_once

TEXT_HIDDEN = 32  # per encoder; the UNet's cross-attention sees both: 2 x 32
TIME_EMBED_DIM = 8  # six time ids, each embedded in 8 dimensions, plus the pooled embedding


def _text_config(tokenizer, **kw):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        hidden_size=TEXT_HIDDEN, intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=4,
        num_hidden_layers=3, vocab_size=max(1000, len(tokenizer)), max_position_embeddings=77,
        hidden_act="gelu", **kw,
    )


def build_tiny_sdxl_pipeline(path: Optional[str] = None, seed: int = 0):
    """Build a tiny `StableDiffusionXLPipeline` with seeded random weights; save it to `path` if given.

    The saved folder works as `--pretrained_model_name_or_path` for `train_dreambooth.py`.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = build_tiny_tokenizer()
    tokenizer_2 = build_tiny_tokenizer()
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
            addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + TEXT_HIDDEN,
            cross_attention_dim=2 * TEXT_HIDDEN, norm_num_groups=32,
        )
        vae = AutoencoderKL(
            block_out_channels=[32, 64], in_channels=3, out_channels=3,
            down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
            up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
            latent_channels=4, norm_num_groups=32, sample_size=32, scaling_factor=0.13025,
        )
        text_encoder = CLIPTextModel(_text_config(tokenizer))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, projection_dim=TEXT_HIDDEN))
    finally:
        torch.random.set_rng_state(state)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1, timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    if path is not None:
        pipe.save_pretrained(path, safe_serialization=True)
    return pipe


def tiny_sdxl_pipeline_dir() -> str:
    """Path of a tiny SDXL pipeline saved once per process in a temporary folder (removed at exit)."""
    return saved_once(build_tiny_sdxl_pipeline, "tiny-sdxl")


__all__ = ["build_tiny_sdxl_pipeline", "tiny_sdxl_pipeline_dir"]
