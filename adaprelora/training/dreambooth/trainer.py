"""DreamBooth LoRA training for Stable Diffusion 1.x/2.x, as a generator of progress events.

The command line (`train_dreambooth.py`) and the Gradio app drive the same code:

    from adaprelora.training.dreambooth import TrainConfig, train

    config = TrainConfig(pretrained_model_name_or_path="runwayml/stable-diffusion-v1-5",
                         instance_data_dir="dog/", instance_prompt="a photo of sks dog",
                         output_dir="out", max_train_steps=400, validation_prompt="sks dog on a beach")
    stop = threading.Event()                 # stop.set() from another thread ends the run cleanly
    for event in train(config, stop_event=stop):
        print(event.step, event.max_steps, event.loss, event.samples, event.message)
        if event.done:
            print(event.outputs["diffusers"], event.outputs["kohya"])

`train()` raises `adaprelora.training.errors.UserError` (one line, the flag named) for mistakes
the user can fix: bad settings, a missing or empty image folder, no usable image, a missing
prompt, an unknown optimizer, a model that cannot be loaded.

Stages, in the order `main()` of diffusers' `train_dreambooth_lora.py` runs them: settings and
images are checked first (before anything heavy is imported or loaded), then the accelerator,
class images for prior preservation, models and LoRA adapters, optimizer, data, scheduler,
`accelerator.prepare`, resume, the training loop (checkpoints and validation images on the way),
and the final files. This module orchestrates them around the shared loop
(`adaprelora.training.loop`); the stages with a life of their own live beside it: `models`
(loading the pipeline parts, adding LoRA), `class_images` (prior preservation), `checkpoints`
(LoRA-only checkpoints), `validation` and `export`.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import threading
import time
from typing import Iterator, Optional

import torch

from ..checkpoints import (
    load_checkpoint,
    remove_stale_temporary_checkpoints,
    resolve_resume_checkpoint,
    save_checkpoint,
)
from ..errors import UserError
from ..loop import TrainEvent, make_accelerator, peak_memory_bytes, release_accelerator, training_steps
from ..options import attach_grad_scaler, build_lr_scheduler, build_optimizer
from .checkpoints import register_lora_checkpoint_hooks
from .class_images import ensure_class_images
from .config import TrainConfig
from .data import DreamBoothDataset, ImageRecord, check_instance_data, collate_fn, scan_class_images
from .export import (
    remove_stale_temporary_exports,
    save_diffusers_lora,
    save_kohya_lora,
    training_metadata,
    write_model_card,
)
from .kohya_metadata import BaseModelKind, detect_base_model, read_pipeline_class
from .models import add_lora_adapters, load_models
from .validation import VALIDATION_DIR, write_validation_images
from .verify import verify_exports

logger = logging.getLogger(__name__)


def train(config: TrainConfig, stop_event: Optional[threading.Event] = None) -> Iterator[TrainEvent]:
    """Run DreamBooth LoRA training described by `config`, yielding `TrainEvent`s as it goes.

    One event per optimizer step (with loss, lr, steps/s and any validation `samples`), a few
    `message` events during setup (loading, class-image generation, resume), and a last event with
    `done=True` and `outputs`: {"output_dir", "diffusers", "kohya", "model_card"} paths, and
    "checkpoint" when a final checkpoint was written (stopped runs), "verified" (one line: did both
    files, loaded into a fresh base model with diffusers' `load_lora_weights`, reproduce the trained
    model; a mismatch is also in the event's `warnings`) and "export_check" (the details), unless
    `skip_export_check`; a run stopped before its first
    step saves nothing and has only "output_dir". Setting `stop_event` ends training after the
    current step: a final checkpoint and the output files are saved and the last event has
    `stopped=True`.

    Output files in `config.output_dir`: `pytorch_lora_weights.safetensors` (diffusers),
    `<output_name>.safetensors` (kohya/A1111), `README.md`, `checkpoint-<step>/` folders,
    `validation/*.png` and tracker logs under `logs/`.

    Raises `UserError` for problems the user can fix. Closing the generator early (e.g. the
    consumer stops iterating) releases the models without writing outputs.
    """
    config.validate()
    run = _DreamBoothRun(config, stop_event or threading.Event())
    try:
        yield from run.events()
    finally:
        run.close()


class _DreamBoothRun:
    """State of one run; `events()` is the generator behind `train()`."""

    def __init__(self, config: TrainConfig, stop_event: threading.Event):
        self.config = config
        self.stop_event = stop_event
        self.start_time = time.perf_counter()
        self.started_at = time.time()  # wall clock, for the files' `ss_training_started_at`
        self.instance_records: list[ImageRecord] = []
        self.class_records: list[ImageRecord] = []
        self.accelerator = None
        self.global_step = 0
        self.max_steps = config.max_train_steps or 0
        self.samples: list[str] = []
        self.last_checkpoint_step: Optional[int] = None

    # -- event helpers ---------------------------------------------------------------------------
    def _event(self, message: str = "", phase: str = "setup", **kw) -> TrainEvent:
        return TrainEvent(step=self.global_step, max_steps=self.max_steps, message=message, phase=phase, **kw)

    # -- the run ---------------------------------------------------------------------------------
    def events(self) -> Iterator[TrainEvent]:
        cfg = self.config
        # Check the images before anything heavy: a bad folder fails in a fraction of a second.
        instance_records, warnings = check_instance_data(cfg)
        self.instance_records = instance_records
        yield self._event(f"found {len(instance_records)} instance image(s)", warnings=warnings)

        # Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed

        os.makedirs(cfg.output_dir, exist_ok=True)
        remove_stale_temporary_checkpoints(cfg.output_dir)
        remove_stale_temporary_exports(cfg.output_dir)
        project_config = ProjectConfiguration(
            project_dir=cfg.output_dir, logging_dir=os.path.join(cfg.output_dir, cfg.logging_dir)
        )
        self.accelerator = make_accelerator(
            mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            seed=cfg.seed, log_with=None if cfg.report_to == "none" else cfg.report_to,
            project_config=project_config,
        )
        acc = self.accelerator
        if cfg.seed is not None:
            set_seed(cfg.seed)
        if cfg.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True

        # Class images for prior preservation (generated with the base model when missing)
        class_records: list[ImageRecord] = []
        if cfg.with_prior_preservation:
            for message in ensure_class_images(cfg, acc, self.stop_event):
                yield self._event(message, phase="class_images")
            class_records, class_warnings = scan_class_images(cfg.class_data_dir)
            class_records = class_records[: cfg.num_class_images]
            if class_warnings:
                yield self._event("class images checked", warnings=class_warnings)
            if not class_records:
                raise UserError(f"--class_data_dir: no usable class image in folder {cfg.class_data_dir!r}")
            self.class_records = class_records

        # Load scheduler and models
        yield self._event(f"loading {cfg.pretrained_model_name_or_path}")
        self._load_models()
        add_lora_adapters(cfg, self.unet, self.text_encoder, self.weight_dtype)
        # Checkpoints hold only the LoRA tensors (diffusers format), not the frozen model.
        register_lora_checkpoint_hooks(acc, self.unet, self.text_encoder, self.weight_dtype)

        # Optimizer creation
        self.optimizer = self._create_optimizer()

        # Dataset and DataLoaders creation
        self.dataset = dataset = DreamBoothDataset(
            instance_records,
            cfg.instance_prompt,
            cfg.resolution,
            center_crop=cfg.center_crop,
            interpolation=cfg.image_interpolation_mode,
            class_records=class_records,
            class_prompt=cfg.class_prompt,
            seed=cfg.seed,
        )
        prior = cfg.with_prior_preservation
        dataloader = torch.utils.data.DataLoader(
            dataset,
            batch_size=cfg.train_batch_size,
            shuffle=True,
            collate_fn=functools.partial(collate_fn, with_prior_preservation=prior),
            num_workers=cfg.dataloader_num_workers,
            # Its own generator: starting an epoch then draws nothing from the global RNG, which
            # checkpoints restore, so a resumed run draws the same noise as an uninterrupted one.
            generator=torch.Generator().manual_seed(cfg.seed if cfg.seed is not None else 0),
        )

        # Scheduler and math around the number of training steps
        updates_per_epoch = math.ceil(len(dataloader) / cfg.gradient_accumulation_steps)
        self.max_steps = cfg.max_train_steps or cfg.num_train_epochs * updates_per_epoch
        if cfg.lr_scheduler != "constant" and cfg.lr_warmup_steps >= self.max_steps:
            logger.warning("--lr_warmup_steps %d is not below the %d training steps", cfg.lr_warmup_steps,
                           self.max_steps)
        lr_scheduler = build_lr_scheduler(cfg.lr_scheduler, self.optimizer, warmup_steps=cfg.lr_warmup_steps,
                                          total_steps=self.max_steps, num_processes=acc.num_processes,
                                          num_cycles=cfg.lr_num_cycles, power=cfg.lr_power)

        # Prepare everything with our `accelerator`.
        if cfg.train_text_encoder:
            self.unet, self.text_encoder, self.optimizer, dataloader, lr_scheduler = acc.prepare(
                self.unet, self.text_encoder, self.optimizer, dataloader, lr_scheduler
            )
        else:
            self.unet, self.optimizer, dataloader, lr_scheduler = acc.prepare(
                self.unet, self.optimizer, dataloader, lr_scheduler
            )
        if acc.mixed_precision == "fp16":
            attach_grad_scaler(self.optimizer, acc.scaler)
        if acc.is_main_process and cfg.report_to != "none":
            acc.init_trackers("dreambooth-lora", config=_tracker_config(cfg))

        # Resume
        resume = resolve_resume_checkpoint(cfg.output_dir, cfg.resume_from_checkpoint)
        if cfg.resume_from_checkpoint and resume is None:
            yield self._event(f"no checkpoint in {cfg.output_dir} to resume from: starting a new run")
        if resume is not None:
            step, path = resume
            load_checkpoint(acc, path)
            self.global_step = self.last_checkpoint_step = step
            yield self._event(f"resumed from {path} at step {step}")

        # Train!
        yield from self._train_loop(dataloader, lr_scheduler, updates_per_epoch)

        # Final files
        yield from self._finish()

    # -- stages ----------------------------------------------------------------------------------
    def _load_models(self) -> None:
        models = load_models(self.config, self.accelerator)
        self.tokenizer, self.noise_scheduler = models.tokenizer, models.noise_scheduler
        self.text_encoder, self.vae, self.unet = models.text_encoder, models.vae, models.unet
        self.weight_dtype = models.weight_dtype

    def _base_model_kind(self) -> BaseModelKind:
        """SD 1.x, 2.x or SDXL, from the loaded parts' configs (for the files' metadata)."""
        cfg = self.config
        return detect_base_model(
            unet_config=self._unwrap(self.unet).config,
            text_encoder_config=self._unwrap(self.text_encoder).config,
            prediction_type=self.noise_scheduler.config.prediction_type,
            pipeline_class=read_pipeline_class(cfg.pretrained_model_name_or_path, cfg.revision),
        )

    def _trained_models(self) -> list[torch.nn.Module]:
        models = [self.unet]
        if self.config.train_text_encoder:
            models.append(self.text_encoder)
        return models

    def _unwrap(self, model):
        return self.accelerator.unwrap_model(model)

    def _create_optimizer(self):
        cfg, acc = self.config, self.accelerator
        lr = cfg.learning_rate
        if cfg.scale_lr:
            lr = lr * cfg.gradient_accumulation_steps * cfg.train_batch_size * acc.num_processes
        container = torch.nn.ModuleDict({"unet": self.unet})
        if cfg.train_text_encoder:
            container["text_encoder"] = self.text_encoder
        return build_optimizer(cfg.optimizer, container, lr, cfg.optimizer_args)

    def _encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids.to(self.accelerator.device)
        return self.text_encoder(ids, return_dict=False)[0]

    def _loss(self, batch: dict) -> torch.Tensor:
        import torch.nn.functional as F

        cfg = self.config
        device = self.accelerator.device
        pixel_values = batch["pixel_values"].to(device, dtype=self.vae.dtype)
        with torch.no_grad():
            latents = self.vae.encode(pixel_values).latent_dist.sample() * self.vae.config.scaling_factor
        noise = torch.randn_like(latents)
        if cfg.noise_offset:
            # https://www.crosslabs.org//blog/diffusion-with-offset-noise
            noise = noise + cfg.noise_offset * torch.randn(
                (latents.shape[0], latents.shape[1], 1, 1), device=device, dtype=latents.dtype
            )
        bsz = latents.shape[0]
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (bsz,), device=device).long()
        noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)
        with torch.set_grad_enabled(cfg.train_text_encoder):
            encoder_hidden_states = self._encode_prompts(batch["prompts"])
        model_pred = self.unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]

        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise UserError(f"unsupported scheduler prediction_type {prediction_type!r}")

        per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none")
        per_sample = per_sample.mean(dim=list(range(1, per_sample.ndim)))
        if cfg.snr_gamma is not None:
            # Min-SNR weighting (Hang et al. 2023, https://arxiv.org/abs/2303.09556).
            from diffusers.training_utils import compute_snr

            snr = compute_snr(self.noise_scheduler, timesteps)
            weights = torch.clamp(snr, max=cfg.snr_gamma)
            weights = weights / (snr + 1) if prediction_type == "v_prediction" else weights / snr
            per_sample = per_sample * weights
        if cfg.with_prior_preservation:
            instance, prior = per_sample.chunk(2)
            return instance.mean() + cfg.prior_loss_weight * prior.mean()
        return per_sample.mean()

    def _train_loop(self, dataloader, lr_scheduler, updates_per_epoch: int) -> Iterator[TrainEvent]:
        cfg, acc = self.config, self.accelerator
        yield self._event(f"training {self.max_steps} steps ({self.max_steps - self.global_step} to go)", phase="train")
        steps = training_steps(
            acc, models=self._trained_models(), dataloader=dataloader, optimizer=self.optimizer,
            lr_scheduler=lr_scheduler, compute_loss=self._loss, start_step=self.global_step,
            max_steps=self.max_steps, updates_per_epoch=updates_per_epoch, stop_event=self.stop_event,
            clip_parameters=[p for m in self._trained_models() for p in m.parameters() if p.requires_grad],
            max_grad_norm=cfg.max_grad_norm, on_epoch_start=self.dataset.set_epoch,
        )
        for event in steps:
            self.global_step = event.step
            acc.log({"loss": event.loss, "lr": event.lr}, step=self.global_step)
            if not math.isfinite(event.loss):
                logger.warning("step %d: the loss is %s", self.global_step, event.loss)
            last = self.global_step >= self.max_steps
            if self.global_step % cfg.checkpointing_steps == 0:
                event.checkpoint = self._save_checkpoint()
                event.message = f"saved {os.path.basename(event.checkpoint)}" if event.checkpoint else ""
            if (cfg.validation_steps and self.global_step % cfg.validation_steps == 0 and not last
                    and not self.stop_event.is_set()):
                event.samples = self._validate()
            yield event

    def _save_checkpoint(self) -> Optional[str]:
        cfg = self.config
        path = save_checkpoint(self.accelerator, cfg.output_dir, self.global_step, cfg.checkpoints_total_limit)
        self.last_checkpoint_step = self.global_step
        return path

    def _validate(self) -> list[str]:
        """Validation images for this step (main process only); they go into the model card."""
        cfg, acc = self.config, self.accelerator
        if not cfg.validation_prompts or not cfg.num_validation_images or not acc.is_main_process:
            return []
        paths = write_validation_images(
            cfg, acc, unet=self._unwrap(self.unet), text_encoder=self._unwrap(self.text_encoder), vae=self.vae,
            tokenizer=self.tokenizer, noise_scheduler=self.noise_scheduler, weight_dtype=self.weight_dtype,
            step=self.global_step,
        )
        self.samples = paths  # the latest samples go into the model card
        return paths

    def _finish(self) -> Iterator[TrainEvent]:
        cfg, acc = self.config, self.accelerator
        stopped = self.stop_event.is_set() and self.global_step < self.max_steps
        outputs: dict = {"output_dir": os.path.abspath(cfg.output_dir)}
        samples: list[str] = []
        warnings: list[str] = []
        acc.wait_for_everyone()
        if stopped and self.global_step > 0 and self.last_checkpoint_step != self.global_step:
            outputs["checkpoint"] = self._save_checkpoint()
        if stopped and self.global_step == 0:
            message = "stopped before the first training step: nothing saved"
            yield self._event(message, phase="done", done=True, outputs=outputs, stopped=True,
                              peak_memory_bytes=peak_memory_bytes(acc.device),
                              wall_time=time.perf_counter() - self.start_time)
            return
        if acc.is_main_process:
            if not stopped and cfg.validation_prompts and cfg.num_validation_images:
                yield self._event("making validation images", phase="validation")
                samples = self._validate()
            unet = self._unwrap(self.unet)
            text_encoder = self._unwrap(self.text_encoder) if cfg.train_text_encoder else None
            meta = training_metadata(cfg, {"ss_steps": str(self.global_step)}, base=self._base_model_kind(),
                                     instance_records=self.instance_records, class_records=self.class_records,
                                     started_at=self.started_at)
            outputs["diffusers"] = save_diffusers_lora(cfg.output_dir, unet, text_encoder, meta)
            kohya_path = os.path.join(cfg.output_dir, f"{cfg.effective_output_name}.safetensors")
            outputs["kohya"] = save_kohya_lora(kohya_path, unet, text_encoder, meta)
            outputs["model_card"] = write_model_card(cfg.output_dir, cfg, outputs, self.samples, self.global_step)
            if not cfg.skip_export_check:
                yield self._event("checking the written files against the trained model", phase="verify")
                warnings = self._check_exports(outputs)
        acc.wait_for_everyone()
        wall = time.perf_counter() - self.start_time
        message = ("stopped" if stopped else "finished") + f" at step {self.global_step}"
        if outputs.get("verified"):
            message += f"; {outputs['verified']}"
        yield self._event(message, phase="done", done=True, outputs=outputs, samples=samples, stopped=stopped,
                          peak_memory_bytes=peak_memory_bytes(acc.device), wall_time=wall, warnings=warnings)

    def _check_exports(self, outputs: dict) -> list[str]:
        """Reload both files into a fresh base model and compare with the trained one; the result goes
        into `outputs` ("verified": one line, "export_check": the details). Returns the warnings."""
        cfg = self.config
        files = {kind: outputs[kind] for kind in ("diffusers", "kohya")}
        try:
            report = verify_exports(cfg, files, self._unwrap(self.unet), self._unwrap(self.text_encoder),
                                    self.tokenizer, dtype=self.weight_dtype,
                                    text_encoder_trained=cfg.train_text_encoder)
        except Exception as err:  # e.g. the base model cannot be loaded a second time
            reason = f"{type(err).__name__}: {err}".splitlines()[0]
            logger.warning("EXPORT CHECK: could not load the base model again to check the files: %s", reason)
            outputs["verified"] = f"export check not done ({reason})"
            return [f"the exported files could not be checked: {reason}"]
        outputs["verified"] = report.summary()
        outputs["export_check"] = report.to_dict()
        return report.warnings()

    def close(self) -> None:
        """End trackers and free the accelerator's singleton state, so another run can start in
        this process (the app runs several, possibly with another mixed precision)."""
        if self.accelerator is None:
            return
        for name in ("unet", "text_encoder", "vae", "optimizer"):
            if hasattr(self, name):
                delattr(self, name)
        release_accelerator(self.accelerator)
        self.accelerator = None


def _tracker_config(cfg: TrainConfig) -> dict:
    """Settings for the tracker (TensorBoard hparams accept only scalars and strings)."""
    out = {}
    for key, value in cfg.to_dict().items():
        if isinstance(value, (int, float, str, bool)):
            out[key] = value
        elif value is not None and key not in ("instance_images", "instance_captions"):
            out[key] = str(value)
    return out


__all__ = ["TrainEvent", "train", "VALIDATION_DIR"]
