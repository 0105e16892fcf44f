"""The training loop both trainers share, and the event it reports progress with.

`training_steps` runs epochs of micro-batches under `accelerator.accumulate` (backward, clipping,
optimizer and scheduler steps), skips the batches a resumed run has already seen, stops at
`max_steps` or when `stop_event` is set, and yields one `TrainEvent` per optimizer step. A trainer
adds its own work between the events (logging, checkpoints, validation) and passes them on, so the
CLIs and the app drive every trainer the same way: `for event in train(config, stop_event): ...`.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional

import torch

from .errors import TrainingDiverged
from .options import optimizer_mode

# Under an fp16 loss scaler a non-finite loss skips its step (the scaler lowers the scale and the
# weights stay as they were), so a few in a row are normal; this many in a row means the run is stuck.
SCALER_NONFINITE_LIMIT = 5


@dataclass
class TrainEvent:
    """One progress report of a trainer's `train()`.

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
        outputs: on the last event, the files the run wrote (each trainer documents its keys).
        warnings: user-facing warnings raised at this point (e.g. skipped unreadable images).
        checkpoint: path of the checkpoint written at this step, if any.
        phase: "setup", "class_images", "train", "validation", "eval", "verify" (checking the written
            files) or "done".
        epoch: current epoch (0-based).
        stopped: True on the last event when `stop_event` ended the run early.
        peak_memory_bytes: peak accelerator (CUDA) or process (CPU) memory, on the last event.
        wall_time: seconds since `train()` started, on the last event.
        metrics: on the last event of a run that evaluates, the evaluation metrics.
        summary: on the last event of a run that writes one, its summary (e.g. `metrics.json`).
        validation_loss: the held-out loss evaluated at this step, if any (the LLM trainer's
            `--eval_steps`, DreamBooth's `--validation_loss_steps`).
        prior_validation_loss: DreamBooth with prior preservation: the same loss on class images.
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
    metrics: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    validation_loss: Optional[float] = None
    prior_validation_loss: Optional[float] = None


def training_steps(
    accelerator,
    *,
    models: list[torch.nn.Module],
    dataloader,
    optimizer,
    lr_scheduler,
    compute_loss: Callable[[dict], torch.Tensor],
    start_step: int,
    max_steps: int,
    updates_per_epoch: int,
    stop_event: threading.Event,
    clip_parameters: Iterable[torch.nn.Parameter] = (),
    max_grad_norm: Optional[float] = None,
    reduce_loss: bool = False,
    on_epoch_start: Optional[Callable[[int], None]] = None,
) -> Iterator[TrainEvent]:
    """Train from `start_step` to `max_steps` optimizer steps; one event per optimizer step.

    `compute_loss(batch)` returns the loss of one micro-batch. Gradients are clipped to
    `max_grad_norm` (None or 0: no clipping) over `clip_parameters` when they are synchronised.
    The step's loss is the mean over its micro-batches, across processes too when `reduce_loss`.
    A resumed run starts in the epoch of `start_step` and skips the batches already trained on;
    the data order of an epoch depends only on the epoch (seedable sampler), so it sees what an
    uninterrupted run would. Stops after the current step when `stop_event` is set.

    A step whose loss, or after which any trained weight (parameters with `requires_grad` in
    `models`), is NaN or infinite raises `TrainingDiverged` (a `UserError` naming the step and what
    to try) before its event is yielded, so a trainer never checkpoints or exports broken weights;
    checkpoints of earlier steps stay. Under an fp16 loss scaler, which skips such steps itself,
    only non-finite weights or `SCALER_NONFINITE_LIMIT` non-finite losses in a row do.

    Optimizers with train and eval modes (Schedule-Free AdamW) are in train mode for each step and
    in eval mode whenever an event is yielded and after the loop, so what a trainer does between
    events (checkpoints, validation images, evaluation, the final files) sees the weights to keep,
    and a checkpoint holds the same weights and optimizer state whether or not the run resumes.
    """
    try:
        yield from _training_steps(accelerator, models=models, dataloader=dataloader, optimizer=optimizer,
                                   lr_scheduler=lr_scheduler, compute_loss=compute_loss, start_step=start_step,
                                   max_steps=max_steps, updates_per_epoch=updates_per_epoch,
                                   stop_event=stop_event, clip_parameters=clip_parameters,
                                   max_grad_norm=max_grad_norm, reduce_loss=reduce_loss,
                                   on_epoch_start=on_epoch_start)
    finally:
        optimizer_mode(optimizer, train=False)


def _training_steps(accelerator, *, models, dataloader, optimizer, lr_scheduler, compute_loss, start_step,
                    max_steps, updates_per_epoch, stop_event, clip_parameters, max_grad_norm, reduce_loss,
                    on_epoch_start) -> Iterator[TrainEvent]:
    clip_parameters = list(clip_parameters)
    trained = [p for model in models for p in model.parameters() if p.requires_grad]
    scaled = getattr(accelerator, "scaler", None) is not None
    nonfinite_in_a_row = 0
    first_epoch = start_step // updates_per_epoch
    skip_batches = (start_step % updates_per_epoch) * accelerator.gradient_accumulation_steps
    num_epochs = math.ceil(max_steps / updates_per_epoch)
    step = start_step
    loop_start = time.perf_counter()
    micro_losses: list[torch.Tensor] = []
    for epoch in range(first_epoch, num_epochs):
        if step >= max_steps or stop_event.is_set():
            return
        for model in models:
            model.train()
        dataloader.set_epoch(epoch)
        if on_epoch_start is not None:
            on_epoch_start(epoch)
        loader = dataloader
        if epoch == first_epoch and skip_batches:
            loader = accelerator.skip_first_batches(dataloader, skip_batches)
        for batch in loader:
            optimizer_mode(optimizer, train=True)  # a no-op unless the optimizer has modes
            with accelerator.accumulate(*models):
                loss = compute_loss(batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients and max_grad_norm:
                    accelerator.clip_grad_norm_(clip_parameters, max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            micro_losses.append(loss.detach())
            if not accelerator.sync_gradients:
                continue
            step += 1
            step_loss = _step_loss(accelerator, micro_losses, reduce_loss)
            micro_losses = []
            loss_bad, weights_bad = _nonfinite(accelerator, step_loss, trained)
            nonfinite_in_a_row = nonfinite_in_a_row + 1 if loss_bad else 0
            if weights_bad or (loss_bad and (not scaled or nonfinite_in_a_row >= SCALER_NONFINITE_LIMIT)):
                raise TrainingDiverged(_diverged_message(step, step_loss, weights_bad, lr_scheduler, max_grad_norm,
                                                        getattr(accelerator, "mixed_precision", None)))
            elapsed = time.perf_counter() - loop_start
            optimizer_mode(optimizer, train=False)
            yield TrainEvent(step=step, max_steps=max_steps, loss=step_loss, lr=float(lr_scheduler.get_last_lr()[0]),
                             epoch=epoch, phase="train",
                             steps_per_sec=(step - start_step) / elapsed if elapsed > 0 else None)
            if step >= max_steps or stop_event.is_set():
                return


def _nonfinite(accelerator, loss: float, trained: list[torch.nn.Parameter]) -> tuple[bool, bool]:
    """(the loss is not finite, some trained weight is not finite), on any process."""
    with torch.no_grad():
        weights_ok = torch.stack([torch.isfinite(p).all() for p in trained]).all() if trained else torch.tensor(True)
        flags = torch.tensor([not math.isfinite(loss), not bool(weights_ok)], dtype=torch.float32,
                             device=accelerator.device)
    if accelerator.num_processes > 1:  # every process must stop, not only the one that saw it
        flags = accelerator.reduce(flags, reduction="sum")
    return bool(flags[0] > 0), bool(flags[1] > 0)


def _diverged_message(step: int, loss: float, weights_bad: bool, lr_scheduler, max_grad_norm,
                      precision: Optional[str]) -> str:
    lr = float(lr_scheduler.get_last_lr()[0])
    what = f"the loss is {loss}" + (" and the trained weights are no longer finite" if weights_bad else "")
    if weights_bad and math.isfinite(loss):
        what = f"the trained weights are no longer finite (loss {loss:.4g})"
    tips = [f"a lower --learning_rate (the rate is now {lr:.3g})"]
    if not max_grad_norm:
        tips.append("gradient clipping (--max_grad_norm 1.0)")
    if precision not in (None, "no"):
        tips.append(f"training without {precision} mixed precision")
    advice = tips[0] if len(tips) == 1 else ", ".join(tips[:-1]) + " or " + tips[-1]
    return (f"training diverged at step {step}: {what}; stopped without writing the final files (earlier "
            f"checkpoints are kept): try {advice}")


def _step_loss(accelerator, micro_losses: list[torch.Tensor], across_processes: bool) -> float:
    if across_processes:
        mean = torch.stack([x.float() for x in micro_losses]).mean()
        return accelerator.reduce(mean, reduction="mean").item()
    return sum(float(x) for x in micro_losses) / len(micro_losses)


def make_accelerator(*, mixed_precision: Optional[str], gradient_accumulation_steps: int, seed: Optional[int],
                     **kwargs):
    """An `Accelerator` whose data order of epoch e depends only on (seed, e), so a resumed run sees
    the same batches as an uninterrupted one. An unusable `--mixed_precision` is a `UserError`."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    from .errors import UserError, first_line

    try:
        return Accelerator(
            mixed_precision=mixed_precision,
            gradient_accumulation_steps=gradient_accumulation_steps,
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed),
            **kwargs,
        )
    except ValueError as err:  # e.g. fp16 without a GPU
        raise UserError(f"--mixed_precision {mixed_precision}: {first_line(err)}") from None


def release_accelerator(accelerator) -> None:
    """End trackers and free accelerate's process-wide state, so another run can start in this
    process (the app and the benchmarks run several, possibly with another mixed precision).

    accelerate refuses a second `Accelerator(mixed_precision=...)` that differs from the first.
    Only the single-process case is reset: a distributed launch runs one job per process anyway.
    """
    try:
        accelerator.end_training()
    except Exception:  # pragma: no cover - tracker already closed
        pass
    accelerator.free_memory()
    if accelerator.num_processes != 1:
        return
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()


def peak_memory_bytes(device: Optional[torch.device] = None) -> int:
    """Peak accelerator memory if on CUDA, else this process's peak resident set size."""
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except Exception:  # pragma: no cover - non-POSIX
        return 0


def format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


__all__ = ["SCALER_NONFINITE_LIMIT", "TrainEvent", "format_bytes", "make_accelerator", "peak_memory_bytes",
           "release_accelerator", "training_steps"]
