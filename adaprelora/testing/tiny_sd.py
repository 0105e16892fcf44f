"""A tiny Stable Diffusion 1.x pipeline built in code, for tests and offline demos (no downloads).

It has the same structure as SD 1.5 (UNet2DConditionModel, AutoencoderKL, CLIP text encoder and
tokenizer, PNDM scheduler) with a few thousand times fewer weights, random but seeded. A 32x32
training step takes well under a second on a CPU.

    pipe = build_tiny_sd_pipeline("/tmp/tiny-sd")      # also saved there
    StableDiffusionPipeline.from_pretrained("/tmp/tiny-sd")
    path = tiny_sd_pipeline_dir()                      # one saved copy per process
"""
from __future__ import annotations

import atexit
import shutil
import tempfile
import threading
from typing import Callable, Optional

import torch

_BYTE_VOCAB_SPECIALS = ("<|startoftext|>", "<|endoftext|>")
# A few merges so that common characters pair up as in a real BPE tokenizer (must be tuples).
_MERGES = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("i", "n"), ("e", "r"), ("o", "n")]


def _bytes_to_unicode() -> list[str]:
    """The 256 printable characters byte-level BPE uses for bytes 0..255 (GPT-2 / CLIP scheme)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def build_tiny_tokenizer():
    """An offline byte-level CLIPTokenizer: 256 byte characters, their `</w>` forms, a few merges
    and the two CLIP special tokens. Every string tokenizes (nothing maps to unknown)."""
    from transformers import CLIPTokenizer

    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars]
    for a, b in _MERGES:
        merged = a + b
        if merged not in tokens:
            tokens.append(merged)
    tokens += list(_BYTE_VOCAB_SPECIALS)
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=list(_MERGES), model_max_length=77)
    return tokenizer


def build_tiny_sd_pipeline(path: Optional[str] = None, seed: int = 0):
    """Build a tiny `StableDiffusionPipeline` with seeded random weights; save it to `path` if given.

    The saved folder loads with `StableDiffusionPipeline.from_pretrained(path)` and works as
    `--pretrained_model_name_or_path` for `train_dreambooth.py`.
    """
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tiny_tokenizer()
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        vae = AutoencoderKL(
            block_out_channels=[32, 64],
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
            up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
            latent_channels=4,
            norm_num_groups=32,
            sample_size=32,
        )
        text_config = CLIPTextConfig(
            bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"),
            eos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=5,
            vocab_size=max(1000, len(tokenizer)),
            max_position_embeddings=77,
        )
        text_encoder = CLIPTextModel(text_config)
    finally:
        torch.random.set_rng_state(generator_state)
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    if path is not None:
        pipe.save_pretrained(path, safe_serialization=True)
    return pipe


_cache_lock = threading.Lock()
_cached_dirs: dict[str, str] = {}


def saved_once(build: Callable[[str], object], prefix: str) -> str:
    """Path of the pipeline `build(path)` writes, built once per process under a temporary folder
    named after `prefix` (removed at exit); shared by the tiny SD and SDXL fixtures."""
    with _cache_lock:
        if prefix not in _cached_dirs:
            root = tempfile.mkdtemp(prefix=f"{prefix}-")
            atexit.register(shutil.rmtree, root, True)
            path = f"{root}/pipeline"
            build(path)
            _cached_dirs[prefix] = path
        return _cached_dirs[prefix]


def tiny_sd_pipeline_dir() -> str:
    """Path of a tiny pipeline saved once per process in a temporary folder (removed at exit)."""
    return saved_once(build_tiny_sd_pipeline, "tiny-sd")


__all__ = ["build_tiny_sd_pipeline", "build_tiny_tokenizer", "tiny_sd_pipeline_dir"]
