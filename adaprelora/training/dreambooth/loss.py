"""The denoising loss of one DreamBooth batch, the same for SD 1.x/2.x and SDXL.

Noise (with optional offset) and timesteps are drawn here, in a fixed order from the global RNG,
so two runs that feed the same latents draw the same noise: with or without cached latents,
interrupted and resumed or not. The UNet's conditioning (hidden states, and SDXL's
`added_cond_kwargs`) comes in ready-made.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import UserError
from .config import TrainConfig
from .masks import masked_mse


def prediction_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor,
                      timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to predict: the noise, or the velocity for v-prediction."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise UserError(f"unsupported scheduler prediction_type {prediction_type!r}")


def denoising_loss(cfg: TrainConfig, noise_scheduler, unet, latents: torch.Tensor, encoder_hidden_states: torch.Tensor,
                   added_cond_kwargs: Optional[dict] = None, masks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MSE between the UNet's prediction and its target (noise, or velocity for v-prediction), with
    min-SNR weighting (`--snr_gamma`) and the prior-preservation half weighted by `--prior_loss_weight`.
    `masks` (uint8 (B, 1, H, W) at pixel size, `--masked_loss` / `--alpha_mask`) weigh each element by
    its latent cell's mask before the per-image mean (`masks.masked_mse`)."""
    device = latents.device
    noise = torch.randn_like(latents)
    if cfg.noise_offset:
        # https://www.crosslabs.org//blog/diffusion-with-offset-noise
        noise = noise + cfg.noise_offset * torch.randn(
            (latents.shape[0], latents.shape[1], 1, 1), device=device, dtype=latents.dtype
        )
    bsz = latents.shape[0]
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=device).long()
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    extra = {"added_cond_kwargs": added_cond_kwargs} if added_cond_kwargs is not None else {}
    model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False, **extra)[0]

    prediction_type = noise_scheduler.config.prediction_type
    target = prediction_target(noise_scheduler, latents, noise, timesteps)

    per_sample = masked_mse(model_pred, target, masks)
    if cfg.snr_gamma is not None:
        # Min-SNR weighting (Hang et al. 2023, https://arxiv.org/abs/2303.09556).
        from diffusers.training_utils import compute_snr

        snr = compute_snr(noise_scheduler, timesteps)
        weights = torch.clamp(snr, max=cfg.snr_gamma)
        weights = weights / (snr + 1) if prediction_type == "v_prediction" else weights / snr
        per_sample = per_sample * weights
    if cfg.with_prior_preservation:
        instance, prior = per_sample.chunk(2)
        return instance.mean() + cfg.prior_loss_weight * prior.mean()
    return per_sample.mean()


__all__ = ["denoising_loss", "prediction_target"]
