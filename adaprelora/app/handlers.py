"""Event handlers of the app: thin functions from the page's inputs to its updates.

Every handler is a method of `AppHandlers`, which holds only what all users share on purpose (the
LoRA store on disk and the base model). What belongs to one user (the running training job) lives
in a `gr.State` passed in and out. Handlers that update several outputs return (or yield) a dict
keyed by output name, which `ui.py` maps to the components. The work is elsewhere: `form` checks
the inputs, `jobs` runs the training, `generate` makes images, `store` keeps the LoRAs on disk.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Optional

import gradio as gr

from .defaults import MAX_SEED, PRESET_FIELDS, profile_for
from .examples import sidecar_caption, stage_example
from .form import TrainForm, as_paths, real, text, whole
from .generate import BaseModel, GenerationRequest, default_device, generate_images, how_to_use_local_model
from .jobs import MAX_SAMPLES_SHOWN, TrainingJob, TrainingRun, discard, file_update, stage_images
from .store import INTERRUPTED, LoraInfo, LoraStore, StoreError, format_size

NO_LORA = "(none)"
LORA_TABLE_HEADERS = ["name", "status", "steps", "optimizer", "rank", "layers", "learning rate", "resolution",
                      "prompt", "created", "size"]


class AppHandlers:
    """The functions behind the page's events, bound to one store and one base model."""

    def __init__(self, store: LoraStore, base: BaseModel):
        self.store = store
        self.base = base
        self.profile = profile_for(base.model_id)

    # -- train tab ---------------------------------------------------------------------------
    def preview_uploads(self, images=None):
        """Gallery preview and an empty caption row per uploaded image."""
        paths = as_paths(images)
        return {"preview": paths, "captions": [[os.path.basename(p), sidecar_caption(p)] for p in paths]}

    def load_example(self):
        """The shipped example subject: its images (copied into the upload folder, captions beside
        them) and the preset that fits the base model."""
        if not self.profile.builtin:
            raise gr.Error("The example subject is made for the built-in tiny-sd model; upload your own photos.")
        paths = stage_example()
        preset = next(iter(self.profile.presets))
        return dict(self.apply_preset(preset), images=paths, preset=preset, lora_name="example-heart")

    def apply_preset(self, preset: str, instance_prompt: str = ""):
        """Fill the form with a preset's settings; a prompt typed by the user is kept."""
        presets = self.profile.presets
        values = presets.get(preset)
        if values is None:
            return {}
        templates = {p["instance_prompt"] for p in presets.values()}
        keep_prompt = bool((instance_prompt or "").strip()) and instance_prompt not in templates
        return {name: instance_prompt if name == "instance_prompt" and keep_prompt else values[name]
                for name in PRESET_FIELDS}

    def optimizer_lr(self, optimizer: str, learning_rate):
        """The learning rate to show when `optimizer` is picked: Prodigy's documented 1.0 (its lr scales
        its own step-size estimate), the profile's when leaving such an optimizer's value, else the
        value as it was (a lr the user typed is kept)."""
        from adaprelora.factory import DOCUMENTED_LRS

        if optimizer in DOCUMENTED_LRS:
            return DOCUMENTED_LRS[optimizer]
        try:
            leaving = float(learning_rate) in DOCUMENTED_LRS.values()
        except (TypeError, ValueError):  # an empty or unfinished field: Train says what is wrong
            leaving = False
        return self.profile.train.learning_rate if leaving else learning_rate

    def train(self, form: TrainForm, progress=gr.Progress()):
        """Train a DreamBooth LoRA on the uploaded images; streams progress, returns when done.

        The `/train` endpoint takes the form's fields as parameters (`form.form_endpoint`)."""
        profile = self.profile.train
        config = form.to_config(self.base.model_id, profile, default_device()[0].type)
        self._check_base_model()
        with store_errors():
            info = self.store.create(form.run_name(), _run_meta(config, self.base))
        try:
            stage_images(info, config)
            if profile.class_images and config.with_prior_preservation and config.class_prompt == profile.class_prompt:
                profile.class_images(config.class_data_dir, config.num_class_images)
        except Exception as err:
            discard(self.store, info)
            raise gr.Error(f"Could not prepare the training images: {err}") from None
        info.meta["train_config"] = _config_record(config)  # what a resume after a crash needs
        with store_errors():
            self.store.save_meta(info)
        self.base.release()  # the trainer loads its own copy of the model
        yield from TrainingRun(self.store, info, config, TrainingJob(name=info.name)).updates(progress)

    def resume_lora(self, name: Optional[str] = None, progress=gr.Progress()):
        """Continue an interrupted run (its process died) from its last checkpoint, exactly as the
        run would have gone on; streams progress like /train."""
        from adaprelora.training.dreambooth import TrainConfig

        if not name:
            raise gr.Error("Pick an interrupted LoRA in the LoRAs tab to resume.")
        with store_errors():
            info = self.store.get(name)
        if not info.resumable:
            why = ("it has no checkpoint to continue from (it died before the first one): delete it and train again"
                   if info.status == INTERRUPTED else f"it is {info.status_label}, not interrupted")
            raise gr.Error(f"LoRA {name!r} cannot be resumed: {why}.")
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        config = TrainConfig(**{k: v for k, v in info.meta["train_config"].items() if k in known})
        if config.pretrained_model_name_or_path != self.base.model_id:
            raise gr.Error(f"LoRA {name!r} was trained on {config.pretrained_model_name_or_path!r}, but this app runs "
                           f"{self.base.model_id!r}: start the app with --base-model "
                           f"{config.pretrained_model_name_or_path} to resume it.")
        config.output_dir, config.resume_from_checkpoint = info.path, "latest"
        self._check_base_model()
        with store_errors():
            self.store.reopen(info)
        self.base.release()
        yield from TrainingRun(self.store, info, config, TrainingJob(name=info.name)).updates(progress)

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
        num_inference_steps: Optional[float] = None,
        seed: Optional[float] = None,
        negative_prompt: Optional[str] = None,
        guidance_scale: Optional[float] = None,
        lora_scale: Optional[float] = None,
        num_images: Optional[float] = None,
    ):
        """Generate images with the base model and, optionally, one trained LoRA.

        The page sends every field (the API fills those left out with the form's starting values,
        `GenerateProfile`); one sent empty (None) is an error naming it."""
        prompt = text(prompt)
        if not prompt:
            raise gr.Error("Write a prompt; include the LoRA's trigger word (e.g. \"sks\") to use what it learned.")
        request = GenerationRequest(
            prompt=prompt,
            negative_prompt=text(negative_prompt),
            num_inference_steps=whole(num_inference_steps, "Steps", 1, 200),
            guidance_scale=real(guidance_scale, "Guidance scale", 0, 50),
            seed=whole(seed, "Seed", -1, MAX_SEED, "-1 picks a random seed."),
            lora_scale=real(lora_scale, "LoRA scale", -4, 4),
            num_images=whole(num_images, "Number of images", 1, 8),
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
        self._check_base_model()
        with store_errors():
            self.store.ensure_root()  # an output root removed or replaced by a file: made again, or said so
        out_dir = os.path.join(self.store.output_root, "generated", time.strftime("%Y-%m-%d"))
        try:
            paths = generate_images(self.base, request, lora_dir, out_dir, weight_name=weight_name)
        except RuntimeError as err:
            raise gr.Error(str(err)) from None
        except OSError as err:  # the output folder cannot be written (a file in its place, no permission)
            raise gr.Error(f"The generated images could not be saved under {self.store.output_root}: "
                           f"{err.strerror or err}. Check --output-root.") from None
        caption = f"seed {request.seed}" + (f" · {lora} x{request.lora_scale:g}" if lora_dir else "")
        return [(path, caption) for path in paths]

    def _check_base_model(self) -> None:
        problem = self.base.problem(timeout=0)
        if problem:
            raise gr.Error(f"The base model cannot be loaded: {problem}. {how_to_use_local_model(self.base.model_id)}")

    # -- LoRAs tab ---------------------------------------------------------------------------
    def loras(self) -> list[str]:
        """Names of the trained LoRAs usable for generation, newest first."""
        with store_errors():
            return self.store.names()

    def lora_widgets(self, selected: Optional[str] = None):
        """Table of all LoRAs, the Generate tab's choices and the LoRAs tab's selection."""
        with store_errors():
            infos = self.store.list()
        all_names = [info.name for info in infos]
        keep = selected if selected in all_names else (all_names[0] if all_names else None)
        return {"table": [table_row(info) for info in infos],
                "gen_lora": gr.update(choices=[NO_LORA] + [info.name for info in infos if info.ready]),
                "lora_select": gr.update(choices=all_names, value=keep)}

    def lora_details(self, name: Optional[str] = None):
        """Settings, samples and download files of one LoRA."""
        if not name:
            return {"details": {}, "lora_samples": [], "lora_diffusers": file_update(None),
                    "lora_kohya": file_update(None)}
        with store_errors():
            info = self.store.get(name)
        meta = {k: v for k, v in info.meta.items() if k not in ("loss_history", "samples", "train_config")}
        meta["size"] = format_size(info.size_bytes())
        if info.status == INTERRUPTED:
            meta["status"] = info.status_label
            meta["resumable"] = info.resumable
        samples = []
        for item in info.meta.get("samples") or []:
            path = os.path.join(info.path, str(item.get("path", "")))
            if os.path.isfile(path) and self.store.contains(path):
                samples.append((path, f"step {item.get('step')}"))
        return {"details": meta, "lora_samples": samples[-MAX_SAMPLES_SHOWN:],
                "lora_diffusers": file_update(info.output_file("diffusers")),
                "lora_kohya": file_update(info.output_file("kohya"))}

    def delete_lora(self, name: Optional[str] = None):
        """Delete one LoRA folder from the output root."""
        with store_errors():
            if not name:  # nothing chosen, or the confirmation was cancelled
                gr.Info("Nothing was deleted.")
                return self.store.names()
            self.store.delete(name)
            gr.Info(f"Deleted {name}.")
            return self.store.names()

    def base_model_status(self) -> str:
        return self.base.status_markdown(timeout=60.0)


@contextlib.contextmanager
def store_errors():
    """The store's refusals (and a folder it cannot make or read) as the page's one-line error."""
    try:
        yield
    except StoreError as err:
        raise gr.Error(str(err)) from None
    except OSError as err:
        raise gr.Error(f"The output folder cannot be used: {err.strerror or err} ({err.filename}). "
                       "Check --output-root.") from None


def table_row(info: LoraInfo) -> list:
    """One row of the LoRAs table (columns as `LORA_TABLE_HEADERS`)."""
    m = info.meta
    steps = m.get("steps_done")
    steps = f"{steps}/{m.get('max_train_steps')}" if steps is not None else str(m.get("max_train_steps", ""))
    return [info.name, info.status_label, steps, m.get("optimizer", ""), m.get("rank", ""), layers_label(m),
            f"{m.get('learning_rate', '')}", m.get("resolution", ""), m.get("instance_prompt", ""),
            str(m.get("created", "")).replace("T", " "), format_size(info.size_bytes())]


def layers_label(meta: dict) -> str:
    """The table's "layers" cell: the preset, then what changes the network (alpha, LoCon, DoRA, EMA),
    e.g. "attn-ff, alpha 1, conv 4, DoRA, EMA"."""
    parts = [meta.get("lora_layers") or "attn"]
    if meta.get("lora_alpha") not in (None, meta.get("rank")):
        parts.append(f"alpha {meta['lora_alpha']:g}")
    if meta.get("conv_rank"):
        parts.append(f"conv {meta['conv_rank']}")
    parts += [name for key, name in (("use_dora", "DoRA"), ("use_ema", "EMA")) if meta.get(key)]
    return ", ".join(parts)


def _config_record(config) -> dict:
    """The run's whole TrainConfig as JSON values, paths inside the LoRA folder (for a resume)."""
    import json

    return json.loads(json.dumps(config.to_dict(), default=str))


def _run_meta(config, base: BaseModel) -> dict:
    """What the store records about a run when it starts."""
    return {
        "base_model": base.model_id,
        "instance_prompt": config.instance_prompt,
        "class_prompt": config.class_prompt or "",
        "max_train_steps": config.max_train_steps,
        "learning_rate": config.learning_rate,
        "rank": config.rank,
        "lora_layers": config.lora_layers,
        "lora_alpha": config.effective_lora_alpha,
        "conv_rank": config.conv_rank,
        "use_dora": config.use_dora,
        "use_ema": config.use_ema,
        "alpha_mask": config.alpha_mask,
        "optimizer": config.optimizer,
        "resolution": config.resolution,
        "train_text_encoder": config.train_text_encoder,
        "validation_prompt": config.validation_prompt or "",
        "seed": config.seed,
        "num_images": len(config.instance_images),
    }
