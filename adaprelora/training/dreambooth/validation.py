"""Validation images: what the LoRA draws for the validation prompts during and after training.

They let the user watch the subject appear (and spot overfitting) in the app or `validation/`,
and the latest ones illustrate the model card. Each prompt uses the same seed every time, so the
images of successive steps are comparable.
"""
from __future__ import annotations

import os

import torch

from .config import TrainConfig

VALIDATION_DIR = "validation"


def write_validation_images(cfg: TrainConfig, accelerator, *, unet, text_encoder, vae, tokenizer, noise_scheduler,
                            weight_dtype: torch.dtype, step: int) -> list[str]:
    """Write `num_validation_images` seeded PNGs per validation prompt to
    `<output_dir>/validation/step-<step>-prompt<p>-<i>.png` and log them to the tracker; returns
    their paths. `unet` and `text_encoder` are the unwrapped models being trained."""
    from contextlib import nullcontext

    import numpy as np
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    acc = accelerator
    prompts = cfg.validation_prompts
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DPMSolverMultistepScheduler.from_config(noise_scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    was_training = [m.training for m in (unet, text_encoder)]
    unet.eval()
    text_encoder.eval()
    folder = os.path.join(cfg.output_dir, VALIDATION_DIR)
    os.makedirs(folder, exist_ok=True)
    autocast = (torch.autocast(acc.device.type, dtype=weight_dtype)
                if weight_dtype != torch.float32 else nullcontext())
    paths, images_for_log = [], []
    try:
        with torch.no_grad(), autocast:
            for p_index, prompt in enumerate(prompts):
                generator = torch.Generator(device="cpu").manual_seed(cfg.seed if cfg.seed is not None else 0)
                images = pipeline(
                    prompt, num_images_per_prompt=cfg.num_validation_images, height=cfg.resolution,
                    width=cfg.resolution, num_inference_steps=cfg.validation_inference_steps,
                    generator=generator,
                ).images
                for i, image in enumerate(images):
                    path = os.path.join(folder, f"step-{step:06d}-prompt{p_index}-{i}.png")
                    image.save(path)
                    paths.append(path)
                    images_for_log.append(np.asarray(image))
    finally:
        for model, flag in zip((unet, text_encoder), was_training):
            model.train(flag)
    for tracker in acc.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.stack(images_for_log), step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(img, caption=prompts[0]) for img in images_for_log]},
                        step=step)
    return paths
