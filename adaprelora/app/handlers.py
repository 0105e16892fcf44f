"""Event handlers of the app: validate the form, drive the trainer, generate, manage LoRAs.

Every handler is a method of `AppHandlers`, which holds only what all users share on purpose (the
LoRA store on disk and the base model). What belongs to one user (the running training job) lives
in a `gr.State` passed in and out. Mistakes the user can fix raise `gr.Error` with a message that
says what to change; nothing here trains by itself: `train` iterates
`adaprelora.training.dreambooth.train(config, stop_event)` and turns its events into page updates.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import gradio as gr

from .generate import BaseModel, GenerationRequest, default_device, generate_images, how_to_use_local_model
from .store import DONE, FAILED, STOPPED, LoraInfo, LoraStore, StoreError, format_size

logger = logging.getLogger(__name__)

NO_LORA = "(none)"
COPY_AS_IS = (".png", ".jpg", ".jpeg", ".webp")  # what the trainer reads; other formats become PNG
MAX_UPLOAD_BYTES = 50 * 1024 * 1024
MAX_IMAGES = 200

# Presets: settings that work for the usual kinds of subject, and the prompts that go with them.
PRESETS: dict[str, dict[str, Any]] = {
    "object": dict(instance_prompt="a photo of sks object", max_train_steps=500, learning_rate=1e-4, rank=8,
                   train_text_encoder=False, validation_prompt="a photo of sks object on a beach"),
    "face": dict(instance_prompt="a photo of sks person", max_train_steps=800, learning_rate=1e-4, rank=16,
                 train_text_encoder=True, validation_prompt="a portrait of sks person, studio lighting"),
    "style": dict(instance_prompt="an image in sks style", max_train_steps=1000, learning_rate=1e-4, rank=32,
                  train_text_encoder=False, validation_prompt="a city street in sks style"),
}
PRESET_FIELDS = ("instance_prompt", "max_train_steps", "learning_rate", "rank", "train_text_encoder", "validation_prompt")
LORA_TABLE_HEADERS = ["name", "status", "steps", "optimizer", "rank", "learning rate", "resolution", "prompt",
                      "created", "size"]


@dataclass
class TrainingJob:
    """One user's running training: what the Stop button needs to reach it."""

    name: str
    stop_event: threading.Event = field(default_factory=threading.Event)
    finished: bool = False

    def __deepcopy__(self, memo):  # gr.State may copy values; a job must stay the same object
        return self


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------
def _as_paths(images: Any) -> list[str]:
    """Gradio gives a list of paths (or one path, or file dicts from some clients)."""
    if images is None:
        return []
    if isinstance(images, (str, os.PathLike, dict)):
        images = [images]
    paths = []
    for item in images:
        if isinstance(item, dict):
            item = item.get("path") or item.get("name")
        elif hasattr(item, "name") and not isinstance(item, (str, os.PathLike)):
            item = item.name
        if item:
            paths.append(os.fspath(item))
    return paths


def upload_folder() -> str:
    from gradio.utils import get_upload_folder

    return os.path.realpath(get_upload_folder())


def _inside(path: str, folder: str) -> bool:
    real = os.path.realpath(path)
    return os.path.commonpath([real, folder]) == folder


def check_uploaded_images(images: Any, upload_root: Optional[str] = None) -> list[str]:
    """The uploaded images as paths, each one checked to be a readable image in Gradio's upload
    folder. Raises `gr.Error` naming the first bad file."""
    from PIL import Image, UnidentifiedImageError

    paths = _as_paths(images)
    if not paths:
        raise gr.Error("Upload at least one image of your subject (PNG, JPEG or WebP; 3 to 20 photos work well).")
    if len(paths) > MAX_IMAGES:
        raise gr.Error(f"{len(paths)} images is too many for one run; upload at most {MAX_IMAGES}.")
    root = upload_root or upload_folder()
    for path in paths:
        shown = os.path.basename(path)
        if not _inside(path, root) or not os.path.isfile(path):
            raise gr.Error(f"`{shown}` was not uploaded through this page; upload the image again.")
        if os.path.getsize(path) > MAX_UPLOAD_BYTES:
            raise gr.Error(f"`{shown}` is larger than {MAX_UPLOAD_BYTES // 2**20} MB; use a smaller image.")
        try:
            with Image.open(path) as img:
                img.verify()
            with Image.open(path) as img:  # verify() does not decode pixels: a truncated file passes it
                img.load()
                width, height = img.size
        except (UnidentifiedImageError, Image.DecompressionBombError) as err:
            reason = "it is too large" if isinstance(err, Image.DecompressionBombError) else "it is not an image"
            raise gr.Error(f"`{shown}` cannot be used: {reason}. Upload PNG, JPEG or WebP photos.") from None
        except Exception as err:  # truncated or corrupt data
            raise gr.Error(f"`{shown}` could not be read as an image ({err}). Upload it again or use another photo.") from None
        if min(width, height) < 8:
            raise gr.Error(f"`{shown}` is only {width}x{height} pixels; use real photos.")
    return paths


def _int(value: Any, label: str) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise gr.Error(f"{label} must be a number, got {value!r}.") from None
    if not math.isfinite(number) or number != int(number):
        raise gr.Error(f"{label} must be a whole number, got {value!r}.")
    return int(number)


def _float(value: Any, label: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise gr.Error(f"{label} must be a number, got {value!r}.") from None
    if not math.isfinite(number):
        raise gr.Error(f"{label} must be a finite number, got {value!r}.")
    return number


def _in_range(value, low, high, label: str, hint: str = ""):
    if not low <= value <= high:
        raise gr.Error(f"{label} must be between {low:g} and {high:g}, got {value:g}.{(' ' + hint) if hint else ''}")
    return value


def _captions_by_image(paths: list[str], captions: Any) -> dict[str, str]:
    """Rows of the caption table [[file name, caption], ...] -> {path: caption} (empty ones dropped).

    Rows match images in upload order; a table of another length matches by file name."""
    rows = []
    if captions is None:
        return {}
    if hasattr(captions, "values") and hasattr(captions, "columns"):  # a pandas DataFrame
        captions = captions.values.tolist()
    if isinstance(captions, dict) and "data" in captions:
        captions = captions["data"]
    for row in captions or []:
        if isinstance(row, (list, tuple)) and len(row) >= 2:
            rows.append((str(row[0] or ""), str(row[1] or "").strip()))
    out: dict[str, str] = {}
    if len(rows) == len(paths):
        for path, (_, caption) in zip(paths, rows):
            if caption:
                out[path] = caption
        return out
    by_name = {name: caption for name, caption in rows if caption}
    for path in paths:
        caption = by_name.get(os.path.basename(path))
        if caption:
            out[path] = caption
    return out


def _format_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "unknown"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m" if hours else (f"{minutes}m {secs:02d}s" if minutes else f"{secs}s")


def _loss_frame(history: list[tuple[int, float]]):
    """The loss curve as a long table: the raw loss and its running mean (EMA 0.9).

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
    return pd.DataFrame(rows, columns=["step", "loss", "curve"])


def _pick(obj: Any, name: str, default: Any = None) -> Any:
    """A field of a TrainEvent (dataclass or dict)."""
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


# --------------------------------------------------------------------------------------------
# Handlers
# --------------------------------------------------------------------------------------------
class AppHandlers:
    """The functions behind the page's events, bound to one store and one base model."""

    def __init__(self, store: LoraStore, base: BaseModel):
        self.store = store
        self.base = base

    # -- train tab ---------------------------------------------------------------------------
    def preview_uploads(self, images=None):
        """Gallery preview and an empty caption row per uploaded image."""
        paths = _as_paths(images)
        return paths, [[os.path.basename(p), ""] for p in paths]

    def apply_preset(self, preset: str, instance_prompt: str = ""):
        """Fill the form with a preset's settings; a prompt typed by the user is kept."""
        values = PRESETS.get(preset)
        if values is None:
            return tuple(gr.skip() for _ in PRESET_FIELDS)
        templates = {p["instance_prompt"] for p in PRESETS.values()}
        keep_prompt = bool((instance_prompt or "").strip()) and instance_prompt not in templates
        return tuple(instance_prompt if name == "instance_prompt" and keep_prompt else values[name]
                     for name in PRESET_FIELDS)

    def train(
        self,
        images,
        instance_prompt: str,
        max_train_steps: float = 500,
        learning_rate: float = 1e-4,
        rank: float = 8,
        optimizer: str = "adaprelora",
        resolution: float = 512,
        lora_name: Optional[str] = None,
        captions=None,
        class_prompt: Optional[str] = None,
        train_text_encoder: bool = False,
        validation_prompt: Optional[str] = None,
        validation_steps: float = 100,
        seed: float = 0,
        num_samples: float = 2,
        progress=gr.Progress(),
    ):
        """Train a DreamBooth LoRA on the uploaded images; streams progress, returns when done."""
        config, paths, captions_by_path = self._checked_config(
            images, instance_prompt, max_train_steps, learning_rate, rank, optimizer, resolution, captions,
            class_prompt, train_text_encoder, validation_prompt, validation_steps, seed, num_samples,
        )
        problem = self.base.problem(timeout=0)
        if problem:
            raise gr.Error(f"The base model cannot be loaded: {problem}. {how_to_use_local_model(self.base.model_id)}")

        info = self.store.create(
            (lora_name or "").strip() or instance_prompt,
            {
                "base_model": self.base.model_id,
                "instance_prompt": config.instance_prompt,
                "class_prompt": config.class_prompt or "",
                "max_train_steps": config.max_train_steps,
                "learning_rate": config.learning_rate,
                "rank": config.rank,
                "optimizer": config.optimizer,
                "resolution": config.resolution,
                "train_text_encoder": config.train_text_encoder,
                "validation_prompt": config.validation_prompt or "",
                "seed": config.seed,
                "num_images": len(paths),
            },
        )
        job = TrainingJob(name=info.name)
        try:
            self._stage_images(info, config, paths, captions_by_path)
        except Exception as err:
            self._discard(info)
            raise gr.Error(f"Could not copy the uploaded images: {err}") from None
        self.base.release()  # the trainer loads its own copy of the model
        yield from self._run_training(info, config, job, progress)

    def _checked_config(self, images, instance_prompt, max_train_steps, learning_rate, rank, optimizer,
                        resolution, captions, class_prompt, train_text_encoder, validation_prompt,
                        validation_steps, seed, num_samples):
        from adaprelora import available_optimizers
        from adaprelora.training.dreambooth import TrainConfig

        paths = check_uploaded_images(images)
        prompt = (instance_prompt or "").strip()
        if not prompt:
            raise gr.Error("Write an instance prompt with a trigger word, e.g. \"a photo of sks dog\".")
        steps = _in_range(_int(max_train_steps, "Training steps"), 1, 100_000, "Training steps",
                          "A few hundred steps is typical.")
        lr = _float(learning_rate, "Learning rate")
        if lr <= 0 or lr > 1:
            raise gr.Error(f"Learning rate must be above 0 and at most 1, got {lr:g}. 1e-4 is a good start.")
        rank_ = _in_range(_int(rank, "LoRA rank"), 1, 512, "LoRA rank", "4 to 32 is typical.")
        res = _in_range(_int(resolution, "Resolution"), 32, 2048, "Resolution", "Use 512 for SD 1.5.")
        if res % 8:
            raise gr.Error(f"Resolution must be a multiple of 8, got {res}.")
        optimizers = available_optimizers()
        if optimizer not in optimizers:
            raise gr.Error(f"Unknown optimizer {optimizer!r}; choose one of: {', '.join(optimizers)}.")
        val_prompt = (validation_prompt or "").strip() or prompt
        val_steps = _in_range(_int(validation_steps, "Sample interval"), 1, 100_000, "Sample interval")
        seed_ = _int(seed, "Seed")
        n_samples = _in_range(_int(num_samples, "Sample images each time"), 0, 8, "Sample images each time")
        class_prompt = (class_prompt or "").strip()
        captions_by_path = _captions_by_image(paths, captions)
        device, _ = default_device()
        config = TrainConfig(
            pretrained_model_name_or_path=self.base.model_id,
            instance_prompt=prompt,
            class_prompt=class_prompt or None,
            with_prior_preservation=bool(class_prompt),
            resolution=res,
            max_train_steps=steps,
            learning_rate=lr,
            rank=rank_,
            optimizer=optimizer,
            train_text_encoder=bool(train_text_encoder),
            validation_prompt=val_prompt if n_samples else None,
            validation_steps=min(val_steps, steps),
            num_validation_images=n_samples,
            seed=seed_,
            train_batch_size=1,
            checkpointing_steps=min(500, steps),
            checkpoints_total_limit=2,
            mixed_precision="fp16" if device.type == "cuda" else "no",
            report_to="none",
        )
        return config, paths, captions_by_path

    def _stage_images(self, info: LoraInfo, config, paths: list[str], captions: dict[str, str]) -> None:
        """Copy the uploads into the LoRA folder (other formats converted to PNG) and point the config there."""
        from PIL import Image, ImageOps

        folder = os.path.join(info.path, "instance_images")
        os.makedirs(folder, exist_ok=True)
        staged, staged_captions = [], {}
        for i, path in enumerate(paths):
            stem, ext = os.path.splitext(os.path.basename(path))
            stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in stem)[:60] or "image"
            if ext.lower() in COPY_AS_IS:
                dest = os.path.join(folder, f"{i:03d}-{stem}{ext.lower()}")
                shutil.copyfile(path, dest)
            else:
                dest = os.path.join(folder, f"{i:03d}-{stem}.png")
                with Image.open(path) as img:
                    ImageOps.exif_transpose(img).convert("RGB").save(dest)
            staged.append(dest)
            if path in captions:
                staged_captions[dest] = captions[path]
        config.instance_images = staged
        config.instance_captions = staged_captions or None
        config.output_dir = info.path
        if config.with_prior_preservation:
            config.class_data_dir = os.path.join(info.path, "class_images")
        info.meta["captions"] = {os.path.basename(k): v for k, v in staged_captions.items()}

    def _run_training(self, info: LoraInfo, config, job: TrainingJob, progress):
        from adaprelora.training.dreambooth import train as run_trainer
        from adaprelora.training.errors import UserError

        history: list[tuple[int, float]] = []
        samples: list[tuple[str, str]] = []
        last = None
        status = FAILED
        hidden = gr.update(value=None, visible=False)
        yield (f"Starting training of **{info.name}** (loading the model)...", None, [], hidden, hidden, None, job)
        events = run_trainer(config, stop_event=job.stop_event)
        try:
            for event in events:
                last = event
                step, max_steps = int(_pick(event, "step", 0) or 0), int(_pick(event, "max_steps", 0) or config.max_train_steps)
                loss = _pick(event, "loss")
                if loss is not None and math.isfinite(float(loss)) and (not history or history[-1][0] != step):
                    history.append((step, float(loss)))
                new_samples = [s for s in (_pick(event, "samples") or []) if os.path.isfile(s)]
                for path in new_samples:
                    samples.append((path, f"step {step}"))
                if new_samples:
                    self._record_samples(info, new_samples, step)
                for warning in _pick(event, "warnings") or []:
                    gr.Warning(str(warning))
                text = self._progress_text(info.name, event, step, max_steps)
                if max_steps:
                    progress((step, max_steps), desc=text.replace("**", ""), unit="steps")
                if _pick(event, "done"):
                    break
                yield (text, _loss_frame(history), samples[-24:] if new_samples else gr.skip(),
                       gr.skip(), gr.skip(), gr.skip(), gr.skip())
            status = STOPPED if (last is not None and _pick(last, "stopped")) else DONE
        except GeneratorExit:  # the page went away: stop cleanly, keep what was trained
            job.stop_event.set()
            for event in events:
                last = event
            status = STOPPED
            raise
        except UserError as err:  # worded for the CLI; the app's flag for the model is --base-model
            raise gr.Error(str(err).replace("--pretrained_model_name_or_path", "the base model (--base-model)")) from None
        except gr.Error:
            raise
        except Exception as err:
            logger.exception("training %s failed", info.name)
            info.meta["error"] = f"{type(err).__name__}: {err}"
            raise gr.Error(f"Training failed: {type(err).__name__}: {err} (the traceback is in the app's console)") from None
        finally:
            if status == FAILED:
                job.stop_event.set()
                events.close()
            job.finished = True
            self._finish(info, last, history, status)
        outputs = (_pick(last, "outputs") or {}) if last is not None else {}
        diffusers_file = self._existing_file(info, outputs.get("diffusers"))
        kohya_file = self._existing_file(info, outputs.get("kohya"))
        in_root = lambda path: os.path.relpath(path, self.store.output_root) if path else None  # noqa: E731
        summary = {
            "lora": info.name,
            "status": status,
            "steps": int(_pick(last, "step", 0) or 0) if last is not None else 0,
            "final_loss": history[-1][1] if history else None,
            "diffusers": in_root(diffusers_file),
            "kohya": in_root(kohya_file),
            "samples": [in_root(p) for p, _ in samples],
        }
        verb = "stopped" if status == STOPPED else "finished"
        text = (f"Training of **{info.name}** {verb} at step {summary['steps']}. "
                "Download the files below, or use it in the Generate tab.")
        yield (text, _loss_frame(history), samples[-24:],
               gr.update(value=diffusers_file, visible=diffusers_file is not None),
               gr.update(value=kohya_file, visible=kohya_file is not None),
               summary, job)

    @staticmethod
    def _progress_text(name: str, event, step: int, max_steps: int) -> str:
        sps = _pick(event, "steps_per_sec")
        parts = [f"**{name}**: step {step}/{max_steps}"]
        if sps:
            parts.append(f"{float(sps):.2f} steps/s")
            parts.append(f"{_format_eta((max_steps - step) / float(sps))} left")
        loss = _pick(event, "loss")
        if loss is not None:
            parts.append(f"loss {float(loss):.4f}")
        message = _pick(event, "message")
        if message:
            parts.append(str(message))
        return " · ".join(parts)

    def _existing_file(self, info: LoraInfo, path: Optional[str]) -> Optional[str]:
        if not path:
            return None
        path = path if os.path.isabs(path) else os.path.join(info.path, path)
        return path if os.path.isfile(path) and self.store.contains(path) else None

    def _record_samples(self, info: LoraInfo, paths: list[str], step: int) -> None:
        items = info.meta.setdefault("samples", [])
        for path in paths:
            rel = self.store.relative(info, path)
            if rel:
                items.append({"path": rel, "step": step})
        info.meta["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.store.save_meta(info)

    def _finish(self, info: LoraInfo, last, history, status: str) -> None:
        outputs = (_pick(last, "outputs") or {}) if last is not None else {}
        rel_outputs = {}
        for kind in ("diffusers", "kohya"):
            path = self._existing_file(info, outputs.get(kind))
            if path:
                rel_outputs[kind] = self.store.relative(info, path)
        info.meta["outputs"] = rel_outputs
        info.meta["steps_done"] = int(_pick(last, "step", 0) or 0) if last is not None else 0
        info.meta["final_loss"] = history[-1][1] if history else None
        info.meta["loss_history"] = history[-2000:]
        self.store.finish(info, status)
        if status == FAILED and info.weights_path is None and not _has_checkpoint(info.path):
            self._discard(info)

    def _discard(self, info: LoraInfo) -> None:
        self.store.finish(info, FAILED)
        try:
            self.store.delete(info.name)
        except (StoreError, OSError):
            logger.warning("could not remove the folder of failed run %s", info.name)

    def stop(self, job: Optional[TrainingJob] = None):
        """Ask the running training of this user to stop after the current step."""
        if job is None or job.finished:
            gr.Info("No training is running in this page.")
            return gr.skip()
        job.stop_event.set()
        return f"Stopping **{job.name}** after the current step; the LoRA trained so far is kept..."

    # -- generate tab ------------------------------------------------------------------------
    def generate(
        self,
        prompt: str,
        lora: str = NO_LORA,
        num_inference_steps: float = 30,
        seed: float = 0,
        negative_prompt: Optional[str] = None,
        guidance_scale: float = 7.5,
        lora_scale: float = 1.0,
        num_images: float = 1,
    ):
        """Generate images with the base model and, optionally, one trained LoRA."""
        prompt = (prompt or "").strip()
        if not prompt:
            raise gr.Error("Write a prompt; include the LoRA's trigger word (e.g. \"sks\") to use what it learned.")
        request = GenerationRequest(
            prompt=prompt,
            negative_prompt=(negative_prompt or "").strip(),
            num_inference_steps=_in_range(_int(num_inference_steps, "Steps"), 1, 200, "Steps"),
            guidance_scale=_in_range(_float(guidance_scale, "Guidance scale"), 0, 50, "Guidance scale"),
            seed=_int(seed, "Seed"),
            lora_scale=_in_range(_float(lora_scale, "LoRA scale"), -4, 4, "LoRA scale"),
            num_images=_in_range(_int(num_images, "Number of images"), 1, 8, "Number of images"),
        )
        if request.seed < 0:
            request.seed = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
        lora_dir, weight_name = None, None
        if lora and lora != NO_LORA:
            try:
                info = self.store.get(lora)
            except StoreError as err:
                raise gr.Error(f"{err}. Pick a LoRA from the list (press Refresh after training).") from None
            if not info.ready:
                raise gr.Error(f"LoRA {lora!r} is not ready (status: {info.status}).")
            lora_dir, weight_name = info.path, os.path.basename(info.weights_path)
        problem = self.base.problem(timeout=0)
        if problem:
            raise gr.Error(f"The base model cannot be loaded: {problem}. {how_to_use_local_model(self.base.model_id)}")
        out_dir = os.path.join(self.store.output_root, "generated", time.strftime("%Y-%m-%d"))
        try:
            paths = generate_images(self.base, request, lora_dir, out_dir, weight_name=weight_name)
        except RuntimeError as err:
            raise gr.Error(str(err)) from None
        caption = f"seed {request.seed}" + (f" · {lora} x{request.lora_scale:g}" if lora_dir else "")
        return [(path, caption) for path in paths]

    # -- LoRAs tab ---------------------------------------------------------------------------
    def loras(self) -> list[str]:
        """Names of the trained LoRAs usable for generation, newest first."""
        return self.store.names()

    def lora_widgets(self, selected: Optional[str] = None):
        """Table of all LoRAs, the Generate tab's choices and the LoRAs tab's selection."""
        infos = self.store.list()
        rows = [self._table_row(info) for info in infos]
        ready = [info.name for info in infos if info.ready]
        all_names = [info.name for info in infos]
        keep = selected if selected in all_names else (all_names[0] if all_names else None)
        return (
            rows,
            gr.update(choices=[NO_LORA] + ready),
            gr.update(choices=all_names, value=keep),
        )

    @staticmethod
    def _table_row(info: LoraInfo) -> list:
        m = info.meta
        steps = m.get("steps_done")
        steps = f"{steps}/{m.get('max_train_steps')}" if steps is not None else str(m.get("max_train_steps", ""))
        return [info.name, info.status, steps, m.get("optimizer", ""), m.get("rank", ""),
                f"{m.get('learning_rate', '')}", m.get("resolution", ""), m.get("instance_prompt", ""),
                str(m.get("created", "")).replace("T", " "), format_size(info.size_bytes())]

    def lora_details(self, name: Optional[str] = None):
        """Settings, samples and download files of one LoRA."""
        hidden = gr.update(value=None, visible=False)
        if not name:
            return {}, [], hidden, hidden
        try:
            info = self.store.get(name)
        except StoreError as err:
            raise gr.Error(str(err)) from None
        meta = {k: v for k, v in info.meta.items() if k not in ("loss_history", "samples")}
        meta["size"] = format_size(info.size_bytes())
        samples = []
        for item in info.meta.get("samples") or []:
            path = os.path.join(info.path, str(item.get("path", "")))
            if os.path.isfile(path) and self.store.contains(path):
                samples.append((path, f"step {item.get('step')}"))
        diffusers_file, kohya_file = info.output_file("diffusers"), info.output_file("kohya")
        return (meta, samples[-24:],
                gr.update(value=diffusers_file, visible=diffusers_file is not None),
                gr.update(value=kohya_file, visible=kohya_file is not None))

    def delete_lora(self, name: Optional[str] = None):
        """Delete one LoRA folder from the output root."""
        if not name:  # nothing chosen, or the confirmation was cancelled
            gr.Info("Nothing was deleted.")
            return self.store.names()
        try:
            self.store.delete(name)
        except StoreError as err:
            raise gr.Error(str(err)) from None
        gr.Info(f"Deleted {name}.")
        return self.store.names()

    def base_model_status(self) -> str:
        return self.base.status_markdown(timeout=60.0)


def _has_checkpoint(folder: str) -> bool:
    from adaprelora.training.checkpoints import list_checkpoints

    return bool(list_checkpoints(folder))
