"""The built-in model's parts: a word-level CLIP tokenizer for the scene captions and the configs of
its VAE, text encoder and UNet, all standard diffusers / transformers classes so the saved folder is
an ordinary `StableDiffusionPipeline`.

Sizes were chosen to train from scratch on a 2-core CPU in well under an hour (64 x 64 pixels,
16 x 16 x 4 latents) while keeping what LoRA trainers target: cross-attention with `to_q`, `to_k`,
`to_v` and `to_out.0` at every UNet level.
"""
from __future__ import annotations

from typing import Iterable

import torch

from ..testing.tiny_sd import _bytes_to_unicode
from .scenes import ALL_SHAPES, COLOURS, GENERIC_NOUN, TRIGGER_WORDS

IMAGE_SIZE = 64
LATENT_SIZE = 16
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
# Words users often put in prompts; they tokenize to one token each (untrained unless in the data).
EXTRA_WORDS = ("a", "an", "the", "on", "of", "in", "with", "and", "photo", "picture", "image", "background")


def vocabulary_words() -> list[str]:
    words: list[str] = list(EXTRA_WORDS) + list(COLOURS) + [GENERIC_NOUN] + list(TRIGGER_WORDS)
    for shape in ALL_SHAPES:
        words += shape.split()
    return list(dict.fromkeys(words))


def _make_tokenizer(vocab: dict, merges: list):
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77)


def build_tokenizer(words: Iterable[str] = ()):
    """A byte-level `CLIPTokenizer` in which every caption word (and each of `words`) is one token.

    Any other text still tokenizes, into byte-level pieces. Merges are added greedily: while a word
    splits into several tokens, merge its first two; a later merge never splits a word that an
    earlier one already joined, so the loop ends with each word whole.
    """
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    merges: list[tuple[str, str]] = []
    all_words = list(dict.fromkeys(list(vocabulary_words()) + [w.lower() for w in words]))
    for special in SPECIAL_TOKENS:
        vocab[special] = len(vocab)
    tokenizer = _make_tokenizer(vocab, merges)
    for word in all_words:
        for _ in range(len(word) + 1):
            pieces = tokenizer.tokenize(word)
            if len(pieces) == 1:
                break
            a, b = pieces[0], pieces[1]
            merged = a + b
            merges.append((a, b))
            if merged not in vocab:
                vocab[merged] = len(vocab)
            tokenizer = _make_tokenizer(vocab, merges)
        else:  # pragma: no cover - the loop above always terminates
            raise RuntimeError(f"could not make {word!r} a single token")
    return tokenizer


def text_encoder_config(tokenizer):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        layer_norm_eps=1e-5,
    )


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
    )


def build_unet(attention_at_16: bool = False):
    """The 16 x 16 level is plain (ResNet blocks only, like SD's last level) unless `attention_at_16`:
    0.33 instead of 0.57 s per batch-32 step on 2 CPU threads, so more steps fit a one-hour run."""
    from diffusers import UNet2DConditionModel

    top_down, top_up = ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D") if attention_at_16 else ("DownBlock2D", "UpBlock2D")
    # attention_head_dim is the number of heads per level in diffusers' SD naming: 8 channels a head.
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        down_block_types=(top_down, "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", top_up),
        cross_attention_dim=64,
        attention_head_dim=(4, 8, 16),
        norm_num_groups=16,
    )


def scheduler_config() -> dict:
    """SD 1.5's noise schedule with DDIM sampling; `clip_sample` off, since clipping latents to
    [-1, 1] wrecks the colours."""
    return dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )


def build_text_encoder(tokenizer):
    from transformers import CLIPTextModel

    return CLIPTextModel(text_encoder_config(tokenizer))


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["IMAGE_SIZE", "LATENT_SIZE", "build_text_encoder", "build_tokenizer", "build_unet", "build_vae",
           "parameter_count", "scheduler_config", "text_encoder_config", "vocabulary_words"]
