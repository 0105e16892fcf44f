"""DreamBooth LoRA training for Stable Diffusion 1.x/2.x, as a generator of progress events.

The command line (`train_dreambooth.py`) and the Gradio app drive the same code:

    from adaprelora.training.config import TrainConfig
    from adaprelora.training.dreambooth import train

    config = TrainConfig(pretrained_model_name_or_path="runwayml/stable-diffusion-v1-5",
                         instance_data_dir="dog/", instance_prompt="a photo of sks dog",
                         output_dir="out", max_train_steps=400, validation_prompt="sks dog on a beach")
    stop = threading.Event()                 # stop.set() from another thread ends the run cleanly
    for event in train(config, stop_event=stop):
        print(event.step, event.max_steps, event.loss, event.samples, event.message)
        if event.done:
            print(event.outputs["diffusers"], event.outputs["kohya"])

`train()` raises `adaprelora.training.common.UserError` (one line, the flag named) for mistakes
the user can fix: bad settings, a missing or empty image folder, no usable image, a missing
prompt, an unknown optimizer, a model that cannot be loaded.

Stages, in the order `main()` of diffusers' `train_dreambooth_lora.py` runs them: settings and
images are checked first (before anything heavy is imported or loaded), then the accelerator,
class images for prior preservation, models and LoRA adapters, optimizer, data, scheduler,
`accelerator.prepare`, resume, the training loop (checkpoints and validation images on the way),
and the final files. This module orchestrates them and holds the loop; the stages with a life of
their own live beside it: `dreambooth_models` (loading the pipeline parts, adding LoRA),
`class_images` (prior preservation), `dreambooth_checkpoints` (LoRA-only checkpoints) and
`validation_images`.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

from .class_images import ensure_class_images
from .common import UserError, attach_grad_scaler, peak_memory_bytes, resolve_resume_checkpoint
from .config import TrainConfig
from .data import DreamBoothDataset, ImageRecord, collate_fn, scan_class_images, scan_instance_images
from .dreambooth_checkpoints import register_lora_checkpoint_hooks, remove_stale_temporary_checkpoints, save_checkpoint
from .dreambooth_models import add_lora_adapters, first_line, load_models
from .export import save_diffusers_lora, save_kohya_lora, training_metadata, write_model_card
from .validation_images import VALIDATION_DIR, write_validation_images

logger = logging.getLogger(__name__)


@dataclass
class TrainEvent:
    """One progress report from `train()`.

    Attributes:
        step: optimizer steps done so far (counting those before a resume).
        max_steps: total steps of the run (0 until known).
        loss: training loss of this step (mean over gradient-accumulation micro-batches), or None
            for events that are not a training step.
        lr: learning rate after this step (of the first parameter group).
        steps_per_sec: optimizer steps per second since training (re)started.
        samples: paths of validation PNGs written at this step (empty on most steps).
        message: a human-readable line ("loading models", "saved checkpoint-200", ...); "" on plain
            training steps.
        done: True on the last event only.
        outputs: on the last event: {"output_dir", "diffusers", "kohya", "model_card"} paths, and
            "checkpoint" when a final checkpoint was written (stopped runs). A run stopped before
            its first step saves nothing: only "output_dir" is present.
        warnings: user-facing warnings raised at this point (e.g. skipped unreadable images).
        checkpoint: path of the checkpoint written at this step, if any.
        phase: "setup", "class_images", "train", "validation" or "done".
        epoch: current epoch (0-based).
        stopped: True on the last event when `stop_event` ended the run early.
        peak_memory_bytes: peak accelerator (CUDA) or process (CPU) memory, on the last event.
        wall_time: seconds since `train()` started, on the last event.
    """

    step: int
    max_steps: int
    loss: Optional[float] = None
    lr: Optional[float] = None
    steps_per_sec: Optional[float] = None
    samples: list[str] = field(default_factory=list)
    message: str = ""
    done: bool = False
    outputs: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    checkpoint: Optional[str] = None
    phase: str = "train"
    epoch: int = 0
    stopped: bool = False
    peak_memory_bytes: Optional[int] = None
    wall_time: Optional[float] = None


def train(config: TrainConfig, stop_event: Optional[threading.Event] = None) -> Iterator[TrainEvent]:
    """Run DreamBooth LoRA training described by `config`, yielding `TrainEvent`s as it goes.

    One event per optimizer step (with loss, lr, steps/s and any validation `samples`), a few
    `message` events during setup (loading, class-image generation, resume), and a last event with
    `done=True` and `outputs`. Setting `stop_event` ends training after the current step: a final
    checkpoint and the output files are saved and the last event has `stopped=True`.

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


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
def check_instance_data(config: TrainConfig) -> tuple[list[ImageRecord], list[str]]:
    """The usable instance images and warnings; `UserError` when none is usable or a prompt is
    missing. Cheap (PIL only): the CLI and the app can call it before starting a run."""
    records, warnings = scan_instance_images(
        folder=None if config.instance_images else config.instance_data_dir,
        files=config.instance_images,
        captions=config.instance_captions,
    )
    if not config.instance_prompt:
        uncaptioned = [r.path for r in records if not r.caption]
        if uncaptioned:
            where = f"folder {config.instance_data_dir!r}" if not config.instance_images else "the given images"
            raise UserError(
                f"--instance_prompt is required: {len(uncaptioned)} image(s) in {where} have no caption "
                f"file (<image>.txt), e.g. {os.path.basename(uncaptioned[0])!r}"
            )
    return records, warnings


class _DreamBoothRun:
    """State of one run; `events()` is the generator behind `train()`."""

    def __init__(self, config: TrainConfig, stop_event: threading.Event):
        self.config = config
        self.stop_event = stop_event
        self.start_time = time.perf_counter()
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
        yield self._event(f"found {len(instance_records)} instance image(s)", warnings=warnings)

        # Accelerator
        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

        os.makedirs(cfg.output_dir, exist_ok=True)
        remove_stale_temporary_checkpoints(cfg.output_dir)
        project_config = ProjectConfiguration(
            project_dir=cfg.output_dir, logging_dir=os.path.join(cfg.output_dir, cfg.logging_dir)
        )
        try:
            self.accelerator = Accelerator(
                gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                mixed_precision=cfg.mixed_precision,
                log_with=None if cfg.report_to == "none" else cfg.report_to,
                project_config=project_config,
                # The data order of epoch e depends only on (seed, e): a resumed run sees the same
                # batches as an uninterrupted one.
                dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
            )
        except ValueError as err:
            raise UserError(f"--mixed_precision {cfg.mixed_precision}: {first_line(err)}") from None
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
        from diffusers.optimization import get_scheduler

        updates_per_epoch = math.ceil(len(dataloader) / cfg.gradient_accumulation_steps)
        self.max_steps = cfg.max_train_steps or cfg.num_train_epochs * updates_per_epoch
        num_epochs = math.ceil(self.max_steps / updates_per_epoch)
        if cfg.lr_scheduler != "constant" and cfg.lr_warmup_steps >= self.max_steps:
            logger.warning("--lr_warmup_steps %d is not below the %d training steps", cfg.lr_warmup_steps,
                           self.max_steps)
        lr_scheduler = get_scheduler(
            cfg.lr_scheduler,
            optimizer=self.optimizer,
            num_warmup_steps=cfg.lr_warmup_steps * acc.num_processes,
            num_training_steps=self.max_steps * acc.num_processes,
            num_cycles=cfg.lr_num_cycles,
            power=cfg.lr_power,
        )

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
            try:
                acc.load_state(path)
            except UserError:
                raise
            except Exception as err:
                raise UserError(f"--resume_from_checkpoint: cannot load {path}: {first_line(err)}") from None
            self.global_step = self.last_checkpoint_step = step
            yield self._event(f"resumed from {path} at step {step}")
        first_epoch = self.global_step // updates_per_epoch
        skip_batches = (self.global_step % updates_per_epoch) * cfg.gradient_accumulation_steps

        # Train!
        yield from self._train_loop(dataloader, lr_scheduler, first_epoch, num_epochs, skip_batches)

        # Final files
        yield from self._finish()

    # -- stages ----------------------------------------------------------------------------------
    def _load_models(self) -> None:
        models = load_models(self.config, self.accelerator)
        self.tokenizer, self.noise_scheduler = models.tokenizer, models.noise_scheduler
        self.text_encoder, self.vae, self.unet = models.text_encoder, models.vae, models.unet
        self.weight_dtype = models.weight_dtype

    def _trained_models(self) -> list[torch.nn.Module]:
        models = [self.unet]
        if self.config.train_text_encoder:
            models.append(self.text_encoder)
        return models

    def _unwrap(self, model):
        return self.accelerator.unwrap_model(model)

    def _create_optimizer(self):
        from adaprelora import create_optimizer

        cfg, acc = self.config, self.accelerator
        lr = cfg.learning_rate
        if cfg.scale_lr:
            lr = lr * cfg.gradient_accumulation_steps * cfg.train_batch_size * acc.num_processes
        container = torch.nn.ModuleDict({"unet": self.unet})
        if cfg.train_text_encoder:
            container["text_encoder"] = self.text_encoder
        try:
            return create_optimizer(cfg.optimizer, container, lr=lr, **cfg.optimizer_args)
        except (ValueError, TypeError) as err:
            raise UserError(f"--optimizer {cfg.optimizer} / --optimizer_args: {first_line(err)}") from None

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

    def _train_loop(self, dataloader, lr_scheduler, first_epoch, num_epochs, skip_batches) -> Iterator[TrainEvent]:
        cfg, acc = self.config, self.accelerator
        params_to_clip = [p for m in self._trained_models() for p in m.parameters() if p.requires_grad]
        yield self._event(f"training {self.max_steps} steps ({self.max_steps - self.global_step} to go)", phase="train")
        loop_start = time.perf_counter()
        steps_this_session = 0
        accumulated, micro_batches = 0.0, 0
        for epoch in range(first_epoch, num_epochs):
            if self.global_step >= self.max_steps or self.stop_event.is_set():
                break
            for model in self._trained_models():
                model.train()
            dataloader.set_epoch(epoch)
            self.dataset.set_epoch(epoch)
            loader = dataloader
            if epoch == first_epoch and skip_batches:
                loader = acc.skip_first_batches(dataloader, skip_batches)
            for batch in loader:
                with acc.accumulate(*self._trained_models()):
                    loss = self._loss(batch)
                    acc.backward(loss)
                    if acc.sync_gradients and cfg.max_grad_norm > 0:
                        acc.clip_grad_norm_(params_to_clip, cfg.max_grad_norm)
                    self.optimizer.step()
                    lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                accumulated += float(loss.detach())
                micro_batches += 1
                if not acc.sync_gradients:
                    continue

                self.global_step += 1
                steps_this_session += 1
                step_loss = accumulated / max(1, micro_batches)
                accumulated, micro_batches = 0.0, 0
                lr = float(lr_scheduler.get_last_lr()[0])
                elapsed = time.perf_counter() - loop_start
                acc.log({"loss": step_loss, "lr": lr}, step=self.global_step)
                if not math.isfinite(step_loss):
                    logger.warning("step %d: the loss is %s", self.global_step, step_loss)

                event = self._event(phase="train", loss=step_loss, lr=lr, epoch=epoch,
                                    steps_per_sec=steps_this_session / elapsed if elapsed > 0 else None)
                last = self.global_step >= self.max_steps
                if self.global_step % cfg.checkpointing_steps == 0:
                    event.checkpoint = self._save_checkpoint()
                    event.message = f"saved {os.path.basename(event.checkpoint)}" if event.checkpoint else ""
                if (cfg.validation_steps and self.global_step % cfg.validation_steps == 0 and not last
                        and not self.stop_event.is_set()):
                    event.samples = self._validate()
                yield event
                if last or self.stop_event.is_set():
                    break
            if self.global_step >= self.max_steps or self.stop_event.is_set():
                break

    def _save_checkpoint(self) -> Optional[str]:
        path = save_checkpoint(self.config, self.accelerator, self.global_step)
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
            meta = training_metadata(cfg, {"ss_steps": str(self.global_step),
                                           "ss_training_finished_at": str(int(time.time()))})
            outputs["diffusers"] = save_diffusers_lora(cfg.output_dir, unet, text_encoder, meta)
            kohya_path = os.path.join(cfg.output_dir, f"{cfg.effective_output_name}.safetensors")
            outputs["kohya"] = save_kohya_lora(kohya_path, unet, text_encoder, meta)
            outputs["model_card"] = write_model_card(cfg.output_dir, cfg, outputs, self.samples, self.global_step)
        acc.wait_for_everyone()
        wall = time.perf_counter() - self.start_time
        message = ("stopped" if stopped else "finished") + f" at step {self.global_step}"
        yield self._event(message, phase="done", done=True, outputs=outputs, samples=samples, stopped=stopped,
                          peak_memory_bytes=peak_memory_bytes(acc.device), wall_time=wall)

    def close(self) -> None:
        """End trackers and free the accelerator's singleton state, so another run can start in
        this process (the app runs several, possibly with another mixed precision)."""
        acc = self.accelerator
        if acc is None:
            return
        try:
            acc.end_training()
        except Exception:  # pragma: no cover - tracker already closed
            pass
        acc.free_memory()
        for name in ("unet", "text_encoder", "vae", "optimizer"):
            if hasattr(self, name):
                delattr(self, name)
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state()
        GradientState._reset_state()
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


def run_cli_training(config: TrainConfig) -> TrainEvent:
    """Drive `train()` for the command line: messages and warnings on stderr, a tqdm bar with loss,
    lr and steps/s, and a final line with the output paths, wall time and peak memory (stdout).
    Only the main process prints. Returns the last event."""
    import sys

    from tqdm.auto import tqdm

    from .common import format_bytes

    is_main = os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"
    logging.basicConfig(format="%(levelname)s: %(message)s", level=logging.WARNING if is_main else logging.ERROR)
    bar = None
    last = None
    try:
        for event in train(config):
            if last is None:
                _quiet_libraries()  # after the cheap checks: bad input fails before heavy imports
            last = event
            if not is_main:
                continue
            write = (bar.write if bar is not None else print)
            for warning in event.warnings:
                write(f"warning: {warning}", file=sys.stderr)
            if event.phase == "train" and event.loss is not None:
                if bar is None:
                    bar = tqdm(total=event.max_steps, initial=event.step - 1, desc="Steps", unit="step",
                               dynamic_ncols=True)
                postfix = {"loss": f"{event.loss:.4f}", "lr": f"{event.lr:.2e}"}
                if event.steps_per_sec:
                    postfix["steps/s"] = f"{event.steps_per_sec:.2f}"
                bar.set_postfix(postfix, refresh=False)
                bar.update(event.step - bar.n)
            if event.message and not event.done:
                write(event.message, file=sys.stderr)
            for sample in event.samples:
                if not event.done:
                    write(f"sample: {sample}", file=sys.stderr)
    finally:
        if bar is not None:
            bar.close()
    if is_main and last is not None and last.done:
        out = last.outputs
        print(
            f"{last.message}: LoRA saved to {out.get('diffusers')} (diffusers) and {out.get('kohya')} "
            f"(kohya/A1111), model card {out.get('model_card')}; wall time {last.wall_time:.1f} s, "
            f"peak memory {format_bytes(last.peak_memory_bytes or 0)}",
            flush=True,
        )
    return last


def _quiet_libraries() -> None:
    """Keep library chatter (weight-loading bars, info logs) off the CLI's output."""
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
    except Exception:  # pragma: no cover - logging helpers moved
        pass


__all__ = ["TrainEvent", "check_instance_data", "run_cli_training", "train", "VALIDATION_DIR"]
