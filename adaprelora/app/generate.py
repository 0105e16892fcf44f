"""Image generation for the app: the base pipeline, one trained LoRA at a chosen scale.

`BaseModel` knows where the base Stable Diffusion model lives (a Hub id or a local folder), checks
once, in the background, that it can be loaded, and keeps one pipeline in memory for generation.
`generate_images` loads a LoRA folder with `load_lora_weights`, applies the LoRA scale through
`set_adapters`, generates, saves PNGs under the output root and unloads the LoRA again.
"""
from __future__ import annotations

import datetime as _dt
import os
import threading
from dataclasses import dataclass
from typing import Optional

import torch

from .defaults import GENERATE_DEFAULTS, SD15_MODEL, is_builtin_model, model_family

_ADAPTER = "app_lora"


def how_to_use_local_model(model_id: str) -> str:
    """The advice shown whenever the base model cannot be loaded."""
    hub_id = model_id if _looks_like_hub_id(model_id) else SD15_MODEL
    return (
        "Point `--base-model` at a local copy: on a machine with internet run "
        f"`hf download {hub_id} --local-dir ./sd15` (a diffusers folder with `model_index.json`), "
        "copy the folder here, then start `python app.py --base-model ./sd15`."
    )


def _looks_like_hub_id(model_id: str) -> bool:
    return (not os.path.exists(model_id) and not model_id.startswith((".", "/", "~"))
            and model_id.count("/") == 1 and all(model_id.split("/")))


def _check_model(model_id: str) -> Optional[str]:
    """None if `model_id` looks loadable, else a one-line reason (never raises)."""
    if os.path.isdir(model_id):
        if not os.path.isfile(os.path.join(model_id, "model_index.json")):
            return f"the folder `{model_id}` is not a diffusers pipeline (no `model_index.json` in it)"
        return None
    if not _looks_like_hub_id(model_id):
        return f"`{model_id}` is neither a local folder nor a Hub model id (`owner/name`)"
    try:
        from huggingface_hub import file_exists, try_to_load_from_cache
        from huggingface_hub.errors import RepositoryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub ships with diffusers
        return None
    cached = try_to_load_from_cache(model_id, "model_index.json")
    if isinstance(cached, str) and os.path.isfile(cached):
        return None
    try:  # a HEAD request: nothing is downloaded or cached, and no retries when offline
        if file_exists(model_id, "model_index.json"):
            return None
        return f"`{model_id}` on the Hugging Face Hub is not a diffusers pipeline (no `model_index.json`)"
    except RepositoryNotFoundError:
        return f"there is no model `{model_id}` on the Hugging Face Hub (or it needs a login)"
    except Exception:  # offline, HF_HUB_OFFLINE, DNS, proxy...
        return (f"`{model_id}` is not in the local Hugging Face cache and the Hub cannot be reached "
                "(offline, or HF_HUB_OFFLINE is set)")


def default_device() -> tuple[torch.device, torch.dtype]:
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.float16
    return torch.device("cpu"), torch.float32


class BaseModel:
    """The base model shared by every user of one app: its id, its status, one cached pipeline."""

    def __init__(self, model_id: str, check_in_background: bool = True):
        self.model_id = model_id
        self._problem: Optional[str] = None
        self._checked = threading.Event()
        self._pipe = None
        self._pipe_lock = threading.Lock()
        if check_in_background:
            threading.Thread(target=self._run_check, name="base-model-check", daemon=True).start()
        else:
            self._run_check()

    def _run_check(self) -> None:
        try:
            self._problem = _check_model(self.model_id)
        finally:
            self._checked.set()

    def problem(self, timeout: Optional[float] = None) -> Optional[str]:
        """Why the base model cannot be loaded, or None. Waits up to `timeout` for the check."""
        if not self._checked.wait(timeout):
            return None
        return self._problem

    def status_markdown(self, timeout: Optional[float] = 60.0) -> str:
        if not self._checked.wait(timeout):
            return f"Base model: `{self.model_id}` (still checking that it can be loaded...)"
        if self._problem:
            return (
                f"**The base model cannot be loaded:** {self._problem}. Training and generation need it.\n\n"
                f"{how_to_use_local_model(self.model_id)}"
            )
        if is_builtin_model(self.model_id):
            return ("Base model: the built-in **tiny-sd**, a small model trained here on shapes (64 x 64): it "
                    "draws prompts like \"a red circle on a blue background\", and learns a new shape from a few "
                    "pictures (try the example). For photos use Stable Diffusion 1.5: "
                    f"`python app.py --base-model {SD15_MODEL}` (a Hub id or a local diffusers folder).")
        return f"Base model: `{self.model_id}` ({model_family(self.model_id)})"

    def pipeline(self):
        """The generation pipeline, loaded on first use. Raises RuntimeError with advice on failure."""
        with self._pipe_lock:
            if self._pipe is None:
                from diffusers import DiffusionPipeline

                device, dtype = default_device()
                try:
                    pipe = DiffusionPipeline.from_pretrained(self.model_id, dtype=dtype)
                except Exception as err:
                    from adaprelora.training.errors import first_line

                    first = first_line(err)
                    raise RuntimeError(
                        f"The base model `{self.model_id}` could not be loaded ({first[:200]}). "
                        + how_to_use_local_model(self.model_id)
                    ) from err
                if not hasattr(pipe, "load_lora_weights"):
                    raise RuntimeError(
                        f"`{self.model_id}` is a {type(pipe).__name__}, which cannot load LoRA weights; "
                        "use a Stable Diffusion 1.x/2.x or SDXL pipeline"
                    )
                pipe.set_progress_bar_config(disable=True)
                self._pipe = pipe.to(device)
            return self._pipe

    def release(self) -> None:
        """Free the generation pipeline (before training, which loads its own copy)."""
        with self._pipe_lock:
            self._pipe = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@dataclass
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    num_inference_steps: int = GENERATE_DEFAULTS.num_inference_steps
    guidance_scale: float = GENERATE_DEFAULTS.guidance_scale
    seed: int = GENERATE_DEFAULTS.seed
    lora_scale: float = GENERATE_DEFAULTS.lora_scale
    num_images: int = GENERATE_DEFAULTS.num_images
    width: Optional[int] = None
    height: Optional[int] = None


def generate_images(
    base: BaseModel,
    request: GenerationRequest,
    lora_dir: Optional[str],
    out_dir: str,
    weight_name: Optional[str] = None,
) -> list[str]:
    """Generate `request.num_images` images, with the LoRA in `lora_dir` if given; return PNG paths.

    The pipeline is used by one call at a time (the app queues generation); the LoRA is unloaded
    afterwards so that the next call starts from the plain base model.
    """
    pipe = base.pipeline()
    with base._pipe_lock:
        try:
            extra = {}
            if lora_dir is not None:
                kwargs = {"weight_name": weight_name} if weight_name else {}
                pipe.load_lora_weights(lora_dir, adapter_name=_ADAPTER, **kwargs)
                pipe.set_adapters([_ADAPTER], adapter_weights=[float(request.lora_scale)])
            generator = torch.Generator(device="cpu").manual_seed(int(request.seed))
            if request.width and request.height:
                extra.update(width=int(request.width), height=int(request.height))
            with torch.inference_mode():
                result = pipe(
                    prompt=request.prompt,
                    negative_prompt=request.negative_prompt or None,
                    num_inference_steps=int(request.num_inference_steps),
                    guidance_scale=float(request.guidance_scale),
                    num_images_per_prompt=int(request.num_images),
                    generator=generator,
                    **extra,
                )
        finally:
            if lora_dir is not None:
                pipe.unload_lora_weights()
    return _save_images(result.images, request, out_dir, lora_dir)


def _save_images(images, request: GenerationRequest, out_dir: str, lora_dir: Optional[str]) -> list[str]:
    from PIL.PngImagePlugin import PngInfo

    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    os.makedirs(out_dir, exist_ok=True)
    info = PngInfo()
    info.add_text("prompt", request.prompt)
    info.add_text("negative_prompt", request.negative_prompt or "")
    info.add_text(
        "parameters",
        f"steps={request.num_inference_steps} guidance={request.guidance_scale} seed={request.seed} "
        f"lora={os.path.basename(lora_dir) if lora_dir else 'none'} lora_scale={request.lora_scale}",
    )
    paths = []
    for i, image in enumerate(images):
        path = os.path.join(out_dir, f"{stamp}-{i}.png")
        image.save(path, pnginfo=info)
        paths.append(path)
    return paths
