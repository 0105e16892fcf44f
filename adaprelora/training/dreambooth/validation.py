"""Validation images: what the LoRA draws for the validation prompts during and after training.

They let the user watch the subject appear (and spot overfitting) in the app or `validation/`,
and the latest ones illustrate the model card. Each prompt uses the same seed every time, so the
images of successive steps are comparable.
"""
from __future__ import annotations

import os

import torch

from .config import TrainConfig
from .models import DreamBoothModels

VALIDATION_DIR = "validation"


def write_validation_images(cfg: TrainConfig, accelerator, models: DreamBoothModels, step: int) -> list[str]:
    """Write `num_validation_images` seeded PNGs per validation prompt, `--validation_width` x
    `--validation_height`, to `<output_dir>/validation/step-<step>-prompt<p>-<i>.png` and log them
    to the tracker; returns their paths. `models` is the unwrapped view of the models being
    trained; a pipeline of their family (SD or SDXL) draws the images."""
    from contextlib import nullcontext

    import numpy as np
    from diffusers import DPMSolverMultistepScheduler

    from .sdxl import sampling_crop

    acc = accelerator
    prompts = cfg.validation_prompts
    pipeline = models.pipeline(DPMSolverMultistepScheduler.from_config(models.noise_scheduler.config))
    extra = {"crops_coords_top_left": sampling_crop(cfg)} if models.sdxl else {}
    pipeline.set_progress_bar_config(disable=True)
    weight_dtype = models.weight_dtype
    sampled = [models.unet, *models.text_encoders]
    was_training = [m.training for m in sampled]
    for model in sampled:
        model.eval()
    width, height = cfg.validation_size
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
                    prompt, num_images_per_prompt=cfg.num_validation_images, height=height,
                    width=width, num_inference_steps=cfg.validation_inference_steps,
                    generator=generator, **extra,
                ).images
                for i, image in enumerate(images):
                    path = os.path.join(folder, f"step-{step:06d}-prompt{p_index}-{i}.png")
                    image.save(path)
                    paths.append(path)
                    images_for_log.append(np.asarray(image))
    finally:
        for model, flag in zip(sampled, was_training):
            model.train(flag)
    for tracker in acc.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.stack(images_for_log), step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(img, caption=prompts[0]) for img in images_for_log]},
                        step=step)
    return paths
