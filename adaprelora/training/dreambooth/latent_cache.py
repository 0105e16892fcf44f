"""`--cache_latents`: encode every training image with the VAE once, before training.

The VAE encoder is the costliest frozen part of a DreamBooth step after the UNet, and its output
depends only on the image (the crop is fixed by `--center_crop`; `--random_flip` is refused), so
encoding once per (image, bucket) gives the same training at less compute and, with the VAE moved
off the device afterwards, less device memory. What is cached is the latent *distribution* (the
encoder's mean and log-variance), not a sample of it: each step still draws its own sample, in the
same order as without the cache, so a cached run's losses equal an uncached run's with the same seed.

With `--cache_latents_to_disk` each entry is also written to `<output_dir>/latent_cache/` (a
safetensors file named by a hash of the image file, its size and mtime, the bucket and the VAE), so
a rerun or a resumed run reads instead of encoding again.

With loss masks (`masks.py`) each entry also holds its image's mask (uint8, pixel size, after the
same resize and crop), in memory and in the disk file; the mask file's size and mtime join the
entry's name, so a changed mask is a new entry.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Iterator, Optional

import torch

from ..errors import UserError

LATENT_CACHE_DIR = "latent_cache"


def _entry_name(record, bucket, vae_id: str, interpolation: str, masks=None) -> str:
    stat = os.stat(record.path)
    key = [os.path.abspath(record.path), stat.st_size, stat.st_mtime_ns, list(bucket), vae_id, interpolation]
    if masks is not None:  # unmasked runs keep the names they always had
        key.append(masks.cache_key(record))
    key = json.dumps(key)
    return hashlib.sha256(key.encode()).hexdigest()[:32] + ".safetensors"


def _read(path: str, masked: bool = False) -> Optional[tuple]:
    """(latent params, original size, crop top-left[, mask]) from a disk entry; None to encode again."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as fh:
            meta = fh.metadata() or {}
            params = fh.get_tensor("latent_params")
            mask = (fh.get_tensor("mask"),) if masked else ()
        return (params, tuple(json.loads(meta["original_size"])), tuple(json.loads(meta["crop_top_left"]))) + mask
    except Exception:  # a half-written or foreign file: encode again
        return None


def _write(path: str, params: torch.Tensor, original, crop, *mask: torch.Tensor) -> None:
    from safetensors.torch import save_file

    tmp = f"{path}.tmp-{os.getpid()}"
    tensors = {"latent_params": params.contiguous(), **({"mask": mask[0].contiguous()} if mask else {})}
    save_file(tensors, tmp,
              metadata={"original_size": json.dumps(list(original)), "crop_top_left": json.dumps(list(crop))})
    os.replace(tmp, path)


@torch.no_grad()
def cache_latents(dataset, vae, device, *, vae_id: str, disk_dir: Optional[str] = None) -> Iterator[str]:
    """Encode every (image, bucket) `dataset` uses and make it serve the results (`set_latents`).

    Yields progress messages; the last one says how many images were encoded and how many read
    from `disk_dir` (None: memory only). The cache lives on the CPU; batches move to the device.
    """
    views = dataset.views()
    masks = dataset.masks
    if disk_dir:
        os.makedirs(disk_dir, exist_ok=True)
    latents: dict = {}
    encoded = read = 0
    yield f"caching the latents of {len(views)} image(s)" + (f" in {disk_dir}" if disk_dir else "")
    for record, bucket in views:
        name = _entry_name(record, bucket, vae_id, dataset.interpolation, masks)
        path = os.path.join(disk_dir, name) if disk_dir else None
        entry = _read(path, masked=masks is not None) if path and os.path.isfile(path) else None
        if entry is not None and not torch.isfinite(entry[0]).all():
            entry = None  # written by an older run that did not check: encode again
        if entry is None:
            pixels, original, crop, *mask = dataset.load_view(record, bucket)
            params = vae.encode(pixels[None].to(device, dtype=vae.dtype)).latent_dist.parameters[0].cpu()
            if not torch.isfinite(params).all():  # never cache (or train on) what a run cannot learn from
                raise UserError(f"{record.path}: the VAE's encoding of this image is not finite (VAE in "
                                f"{str(vae.dtype).removeprefix('torch.')}): use --mixed_precision no, or an "
                                "fp16-safe VAE (--pretrained_vae_model_name_or_path)")
            entry = (params, original, crop, *mask)
            encoded += 1
            if path:
                _write(path, *entry)
        else:
            read += 1
        latents[(record, bucket)] = entry
    dataset.set_latents(latents)
    yield f"cached latents: {encoded} encoded, {read} read from disk"


def sample_latents(params: torch.Tensor, vae) -> torch.Tensor:
    """A scaled latent sample from cached parameters: what `vae.encode(x).latent_dist.sample()
    * scaling_factor` gives for the image (the same random draw for the same RNG state)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    return DiagonalGaussianDistribution(params).sample() * vae.config.scaling_factor


__all__ = ["LATENT_CACHE_DIR", "cache_latents", "sample_latents"]
