"""The life of one training run in the app: stage the uploads, drive the trainer, record the result.

`TrainingRun.updates()` iterates `adaprelora.training.dreambooth.train(config, stop_event)` and turns
its `TrainEvent`s into page updates keyed by output name ("status", "loss_plot", "samples",
"diffusers", "kohya", "summary", "job"); `ui.py` maps the names to components. The run's record in
the LoRA store (status, samples, loss history, output files) is kept up to date on the way.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import gradio as gr

from .form import page_wording
from .store import DONE, FAILED, STOPPED, LoraInfo, LoraStore, StoreError

logger = logging.getLogger(__name__)

MAX_SAMPLES_SHOWN = 24


@dataclass
class TrainingJob:
    """One user's running training: what the Stop button needs to reach it."""

    name: str
    stop_event: threading.Event = field(default_factory=threading.Event)
    finished: bool = False

    def __deepcopy__(self, memo):  # gr.State may copy values; a job must stay the same object
        return self


def stage_images(info: LoraInfo, config) -> None:
    """Copy the uploads (`config.instance_images`, checked by the form: PNG, JPEG or WebP) with their
    captions into the LoRA folder, and point the config there: the run is self-contained."""
    folder = os.path.join(info.path, "instance_images")
    os.makedirs(folder, exist_ok=True)
    captions = config.instance_captions or {}
    staged, staged_captions = [], {}
    for i, path in enumerate(config.instance_images):
        stem, ext = os.path.splitext(os.path.basename(path))
        stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in stem)[:60] or "image"
        dest = os.path.join(folder, f"{i:03d}-{stem}{ext.lower()}")
        shutil.copyfile(path, dest)
        staged.append(dest)
        if path in captions:
            staged_captions[dest] = captions[path]
    config.instance_images = staged
    config.instance_captions = staged_captions or None
    config.output_dir = info.path
    if config.with_prior_preservation:
        config.class_data_dir = os.path.join(info.path, "class_images")
    info.meta["captions"] = {os.path.basename(k): v for k, v in staged_captions.items()}


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "unknown"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m" if hours else (f"{minutes}m {secs:02d}s" if minutes else f"{secs}s")


def loss_frame(history: list[tuple[int, float]], validation: Optional[list[tuple[int, float]]] = None):
    """The loss curve as a long table: the raw loss and its running mean (EMA 0.9), and the
    held-out loss (`validation`: (step, value) of each evaluation) as a third curve when given.

    Without any point yet the plot is left alone: a first empty table would fix the plot's column
    types and series before there is data, and the lines would then never be drawn."""
    import pandas as pd

    if not history:
        return gr.skip()
    rows, ema = [], None
    for step, loss in history:
        ema = loss if ema is None else 0.9 * ema + 0.1 * loss
        rows.append({"step": step, "loss": loss, "curve": "loss"})
        rows.append({"step": step, "loss": ema, "curve": "smoothed"})
    rows.extend({"step": step, "loss": value, "curve": "validation"} for step, value in validation or [])
    return pd.DataFrame(rows, columns=["step", "loss", "curve"])


def progress_text(name: str, event, max_steps: int) -> str:
    parts = [f"**{name}**: step {event.step}/{max_steps}"]
    if event.steps_per_sec:
        parts.append(f"{float(event.steps_per_sec):.2f} steps/s")
        parts.append(f"{format_eta((max_steps - event.step) / float(event.steps_per_sec))} left")
    if event.loss is not None:
        parts.append(f"loss {float(event.loss):.4f}")
    if event.message:
        parts.append(str(event.message))
    return " · ".join(parts)


def file_update(path: Optional[str]):
    """A download button showing `path`, hidden when there is none."""
    return gr.update(value=path, visible=path is not None)


class TrainingRun:
    """One run of the trainer for one user, recorded in the store under `info`."""

    def __init__(self, store: LoraStore, info: LoraInfo, config, job: TrainingJob):
        self.store, self.info, self.config, self.job = store, info, config, job
        self.history: list[tuple[int, float]] = []
        self.validation_history: list[tuple[int, float]] = []  # (step, held-out loss) per evaluation
        self.samples: list[tuple[str, str]] = []
        self.last = None
        self.status = FAILED

    def updates(self, progress) -> Iterator[dict]:
        """Page updates while the run goes, then the final one with the files and the summary."""
        from adaprelora.training.dreambooth import train
        from adaprelora.training.errors import UserError

        hidden = file_update(None)
        verb = "Resuming" if self.config.resume_from_checkpoint else "Starting"
        yield {"status": f"{verb} training of **{self.info.name}** (loading the model)...", "loss_plot": None,
               "samples": [], "diffusers": hidden, "kohya": hidden, "summary": None, "job": self.job}
        events = train(self.config, stop_event=self.job.stop_event)
        try:
            for event in events:
                self.last = event
                if event.done:
                    self._take_samples(event)  # the end-of-run validation images
                    break
                yield self._step_update(event, progress)
            self.status = STOPPED if self.last is not None and self.last.stopped else DONE
        except GeneratorExit:  # the page went away: stop cleanly, keep what was trained
            self.job.stop_event.set()
            for event in events:
                self.last = event
            self.status = STOPPED
            raise
        except UserError as err:  # worded for the CLI; the page names its own fields
            raise gr.Error(page_wording(str(err))) from None
        except gr.Error:
            raise
        except Exception as err:
            logger.exception("training %s failed", self.info.name)
            self.info.meta["error"] = f"{type(err).__name__}: {err}"
            if not os.path.isdir(self.info.path):
                step = self.last.step if self.last is not None else 0
                raise gr.Error(f"Training of {self.info.name} stopped at step {step}: its folder {self.info.path} was "
                               "removed while it ran. Train again.") from None
            raise gr.Error(f"Training failed: {type(err).__name__}: {err} (the traceback is in the app's console)") from None
        finally:
            if self.status == FAILED:
                self.job.stop_event.set()
                events.close()
            self.job.finished = True
            self._record_end()
        yield self._final_update()

    def _step_update(self, event, progress) -> dict:
        step, max_steps = event.step, event.max_steps or self.config.max_train_steps
        if event.loss is not None and math.isfinite(event.loss) and (not self.history or self.history[-1][0] != step):
            self.history.append((step, float(event.loss)))
        if event.validation_loss is not None and math.isfinite(event.validation_loss):
            self.validation_history.append((step, float(event.validation_loss)))
        new_samples = self._take_samples(event)
        for warning in event.warnings:
            gr.Warning(str(warning))
        text = progress_text(self.info.name, event, max_steps)
        if max_steps:
            progress((step, max_steps), desc=text.replace("**", ""), unit="steps")
        update = {"status": text, "loss_plot": loss_frame(self.history, self.validation_history)}
        if new_samples:
            update["samples"] = self.samples[-MAX_SAMPLES_SHOWN:]
        return update

    def _take_samples(self, event) -> list[str]:
        """Keep (and record in the store) the event's new sample images; returns them."""
        new_samples = [s for s in event.samples if os.path.isfile(s)]
        self.samples.extend((path, f"step {event.step}") for path in new_samples)
        if new_samples:
            self._record_samples(new_samples, event.step)
        return new_samples

    def _final_update(self) -> dict:
        diffusers_file, kohya_file = self._output_file("diffusers"), self._output_file("kohya")
        in_root = lambda path: os.path.relpath(path, self.store.output_root) if path else None  # noqa: E731
        steps = self.last.step if self.last is not None else 0
        summary = {
            "lora": self.info.name,
            "status": self.status,
            "steps": steps,
            "final_loss": self.history[-1][1] if self.history else None,
            "diffusers": in_root(diffusers_file),
            "kohya": in_root(kohya_file),
            "samples": [in_root(p) for p, _ in self.samples],
        }
        verified = (self.last.outputs.get("verified") if self.last is not None else None) or ""
        if verified:
            summary["verified"] = verified
        best = self.last.outputs.get("best_validation_loss") if self.last is not None else None
        if best:
            summary["best_validation_step"] = best["step"]
            summary["best_validation_loss"] = best["validation_loss"]
        if self.last is not None and self.last.validation_loss is not None:  # a stopped run's last evaluation
            self.validation_history.append((self.last.step, float(self.last.validation_loss)))
        for warning in (self.last.warnings if self.last is not None and self.last.done else []):
            gr.Warning(str(warning))
        verb = "stopped" if self.status == STOPPED else "finished"
        return {"status": f"Training of **{self.info.name}** {verb} at step {steps}"
                          + (f" ({verified})" if verified else "")
                          + ". Download the files below, or use it in the Generate tab.",
                "loss_plot": loss_frame(self.history, self.validation_history),
                "samples": self.samples[-MAX_SAMPLES_SHOWN:],
                "diffusers": file_update(diffusers_file), "kohya": file_update(kohya_file),
                "summary": summary, "job": self.job}

    def _output_file(self, kind: str) -> Optional[str]:
        path = (self.last.outputs.get(kind) if self.last is not None else None) or None
        if not path:
            return None
        path = path if os.path.isabs(path) else os.path.join(self.info.path, path)
        return path if os.path.isfile(path) and self.store.contains(path) else None

    def _record_samples(self, paths: list[str], step: int) -> None:
        items = self.info.meta.setdefault("samples", [])
        for path in paths:
            rel = self.store.relative(self.info, path)
            if rel:
                items.append({"path": rel, "step": step})
        self.info.meta["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.store.save_meta(self.info)

    def _record_end(self) -> None:
        """Record how the run ended. A record that cannot be written is logged (another error may be on
        its way); for a run that ended well it is the page's error: a run whose record is lost must not
        look finished."""
        try:
            self._write_end()
        except (OSError, StoreError) as err:
            logger.warning("could not record the end of run %s: %s", self.info.name, err)
            if self.status != FAILED:  # the page must not show a run whose record is lost as finished
                self.status = FAILED
                raise gr.Error(f"Training of {self.info.name} ended, but its record could not be written: {err}. "
                               "Check the output folder.") from None

    def _write_end(self) -> None:
        info = self.info
        info.meta["outputs"] = {kind: self.store.relative(info, path) for kind in ("diffusers", "kohya")
                                if (path := self._output_file(kind))}
        info.meta["steps_done"] = self.last.step if self.last is not None else 0
        info.meta["final_loss"] = self.history[-1][1] if self.history else None
        info.meta["loss_history"] = self.history[-2000:]
        if self.last is not None and self.last.outputs.get("verified"):
            info.meta["verified"] = self.last.outputs["verified"]
        self.store.finish(info, self.status)
        if self.status == FAILED and info.weights_path is None and not _has_checkpoint(info.path):
            discard(self.store, info)


def discard(store: LoraStore, info: LoraInfo) -> None:
    """Remove the record and folder of a run that produced nothing."""
    store.finish(info, FAILED)
    try:
        store.delete(info.name)
    except (StoreError, OSError):
        logger.warning("could not remove the folder of failed run %s", info.name)


def _has_checkpoint(folder: str) -> bool:
    from adaprelora.training.checkpoints import list_checkpoints

    return bool(list_checkpoints(folder))


__all__ = ["TrainingJob", "TrainingRun", "discard", "format_eta", "loss_frame", "progress_text", "stage_images"]
