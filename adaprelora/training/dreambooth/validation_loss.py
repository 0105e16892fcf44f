"""A held-out denoising loss that the same weights always score the same: over-fitting shows in
it before it shows in the samples, and it separates two runs far more finely than judging images.

The training loss draws new noise and timesteps at every step, so its value wanders by more than
the differences it should reveal. Here everything random is fixed once: each held-out image is
encoded to its latent (the VAE posterior's mean, no sampling), paired with every one of a fixed
set of timesteps, and given noise drawn from its own seeded CPU generator, so neither the global
RNG nor the device changes it. The loss is the trainer's target (the noise, or the velocity for
v-prediction: `loss.prediction_target`) in plain MSE, without min-SNR weighting, averaged over
images and timesteps.

    vset = ValidationLossSet.from_images(images, captions, vae, noise_scheduler, resolution=512)
    value = vset.evaluate(models)     # models: a DreamBoothModels (or anything with its fields)

With prior preservation, a second set built from class images (and their captions or the class
prompt) measures the drift of the prior the same way. The VAE is frozen in LoRA training, so the
latents are computed once; the text encoders may be trained, so the captions are encoded at every
evaluation. Models are put in eval mode for the
evaluation (no dropout) and given back in the mode they were in.
"""
from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from PIL import Image

from ..errors import UserError
from .buckets import fit_to_bucket
from .data import list_image_files, load_rgb, read_caption
from .loss import prediction_target
from .sdxl import encode_prompts_sdxl, time_ids, tokenize

DEFAULT_NUM_TIMESTEPS = 4
DEFAULT_SEED = 0


def spread_timesteps(num_train_timesteps: int, count: int = DEFAULT_NUM_TIMESTEPS) -> list[int]:
    """`count` timesteps at the centres of equal slices of [0, num_train_timesteps): 125, 375,
    625, 875 for 4 of 1000, covering fine detail to coarse layout alike."""
    if count < 1:
        raise UserError(f"the validation loss needs at least one timestep (got {count})")
    return [int((2 * k + 1) * num_train_timesteps // (2 * count)) for k in range(count)]


def split_holdout(items: Sequence, fraction: float, seed: int = DEFAULT_SEED) -> tuple[list, list]:
    """(kept for training, held out): round(fraction * n) items, at least one, drawn by `seed`,
    and at least one left to train on; both lists keep the input order."""
    if not 0.0 < fraction < 1.0:
        raise UserError(f"the validation split must be between 0 and 1 (got {fraction})")
    n = len(items)
    if n < 2:
        raise UserError(f"holding out a validation share needs at least 2 images (got {n}): add images or give "
                        "held-out ones in a separate folder")
    k = min(n - 1, max(1, round(fraction * n)))
    held = set(random.Random(seed).sample(range(n), k))
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


@dataclass
class ValidationLossSet:
    """Held-out latents with their captions, and the fixed timesteps and noise they are scored at.

    `noise[i, j]` is the noise of image i at `timesteps[j]`; `original_sizes` and `crop_top_lefts`
    are SDXL's size conditioning for each image (unused by SD 1.x/2.x)."""

    latents: torch.Tensor  # (N, C, h, w) float32, scaled by the VAE's scaling_factor, CPU
    captions: list[str]
    noise_scheduler: object
    timesteps: torch.Tensor  # (T,) long
    noise: torch.Tensor  # (N, T, C, h, w) float32, CPU
    resolution: int
    original_sizes: list[tuple[int, int]] = field(default_factory=list)
    crop_top_lefts: list[tuple[int, int]] = field(default_factory=list)
    batch_size: int = 8
    seed: int = DEFAULT_SEED

    @classmethod
    def from_images(cls, images: Sequence[Union[Image.Image, str]], captions: Sequence[str], vae, noise_scheduler, *,
                    resolution: int, timesteps: Optional[Sequence[int]] = None,
                    num_timesteps: int = DEFAULT_NUM_TIMESTEPS, seed: int = DEFAULT_SEED, batch_size: int = 8,
                    center_crop: bool = True) -> "ValidationLossSet":
        """Encode `images` (PIL images or paths; resized to cover `resolution` and cropped square,
        as training does) with `vae`, and fix the noise from `seed`: one draw of shape
        (N, T, C, h, w) from `torch.Generator("cpu").manual_seed(seed)`. `timesteps` default to
        `spread_timesteps(num_train_timesteps, num_timesteps)`."""
        if len(images) == 0:
            raise UserError("the validation loss needs at least one held-out image")
        if len(images) != len(captions):
            raise UserError(f"the validation loss got {len(images)} images but {len(captions)} captions")
        if batch_size < 1:
            raise UserError(f"the validation loss batch size must be at least 1 (got {batch_size})")
        n_train = int(noise_scheduler.config.num_train_timesteps)
        steps = list(timesteps) if timesteps is not None else spread_timesteps(n_train, num_timesteps)
        bad = [t for t in steps if not 0 <= int(t) < n_train]
        if not steps or bad:
            raise UserError(f"validation timesteps must lie in [0, {n_train}) (got {steps})")
        pixels, sizes, crops = [], [], []
        for img in images:
            img = load_rgb(img) if isinstance(img, str) else img.convert("RGB")
            px, size, crop = fit_to_bucket(img, (resolution, resolution), center_crop=center_crop)
            pixels.append(px)
            sizes.append(size)
            crops.append(crop)
        latents = _encode_latents(vae, torch.stack(pixels), batch_size)
        generator = torch.Generator("cpu").manual_seed(seed)
        noise = torch.randn((latents.shape[0], len(steps), *latents.shape[1:]), generator=generator,
                            dtype=torch.float32)
        return cls(latents=latents, captions=list(captions), noise_scheduler=noise_scheduler,
                   timesteps=torch.tensor([int(t) for t in steps], dtype=torch.long), noise=noise,
                   resolution=resolution, original_sizes=sizes, crop_top_lefts=crops, batch_size=batch_size,
                   seed=seed)

    @classmethod
    def from_folder(cls, folder: str, vae, noise_scheduler, *, resolution: int, default_caption: str = "",
                    **kwargs) -> "ValidationLossSet":
        """The images of `folder` (sorted by name) with their `.txt` captions; an image without one
        uses `default_caption` (the instance prompt, typically)."""
        paths = list_image_files(folder) if os.path.isdir(folder) else []
        if not paths:
            raise UserError(f"the validation loss folder {folder!r} has no images: add a few held-out images "
                            "(with .txt captions) or leave it out")
        captions = [read_caption(p) or default_caption for p in paths]
        return cls.from_images(paths, captions, vae, noise_scheduler, resolution=resolution, **kwargs)

    def __len__(self) -> int:
        return self.latents.shape[0]

    @torch.no_grad()
    def losses(self, models) -> torch.Tensor:
        """(N, T) float32 CPU tensor: the MSE of image i at `timesteps[j]`. `models` has `unet`,
        `text_encoders` and `tokenizers` (one each for SD, two for SDXL; or `text_encoder`,
        `tokenizer` and SDXL's `text_encoder_2`, `tokenizer_2`), optionally `weight_dtype` (the
        frozen weights' dtype, default float32)."""
        unet = models.unet
        encoders, tokenizers = _text_parts(models)
        modes = [(m, m.training) for m in [unet, *encoders]]
        for m, _ in modes:
            m.eval()
        try:
            return self._losses(models, unet, encoders, tokenizers)
        finally:
            for m, was_training in modes:
                m.train(was_training)

    def evaluate(self, models) -> float:
        """The validation loss: the mean of `losses(models)` over images and timesteps."""
        return float(self.losses(models).double().mean())

    def _losses(self, models, unet, encoders, tokenizers) -> torch.Tensor:
        device = next(unet.parameters()).device
        dtype = getattr(models, "weight_dtype", None) or torch.float32
        autocast = (torch.autocast(device_type=device.type, dtype=dtype)
                    if dtype != torch.float32 and device.type == "cuda" else contextlib.nullcontext())
        n, t_count = self.noise.shape[:2]
        with autocast:
            hidden, pooled = self._encode_captions(encoders, tokenizers, device)
            pairs = [(i, j) for i in range(n) for j in range(t_count)]
            out = torch.empty(n, t_count, dtype=torch.float32)
            for start in range(0, len(pairs), self.batch_size):
                chunk = pairs[start:start + self.batch_size]
                rows = torch.tensor([i for i, _ in chunk])
                cols = torch.tensor([j for _, j in chunk])
                latents = self.latents[rows].to(device)
                noise = self.noise[rows, cols].to(device)
                timesteps = self.timesteps[cols].to(device)
                noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
                target = prediction_target(self.noise_scheduler, latents, noise, timesteps)
                extra = {}
                if pooled is not None:
                    ids = time_ids([self.original_sizes[i] for i in rows.tolist()],
                                   [self.crop_top_lefts[i] for i in rows.tolist()],
                                   (self.resolution, self.resolution), device, dtype)  # target: the square crop
                    extra = {"added_cond_kwargs": {"text_embeds": pooled[rows.to(device)].to(dtype), "time_ids": ids}}
                pred = unet(noisy.to(dtype), timesteps, hidden[rows.to(device)].to(dtype), return_dict=False,
                            **extra)[0]
                err = (pred.float() - target.float()) ** 2
                out[rows, cols] = err.mean(dim=list(range(1, err.ndim))).cpu()
        return out

    def _encode_captions(self, encoders, tokenizers, device) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(hidden states, SDXL's pooled embedding or None) of every caption, as training encodes them."""
        hidden, pooled = [], []
        for start in range(0, len(self.captions), self.batch_size):
            prompts = self.captions[start:start + self.batch_size]
            if len(encoders) == 2:
                h, p = encode_prompts_sdxl(encoders, tokenizers, prompts, device)
                pooled.append(p)
            else:
                h = encoders[0](tokenize(tokenizers[0], prompts, device), return_dict=False)[0]
            hidden.append(h)
        return torch.cat(hidden), (torch.cat(pooled) if pooled else None)


def _text_parts(models) -> tuple[list, list]:
    """(text encoders, tokenizers) of `models`, from `text_encoders`/`tokenizers` or from the
    `text_encoder`/`tokenizer` (+ `_2`) fields."""
    if getattr(models, "text_encoders", None) is not None:
        return list(models.text_encoders), list(models.tokenizers)
    encoders, tokenizers = [models.text_encoder], [models.tokenizer]
    if getattr(models, "text_encoder_2", None) is not None:
        encoders.append(models.text_encoder_2)
        tokenizers.append(models.tokenizer_2)
    return encoders, tokenizers


@torch.no_grad()
def _encode_latents(vae, pixels: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The scaled posterior means of `pixels` ((N, 3, H, W) in [-1, 1]), float32 on the CPU."""
    device = next(vae.parameters()).device
    was_training = vae.training
    vae.eval()
    try:
        out = []
        for start in range(0, pixels.shape[0], batch_size):
            chunk = pixels[start:start + batch_size].to(device, dtype=vae.dtype)
            out.append(vae.encode(chunk).latent_dist.mean.float().cpu())
    finally:
        vae.train(was_training)
    return torch.cat(out) * float(vae.config.scaling_factor)


__all__ = ["DEFAULT_NUM_TIMESTEPS", "ValidationLossSet", "split_holdout", "spread_timesteps"]
