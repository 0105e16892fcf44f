"""DreamBooth LoRA training for Stable Diffusion 1.x/2.x and SDXL, as a generator of progress events.

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
(`adaprelora.training.loop`); the stages with a life of their own live beside it: `family`
(SD 1.x, 2.x or SDXL), `models` (`DreamBoothModels`: loading the pipeline parts, adding LoRA),
`sdxl` (SDXL's flags and conditioning), `buckets`
(aspect-ratio buckets), `latent_cache` (`--cache_latents`), `loss`, `class_images` (prior
preservation), `checkpoints` (LoRA-only checkpoints), `validation` and `export`; and for kohya's
features `dataset_config` and `captions` (`--dataset_config`, tag shuffling), `masks` (masked
loss), `lycoris_network` (LoHa / LoKr) and `training.ema` (`--use_ema`).
"""
from __future__ import annotations

import contextlib
import json
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
    set_aside,
)
from ..ema import EMA_STATE_FILE, ParameterEMA, load_ema, save_ema
from ..errors import UserError
from ..loop import TrainEvent, make_accelerator, peak_memory_bytes, release_accelerator, training_steps
from ..options import attach_grad_scaler, build_lr_scheduler, build_optimizer
from .checkpoints import register_lora_checkpoint_hooks
from .class_images import ensure_class_images
from .config import TrainConfig
from .data import (
    ImageRecord,
    build_dataloader,
    check_instance_data,
    check_reg_data,
    scan_class_images,
    scan_instance_images,
)
from .export import (
    remove_stale_temporary_exports,
    save_diffusers_lora,
    save_kohya_lora,
    training_metadata,
    write_model_card,
)
from .family import ModelFamily, detect_family
from .latent_cache import LATENT_CACHE_DIR, cache_latents, sample_latents
from .loss import denoising_loss
from .lycoris_network import create_lycoris_network, save_lycoris_outputs, uses_lycoris, verify_lycoris_file
from .masks import find_loss_masks
from .models import DreamBoothModels, add_lora_adapters, load_models
from .sdxl import check_flags_for_family, encode_prompts_sdxl, tokenize, unet_added_conditioning
from .validation import VALIDATION_DIR, write_validation_images
from .validation_loss import ValidationLossSet, split_holdout
from .validation_loss_log import ValidationLossLog
from .verify import verify_exports

logger = logging.getLogger(__name__)
# Class images (the first ones) the prior's validation loss is measured on, with prior preservation.
PRIOR_VALIDATION_IMAGES = 4
# Where the files of a run whose export check failed go, so none of them passes for a finished LoRA.
EXPORT_CHECK_FAILED_DIR = "export-check-failed"
# --use_ema --ema_save_raw: the diffusers file of the weights without EMA (diffusers' loader, given the
# folder, still picks pytorch_lora_weights.safetensors).
RAW_DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights_raw.safetensors"


def train(config: TrainConfig, stop_event: Optional[threading.Event] = None) -> Iterator[TrainEvent]:
    """Run DreamBooth LoRA training described by `config`, yielding `TrainEvent`s as it goes.

    One event per optimizer step (with loss, lr, steps/s and any validation `samples`), a few
    `message` events during setup (loading, class-image generation, resume), and a last event with
    `done=True` and `outputs`: {"output_dir", "diffusers", "kohya", "model_card"} paths, and
    "checkpoint" when a final checkpoint was written (stopped runs), "verified" (one line: did both
    files, loaded into a fresh base model with diffusers' `load_lora_weights`, reproduce the trained
    model) and "export_check" (the details), unless
    `skip_export_check`; a run stopped before its first
    step saves nothing and has only "output_dir". Setting `stop_event` ends training after the
    current step: a final checkpoint and the output files are saved and the last event has
    `stopped=True`.

    Output files in `config.output_dir`: `pytorch_lora_weights.safetensors` (diffusers),
    `<output_name>.safetensors` (kohya/A1111), `README.md`, `checkpoint-<step>/` folders,
    `validation/*.png` and tracker logs under `logs/`. With `--use_ema` the samples, the validation
    loss and both files hold the EMA of the weights ("ema" in `outputs`: its decay and update count),
    every checkpoint its state (`ema_state.safetensors`), and with `--ema_save_raw` the last step's
    own weights go to `pytorch_lora_weights_raw.safetensors` and `<output_name>_raw.safetensors`
    (outputs "diffusers_raw", "kohya_raw"). With held-out images (`--validation_split`
    or `--validation_loss_data_dir`), `validation_loss.jsonl` (one line per evaluation; events of
    evaluated steps carry `validation_loss`) and the outputs "validation_loss" (its path) and
    "best_validation_loss" (the record with the lowest loss).

    Raises `UserError` for problems the user can fix, `TrainingDiverged` (a `UserError`) when the
    loss or the weights stop being finite, and `UserError` when the export check finds that the
    written files do not reproduce the trained model (they are then moved into
    `export-check-failed/`, so nothing in `output_dir` passes for a finished LoRA). Closing the
    generator early (e.g. the consumer stops iterating) releases the models without writing outputs.
    """
    config.validate()
    run = _DreamBoothRun(config, stop_event or threading.Event())
    try:
        yield from run.events()
    finally:
        run.close()


class _DreamBoothRun:
    """State of one run; `events()` is the generator behind `train()`. The pipeline parts travel
    together as `self.models` (`DreamBoothModels`); after `accelerator.prepare` the trained ones are
    accelerate's wrappers, and `self.models.unwrapped(...)` is what sampling and saving see."""

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
        self.family = ModelFamily()  # SD 1.x, 2.x or SDXL: decided from the model's files first
        self.models: Optional[DreamBoothModels] = None
        self.optimizer = None
        self.dataset = None
        self.batch_sampler = None  # with --enable_bucket: one bucket per batch, reseeded each epoch
        self.loss_masks = None  # masks.LossMasks with --masked_loss / --alpha_mask
        self.prompt_cache: Optional[dict] = None  # prompt -> (hidden, pooled) with --cache_latents
        self.holdout_records: list[ImageRecord] = []  # the validation loss's images
        self.loss_sets: dict[str, ValidationLossSet] = {}  # "validation_loss" (and "prior_validation_loss")
        self.loss_log: Optional[ValidationLossLog] = None
        self.ema: Optional[ParameterEMA] = None  # --use_ema: the average of the trained tensors

    # -- event helpers ---------------------------------------------------------------------------
    def _event(self, message: str = "", phase: str = "setup", **kw) -> TrainEvent:
        return TrainEvent(step=self.global_step, max_steps=self.max_steps, message=message, phase=phase, **kw)

    # -- the run ---------------------------------------------------------------------------------
    def events(self) -> Iterator[TrainEvent]:
        cfg = self.config
        # Check the images before anything heavy: a bad folder fails in a fraction of a second.
        self.instance_records, warnings = check_instance_data(cfg)
        self.loss_masks, mask_warnings = find_loss_masks(cfg, self.instance_records)
        yield self._event(f"found {len(self.instance_records)} instance image(s)", warnings=warnings + mask_warnings)
        yield from self._hold_out()
        self.family = detect_family(cfg.pretrained_model_name_or_path, cfg.revision)
        check_flags_for_family(cfg, self.family)
        self._start_accelerator()
        if cfg.with_prior_preservation:
            yield from self._class_images()
        yield self._event(f"loading {cfg.pretrained_model_name_or_path}")
        self._load_models()
        yield from self._build_validation_loss_sets()
        dataloader, updates_per_epoch = yield from self._data()
        dataloader, lr_scheduler = self._prepare(dataloader, self._lr_scheduler())
        self._start_ema()
        yield from self._resume()
        yield from self._train_loop(dataloader, lr_scheduler, updates_per_epoch)
        yield from self._finish()

    # -- stages ----------------------------------------------------------------------------------
    def _hold_out(self) -> Iterator[TrainEvent]:
        """The validation loss's images: `--validation_split` takes a share of the instance images
        out of training (drawn by `--seed`), `--validation_loss_data_dir` brings its own."""
        cfg = self.config
        if cfg.validation_split is not None:
            n = len(self.instance_records)
            if n < 2:
                raise UserError(f"--validation_split needs at least 2 usable instance images to keep one for training, "
                                f"found {n}: add images or give held-out ones with --validation_loss_data_dir")
            self.instance_records, self.holdout_records = split_holdout(self.instance_records, cfg.validation_split,
                                                                        seed=cfg.seed or 0)
            yield self._event(f"holding out {len(self.holdout_records)} of {n} instance image(s) for the validation "
                              f"loss, training on {len(self.instance_records)}")
        elif cfg.validation_loss_data_dir:
            records, warnings = scan_instance_images(folder=cfg.validation_loss_data_dir,
                                                     flag="--validation_loss_data_dir")
            uncaptioned = [r.path for r in records if not r.caption]
            if uncaptioned and not cfg.instance_prompt:
                raise UserError(f"--validation_loss_data_dir: {len(uncaptioned)} image(s) have no caption file "
                                f"(<image>.txt), e.g. {os.path.basename(uncaptioned[0])!r}: add captions or give "
                                "--instance_prompt")
            self.holdout_records = records
            yield self._event(f"found {len(records)} held-out image(s) for the validation loss", warnings=warnings)

    def _start_accelerator(self) -> None:
        """The output folder (cleared of what a killed run left half-written), the accelerator, seeds."""
        from accelerate.utils import ProjectConfiguration, set_seed

        cfg = self.config
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
        if cfg.seed is not None:
            set_seed(cfg.seed)
        if cfg.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True

    def _class_images(self) -> Iterator[TrainEvent]:
        """Class images for prior preservation (generated with the base model when missing), or the
        `is_reg` subsets of `--dataset_config`."""
        cfg = self.config
        if cfg.dataset_config:
            self.class_records, reg_warnings = check_reg_data(cfg)
            yield self._event(f"found {len(self.class_records)} regularisation image(s)", warnings=reg_warnings)
            return
        for message in ensure_class_images(cfg, self.accelerator, self.stop_event, self.family):
            yield self._event(message, phase="class_images")
        class_records, class_warnings = scan_class_images(cfg.class_data_dir)
        if class_warnings:
            yield self._event("class images checked", warnings=class_warnings)
        self.class_records = class_records[: cfg.num_class_images]
        if not self.class_records:
            raise UserError(f"--class_data_dir: no usable class image in folder {cfg.class_data_dir!r}")

    def _load_models(self) -> None:
        """The pipeline parts with their LoRA adapters, the checkpoint hooks and the optimizer."""
        cfg, acc = self.config, self.accelerator
        self.models = load_models(cfg, acc, self.family)
        if uses_lycoris(cfg):  # LoHa / LoKr from lycoris-lora, registered under the models it wraps
            create_lycoris_network(cfg, self.models.unet, self.models.trained_text_encoders)
        else:
            add_lora_adapters(cfg, self.models)
        # Checkpoints hold only the LoRA tensors (diffusers format), not the frozen model.
        register_lora_checkpoint_hooks(acc, self.models)
        self.optimizer = self._create_optimizer()

    def _build_validation_loss_sets(self) -> Iterator[TrainEvent]:
        """Encode the held-out images once (and, with prior preservation, the first class images),
        with their fixed timesteps and noise; the main process evaluates them."""
        cfg, models = self.config, self.models
        if not self.holdout_records or not self.accelerator.is_main_process:
            return
        yield self._event(f"encoding {len(self.holdout_records)} held-out image(s) for the validation loss")
        sets = {"validation_loss": ([r.path for r in self.holdout_records],
                                    [r.caption or cfg.instance_prompt or "" for r in self.holdout_records])}
        if cfg.with_prior_preservation and self.class_records:
            prior = self.class_records[:PRIOR_VALIDATION_IMAGES]
            sets["prior_validation_loss"] = ([r.path for r in prior], [r.caption or cfg.class_prompt for r in prior])
        for key, (paths, captions) in sets.items():
            self.loss_sets[key] = ValidationLossSet.from_images(paths, captions, models.vae, models.noise_scheduler,
                                                                resolution=cfg.resolution)

    def _evaluate_validation_loss(self) -> dict:
        """Score the held-out sets with the current weights; the record goes to
        `validation_loss.jsonl` and to the tracker beside the training loss."""
        view = self.models.unwrapped(self.accelerator)
        with self._ema_weights():
            values = {key: vset.evaluate(view) for key, vset in self.loss_sets.items()}
        record = self.loss_log.add(self.global_step, values["validation_loss"], values.get("prior_validation_loss"))
        self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=self.global_step)
        return record

    def _create_optimizer(self):
        cfg, acc = self.config, self.accelerator
        lr = cfg.learning_rate
        if cfg.scale_lr:
            lr = lr * cfg.gradient_accumulation_steps * cfg.train_batch_size * acc.num_processes
        container = torch.nn.ModuleDict(self.models.named_trained())
        return build_optimizer(cfg.optimizer, container, lr, cfg.optimizer_args)

    def _data(self):
        """The dataset and data loader (and with `--cache_latents` the cache); sets `max_steps`.
        Returns (dataloader, optimizer steps per epoch)."""
        cfg = self.config
        self.dataset, dataloader, table = build_dataloader(cfg, self.instance_records, self.class_records,
                                                           masks=self.loss_masks)
        self.batch_sampler = dataloader.batch_sampler if cfg.enable_bucket else None
        if table:
            yield self._event(table)
        if cfg.uses_latent_cache:
            yield from self._cache()
        updates_per_epoch = math.ceil(len(dataloader) / cfg.gradient_accumulation_steps)
        self.max_steps = cfg.max_train_steps or cfg.num_train_epochs * updates_per_epoch
        return dataloader, updates_per_epoch

    def _lr_scheduler(self):
        cfg = self.config
        if cfg.lr_scheduler != "constant" and cfg.lr_warmup_steps >= self.max_steps:
            logger.warning("--lr_warmup_steps %d is not below the %d training steps", cfg.lr_warmup_steps,
                           self.max_steps)
        return build_lr_scheduler(cfg.lr_scheduler, self.optimizer, warmup_steps=cfg.lr_warmup_steps,
                                  total_steps=self.max_steps, num_processes=self.accelerator.num_processes,
                                  num_cycles=cfg.lr_num_cycles, power=cfg.lr_power)

    def _prepare(self, dataloader, lr_scheduler):
        """`accelerator.prepare` the trained models (the UNet, and the text encoder(s) with
        `--train_text_encoder`), the optimizer, data loader and schedule; start the trackers."""
        cfg, acc = self.config, self.accelerator
        *prepared, self.optimizer, dataloader, lr_scheduler = acc.prepare(*self.models.trained, self.optimizer,
                                                                          dataloader, lr_scheduler)
        self.models = self.models.with_trained(prepared)
        if acc.mixed_precision == "fp16":
            attach_grad_scaler(self.optimizer, acc.scaler)
        if acc.is_main_process and cfg.report_to != "none":
            acc.init_trackers("dreambooth-lora", config=cfg.tracker_config())
        return dataloader, lr_scheduler

    def _resume(self) -> Iterator[TrainEvent]:
        cfg = self.config
        resume = resolve_resume_checkpoint(cfg.output_dir, cfg.resume_from_checkpoint)
        if cfg.resume_from_checkpoint and resume is None:
            yield self._event(f"no checkpoint in {cfg.output_dir} to resume from: starting a new run")
        if resume is not None:
            step, path = resume
            load_checkpoint(self.accelerator, path)
            self.global_step = self.last_checkpoint_step = step
            yield self._event(f"resumed from {path} at step {step}")
            yield from self._resume_ema(path)

    # -- EMA of the weights (--use_ema) ----------------------------------------------------------
    def _start_ema(self) -> None:
        """The fp32 average of every trained tensor (what has `requires_grad` in the trained
        models), from their values now; on the device, or the CPU with `--ema_cpu`."""
        cfg = self.config
        if not cfg.use_ema:
            return
        named = [(f"{prefix}.{name}", p)
                 for prefix, model in self.models.unwrapped(self.accelerator).named_trained().items()
                 for name, p in model.named_parameters() if p.requires_grad]
        self.ema = ParameterEMA([p for _, p in named], cfg.ema_decay, warmup=cfg.ema_warmup,
                                update_after_step=cfg.ema_update_after_step,
                                device="cpu" if cfg.ema_cpu else None, names=[n for n, _ in named])

    def _ema_weights(self):
        """With `--use_ema`, the EMA weights in the models for the time of the `with` block (the
        raw ones restored exactly afterwards); without, nothing changes."""
        return self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext()

    def _resume_ema(self, path: str) -> Iterator[TrainEvent]:
        """The EMA state of the checkpoint at `path` (a checkpoint without one starts the EMA from
        its weights, with a warning)."""
        name = os.path.basename(os.path.normpath(path))
        if self.ema is None:
            if os.path.isfile(os.path.join(path, EMA_STATE_FILE)):
                yield self._event(warnings=[f"{name} holds an EMA of the weights but --use_ema is not set: "
                                            "training goes on without it"])
            return
        try:
            found = load_ema(self.ema, path)
        except ValueError as err:
            raise UserError(f"--resume_from_checkpoint: {path}: {err}; resume with the LoRA settings it was "
                            "saved with") from None
        if found:
            yield self._event(f"resumed the EMA of the weights ({self.ema.num_updates} updates)")
        else:
            self.ema.reset()
            yield self._event(warnings=[f"{name} holds no EMA of the weights (saved without --use_ema): the EMA "
                                        "starts from its weights"])

    def _ema_metadata(self, weights: str) -> dict:
        """The files' header entry saying which weights they hold ("ema" or "raw"); {} without EMA."""
        if self.ema is None:
            return {}
        return {"adaprelora_ema": {"weights": weights, "decay": self.ema.decay, "warmup": self.ema.warmup,
                                   "update_after_step": self.ema.update_after_step,
                                   "updates": self.ema.num_updates, "last_decay": self.ema.last_decay}}

    def _encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(hidden states, SDXL's pooled embedding or None) of `prompts`; from the prompt cache when
        the text encoders are frozen and `--cache_latents` computed it."""
        if self.prompt_cache is not None:
            hidden, pooled = zip(*(self.prompt_cache[p] for p in prompts))
            return torch.cat(hidden), (torch.cat(pooled) if self.models.sdxl else None)
        models, device = self.models, self.accelerator.device
        if models.sdxl:
            return encode_prompts_sdxl(models.text_encoders, models.tokenizers, prompts, device)
        return models.text_encoder(tokenize(models.tokenizer, prompts, device), return_dict=False)[0], None

    def _cache(self) -> Iterator[TrainEvent]:
        """`--cache_latents`: encode the images (and, frozen, the prompts) once; then the VAE moves
        to the CPU (validation images bring it back for the time they take)."""
        cfg, acc, vae = self.config, self.accelerator, self.models.vae
        disk = os.path.join(cfg.output_dir, LATENT_CACHE_DIR) if cfg.cache_latents_to_disk else None
        vae_id = f"{cfg.pretrained_vae_model_name_or_path or cfg.pretrained_model_name_or_path}:{vae.dtype}"
        for message in cache_latents(self.dataset, vae, acc.device, vae_id=vae_id, disk_dir=disk):
            yield self._event(message, phase="cache")
        prompts = self.dataset.cacheable_prompts()  # None: captions change every step (shuffled tags)
        if not cfg.train_text_encoder and prompts is not None:
            with torch.no_grad():
                cache = {prompt: self._encode_prompts([prompt]) for prompt in sorted(prompts)}
            self.prompt_cache = cache
            yield self._event(f"cached the embeddings of {len(prompts)} prompt(s)", phase="cache")
        vae.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _loss(self, batch: dict) -> torch.Tensor:
        models, device = self.models, self.accelerator.device
        vae, dtype = models.vae, models.weight_dtype
        if "latent_params" in batch:
            latents = sample_latents(batch["latent_params"].to(device, dtype=vae.dtype), vae)
        else:
            pixel_values = batch["pixel_values"].to(device, dtype=vae.dtype)
            with torch.no_grad():
                latents = vae.encode(pixel_values).latent_dist.sample() * vae.config.scaling_factor
        latents = latents.to(dtype)
        with torch.set_grad_enabled(self.config.train_text_encoder):
            hidden, pooled = self._encode_prompts(batch["prompts"])
        added = None
        if models.sdxl:  # the target size is the batch's pixel size (its bucket)
            factor = 2 ** (len(vae.config.block_out_channels) - 1)
            target_size = (latents.shape[-2] * factor, latents.shape[-1] * factor)
            added = unet_added_conditioning(pooled, batch, target_size, dtype=dtype)
        return denoising_loss(self.config, models.noise_scheduler, models.unet, latents, hidden.to(dtype), added,
                              masks=batch.get("masks"))

    def _train_loop(self, dataloader, lr_scheduler, updates_per_epoch: int) -> Iterator[TrainEvent]:
        cfg, acc = self.config, self.accelerator
        yield self._event(f"training {self.max_steps} steps ({self.max_steps - self.global_step} to go)", phase="train")
        if self.loss_sets:  # the starting point: the base model's (or the resumed weights') loss
            self.loss_log = ValidationLossLog(cfg.output_dir, start_step=self.global_step)
            record = self._evaluate_validation_loss()
            yield self._event(phase="eval", validation_loss=record["validation_loss"],
                              prior_validation_loss=record.get("prior_validation_loss"))
        steps = training_steps(
            acc, models=self.models.trained, dataloader=dataloader, optimizer=self.optimizer,
            lr_scheduler=lr_scheduler, compute_loss=self._loss, start_step=self.global_step,
            max_steps=self.max_steps, updates_per_epoch=updates_per_epoch, stop_event=self.stop_event,
            clip_parameters=[p for m in self.models.trained for p in m.parameters() if p.requires_grad],
            max_grad_norm=cfg.max_grad_norm, on_epoch_start=self._set_epoch,
        )
        for event in steps:
            self.global_step = event.step
            if self.ema is not None:  # before the checkpoint, which holds it
                self.ema.update()
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
            if self.loss_log is not None and (self.global_step % cfg.validation_loss_steps == 0 or last):
                record = self._evaluate_validation_loss()
                event.validation_loss = record["validation_loss"]
                event.prior_validation_loss = record.get("prior_validation_loss")
            yield event

    def _set_epoch(self, epoch: int) -> None:
        """Seed the epoch's crops, flips and (with buckets) batch order."""
        self.dataset.set_epoch(epoch)
        if self.batch_sampler is not None:
            self.batch_sampler.set_epoch(epoch)

    def _save_checkpoint(self) -> Optional[str]:
        cfg = self.config
        save_extra = (lambda folder: save_ema(self.ema, folder)) if self.ema is not None else None
        path = save_checkpoint(self.accelerator, cfg.output_dir, self.global_step, cfg.checkpoints_total_limit,
                               save_extra=save_extra)
        self.last_checkpoint_step = self.global_step
        return path

    def _validate(self) -> list[str]:
        """Validation images for this step (main process only); they go into the model card."""
        cfg, acc = self.config, self.accelerator
        if not cfg.validation_prompts or not cfg.num_validation_images or not acc.is_main_process:
            return []
        vae = self.models.vae
        vae_device = next(vae.parameters()).device
        vae.to(acc.device)  # back from the CPU after --cache_latents, for the time it takes
        try:
            with self._ema_weights():
                paths = write_validation_images(cfg, acc, self.models.unwrapped(acc), step=self.global_step)
        finally:
            vae.to(vae_device)
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
        final_loss: dict = {}
        if self.loss_log is not None:
            if self.loss_log.last_step != self.global_step:  # a stopped run: score the weights it keeps
                record = self._evaluate_validation_loss()
                final_loss = {"validation_loss": record["validation_loss"],
                              "prior_validation_loss": record.get("prior_validation_loss")}
            outputs["validation_loss"] = self.loss_log.path
            outputs["best_validation_loss"] = self.loss_log.best()
        if acc.is_main_process:
            if not stopped and cfg.validation_prompts and cfg.num_validation_images:
                yield self._event("making validation images", phase="validation")
                samples = self._validate()
            view = self.models.unwrapped(acc)
            meta = training_metadata(cfg, {"ss_steps": str(self.global_step), **self._ema_metadata("ema")},
                                     base=view.family, instance_records=self.instance_records,
                                     class_records=self.class_records, started_at=self.started_at)
            with self._ema_weights():  # the files, and the check of them, hold the EMA weights with --use_ema
                if uses_lycoris(cfg):  # one file in LyCORIS's format: diffusers has no LoHa/LoKr format
                    outputs.update(save_lycoris_outputs(cfg, view, meta))
                else:
                    outputs["diffusers"] = save_diffusers_lora(cfg.output_dir, view.unet, view.trained_text_encoders,
                                                               meta)
                    kohya_path = os.path.join(cfg.output_dir, f"{cfg.effective_output_name}.safetensors")
                    outputs["kohya"] = save_kohya_lora(kohya_path, view.unet, view.trained_text_encoders, meta)
                outputs["model_card"] = write_model_card(cfg.output_dir, cfg, outputs, self.samples,
                                                         self.global_step, family=view.family)
                if not cfg.skip_export_check:
                    yield self._event("checking the written files against the trained model", phase="verify")
                    warnings = self._check_exports(outputs)
                    if not outputs.get("export_check", {}).get("ok", True):
                        folder = set_aside(cfg.output_dir, [outputs[k] for k in ("diffusers", "kohya", "model_card") if k in outputs],
                                           EXPORT_CHECK_FAILED_DIR)
                        raise UserError(f"{outputs['verified']}: the written files do not reproduce the trained "
                                        f"model; they were moved to {folder} for inspection (checkpoints are kept)")
            if self.ema is not None:
                outputs["ema"] = {"decay": self.ema.decay, "updates": self.ema.num_updates,
                                  "last_decay": self.ema.last_decay}
                message = (f"the files hold the EMA of the weights ({self.ema.num_updates} updates, decay "
                           f"{self.ema.last_decay or 0:.4f} at the last)")
                if cfg.ema_save_raw:
                    raw = self._save_raw_weights(view, meta)
                    outputs.update(raw)
                    message += f"; without EMA: {' and '.join(raw.values())}"
                yield self._event(message, phase="verify")
        acc.wait_for_everyone()
        wall = time.perf_counter() - self.start_time
        message = ("stopped" if stopped else "finished") + f" at step {self.global_step}"
        if outputs.get("verified"):
            message += f"; {outputs['verified']}"
        if outputs.get("note"):  # e.g. a LyCORIS run: why there is no diffusers-format file
            message += f"; {outputs['note']}"
        best = outputs.get("best_validation_loss")
        if best:
            message += f"; best validation loss {best['validation_loss']:.5f} at step {best['step']}"
        yield self._event(message, phase="done", done=True, outputs=outputs, samples=samples, stopped=stopped,
                          peak_memory_bytes=peak_memory_bytes(acc.device), wall_time=wall, warnings=warnings,
                          **final_loss)

    def _save_raw_weights(self, view, meta: dict) -> dict:
        """`--ema_save_raw`: the last step's own weights beside the EMA files, in the same formats
        (`<output_name>_raw.safetensors`, and `pytorch_lora_weights_raw.safetensors` unless LyCORIS)."""
        cfg = self.config
        meta = {**meta, **{k: json.dumps(v) for k, v in self._ema_metadata("raw").items()}}
        kohya_path = os.path.join(cfg.output_dir, f"{cfg.effective_output_name}_raw.safetensors")
        if uses_lycoris(cfg):
            from .lycoris_network import network_metadata, save_lycoris_file

            return {"kohya_raw": save_lycoris_file(kohya_path, [view.unet, *view.trained_text_encoders],
                                                   {**meta, **network_metadata(cfg)})}
        return {"diffusers_raw": save_diffusers_lora(cfg.output_dir, view.unet, view.trained_text_encoders, meta,
                                                     weight_name=RAW_DIFFUSERS_WEIGHT_NAME),
                "kohya_raw": save_kohya_lora(kohya_path, view.unet, view.trained_text_encoders, meta)}

    def _check_exports(self, outputs: dict) -> list[str]:
        """Reload both files into a fresh base model and compare with the trained one; the result goes
        into `outputs` ("verified": one line, "export_check": the details). Returns the warnings."""
        cfg = self.config
        files = {kind: outputs[kind] for kind in ("diffusers", "kohya") if kind in outputs}
        view = self.models.unwrapped(self.accelerator)
        try:
            if uses_lycoris(cfg):  # reloaded with lycoris.create_lycoris_from_weights
                report = verify_lycoris_file(cfg, files["kohya"], view, text_encoder_trained=cfg.train_text_encoder)
            else:
                report = verify_exports(cfg, files, view.unet, view.text_encoders, view.tokenizers,
                                        dtype=view.weight_dtype, text_encoder_trained=cfg.train_text_encoder)
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
        self.models = self.optimizer = self.prompt_cache = self.dataset = self.batch_sampler = self.ema = None
        release_accelerator(self.accelerator)
        self.accelerator = None


__all__ = ["TrainEvent", "train", "VALIDATION_DIR"]
