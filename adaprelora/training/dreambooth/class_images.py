"""Class images for prior preservation, generated with the base model when the folder has too few.

With `--with_prior_preservation` DreamBooth also trains on images of the generic class ("a dog")
so the LoRA does not turn every dog into the subject. Missing ones are drawn from the untrained
base pipeline, seeded, and saved as `<index>-<content hash>.png`, so a rerun reuses them.
"""
from __future__ import annotations

import hashlib
import os
import threading
from typing import Iterator

import torch

from ..errors import UserError, first_line
from .config import TrainConfig
from .data import scan_class_images
from .family import ModelFamily


def ensure_class_images(cfg: TrainConfig, accelerator, stop_event: threading.Event,
                        family: ModelFamily) -> Iterator[str]:
    """Generate the missing class images (main process only), yielding progress messages; the
    other processes wait. A set `stop_event` ends generation after the current batch. `family`:
    the base model's, which picks the pipeline that draws them."""
    acc = accelerator
    os.makedirs(cfg.class_data_dir, exist_ok=True)
    existing, _ = scan_class_images(cfg.class_data_dir)
    missing = cfg.num_class_images - len(existing)
    if missing > 0 and acc.is_main_process:
        yield f"generating {missing} class image(s) in {cfg.class_data_dir}"
        from tqdm.auto import tqdm

        from .sdxl import sampling_crop

        precision = cfg.prior_generation_precision
        if precision in (None, "no"):
            dtype = torch.float16 if acc.device.type == "cuda" else torch.float32
        else:
            dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        variant = {"variant": cfg.variant} if cfg.variant else {}
        if family.sdxl:
            kwargs = dict(add_watermarker=False)
            draw = dict(crops_coords_top_left=sampling_crop(cfg))
        else:
            kwargs = dict(safety_checker=None, requires_safety_checker=False)
            draw = {}
        try:
            pipeline = family.pipeline_class().from_pretrained(
                cfg.pretrained_model_name_or_path, dtype=dtype, revision=cfg.revision, **kwargs, **variant,
            )
        except (OSError, ValueError) as err:
            raise UserError(f"--pretrained_model_name_or_path: cannot load "
                            f"{cfg.pretrained_model_name_or_path!r}: {first_line(err)}") from None
        pipeline.set_progress_bar_config(disable=True)
        pipeline.to(acc.device)
        generator = torch.Generator(device="cpu").manual_seed(cfg.seed if cfg.seed is not None else 0)
        done = 0
        index = len(existing)
        with tqdm(total=missing, desc="Generating class images", disable=not acc.is_local_main_process) as bar:
            while done < missing:
                n = min(cfg.sample_batch_size, missing - done)
                images = pipeline(
                    [cfg.class_prompt] * n, height=cfg.resolution, width=cfg.resolution, generator=generator,
                    num_inference_steps=cfg.class_inference_steps, **draw,
                ).images
                for image in images:
                    digest = hashlib.sha1(image.tobytes()).hexdigest()[:16]
                    image.save(os.path.join(cfg.class_data_dir, f"{index:05d}-{digest}.png"))
                    index += 1
                done += n
                bar.update(n)
                yield f"generated {done}/{missing} class images"
                if stop_event.is_set():
                    break
        del pipeline
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    acc.wait_for_everyone()
