"""Writing the two LoRA files (and reading the kohya one back), each written whole or not at all.

- `pytorch_lora_weights.safetensors`: diffusers keys (`unet.…`, `text_encoder.text_model.…` and for
  SDXL `text_encoder_2.text_model.…`, the layout transformers 4 setups expect and diffusers maps on
  transformers 5 too), loadable with `pipe.load_lora_weights(output_dir)`; the adapters'
  LoraConfig (rank, alpha) is stored under diffusers' `lora_adapter_metadata` header key so a
  `--lora_alpha` other than `--rank` reloads exactly.
- `<output_name>.safetensors`: kohya-ss / AUTOMATIC1111 / ComfyUI keys (`keys`), with kohya's
  content hashes `sshs_model_hash` and `sshs_legacy_hash` in the header.

Both are written under a temporary name and moved in place, so a process killed meanwhile never
leaves a half-written file under the final name (`remove_stale_temporary_exports` cleans up).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Optional

import torch

from ..family import detect_family
from ..kohya_metadata import kohya_hashes, modelspec_architecture
from ..models import TEXT_ENCODER_NAMES, as_list
from .keys import diffusers_lora_layers, file_text_encoder_module, kohya_tensors, kohya_to_peft, module_alphas

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
_ALWAYS_WRITTEN = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern")


def _lora_config_dict(model: torch.nn.Module) -> dict:
    """The adapter's LoraConfig as diffusers stores it in the file, reduced to the fields that differ
    from peft's defaults (plus rank, alpha and targets): an older peft, which does not know the
    newer fields, then still builds the config (diffusers refuses a config it cannot build)."""
    from peft import LoraConfig

    data = model.peft_config["default"].to_dict()
    defaults = LoraConfig().to_dict()
    out = {}
    for key, value in data.items():
        if isinstance(value, set):
            value = sorted(value)
        default = defaults.get(key)
        default = sorted(default) if isinstance(default, set) else default
        if key in _ALWAYS_WRITTEN or (key in defaults and key != "peft_version" and value != default):
            out[key] = value
    return out


def _text_encoder_file_key(key: str) -> str:
    """A text-encoder tensor's name in the diffusers file; DoRA's magnitude with its `.weight`, which
    the text encoders' adapter loading (transformers) needs to place it (PEFT's state dict has none)."""
    key = file_text_encoder_module(key)
    return f"{key}.weight" if key.endswith(".lora_magnitude_vector") else key


def save_diffusers_lora(output_dir: str, unet: torch.nn.Module, text_encoders=None,
                        metadata: Optional[dict[str, str]] = None, weight_name: str = DIFFUSERS_WEIGHT_NAME) -> str:
    """Write `unet`'s (and `text_encoders`': one model, a sequence in the pipeline's order, or None)
    LoRA as diffusers' `pytorch_lora_weights.safetensors` with the adapter configs and `metadata` in
    the header; an SDXL UNet is saved the way `StableDiffusionXLPipeline.load_lora_weights` reads
    it. Returns the file path."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    kwargs = {"unet_lora_layers": diffusers_lora_layers(unet), "unet_lora_adapter_metadata": _lora_config_dict(unet)}
    for name, encoder in zip(TEXT_ENCODER_NAMES, as_list(text_encoders)):
        kwargs[f"{name}_lora_layers"] = {_text_encoder_file_key(k): v for k, v in diffusers_lora_layers(encoder).items()}
        kwargs[f"{name}_lora_adapter_metadata"] = _lora_config_dict(encoder)
    pipeline_cls = detect_family(unet_config=unet.config).pipeline_class()
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, weight_name)
    tmp_dir = tempfile.mkdtemp(prefix=".tmp-lora-", dir=output_dir)
    try:
        pipeline_cls.save_lora_weights(tmp_dir, weight_name=weight_name, safe_serialization=True, **kwargs)
        tmp_path = os.path.join(tmp_dir, weight_name)
        if metadata:
            # Add our training settings to the header diffusers wrote (its adapter metadata kept).
            with safe_open(tmp_path, framework="pt") as fh:
                header = dict(fh.metadata() or {})
            tensors = load_file(tmp_path)
            header.update(metadata)
            _save_file_atomically(save_file, tensors, tmp_path, header)
        os.replace(tmp_path, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


def remove_stale_temporary_exports(output_dir: str) -> None:
    """Remove the temporary folders and files of exports a killed run left behind in `output_dir`."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if name.startswith(".tmp-lora-") and os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif ".safetensors.tmp-" in name and os.path.isfile(path):
            os.remove(path)


def save_kohya_lora(path: str, unet: torch.nn.Module, text_encoders=None, metadata: Optional[dict[str, str]] = None,
                    dtype: torch.dtype = torch.float32) -> str:
    """Write the LoRA in kohya/A1111 format to `path` (fp32 by default: the exact trained values;
    pass `dtype=torch.float16` for kohya's usual half-size files). An SDXL UNet gets kohya's SDXL
    names (`kohya_sdxl`)."""
    from safetensors.torch import save_file

    tensors = kohya_tensors(unet, text_encoders, dtype)
    header = {"format": "pt", "modelspec.architecture": modelspec_architecture(detect_family(unet_config=unet.config))}
    header.update(metadata or {})
    # Content hashes as kohya writes them (LoRA browsers index files by them).
    header["sshs_model_hash"], header["sshs_legacy_hash"] = kohya_hashes(tensors, header)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _save_file_atomically(save_file, tensors, path, header)
    return path


def load_kohya_lora(path: str, unet: torch.nn.Module, text_encoders=None) -> list[str]:
    """Load a kohya file into models that already carry a PEFT adapter "default" of the same rank.

    Returns the names of the modules loaded (each module's own alpha, LoCon's and DoRA's
    tensors included). Used to check that the exported kohya file describes the same model as
    the diffusers file.
    """
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    kohya_sd = load_file(path)
    models = [unet, *as_list(text_encoders)]
    names = ("unet", *TEXT_ENCODER_NAMES)
    loaded: list[str] = []
    for index, name in enumerate(names):
        model = models[index] if index < len(models) else None
        alphas = module_alphas(model) if model is not None else {}
        # (the other models' modules are converted too and dropped: any alpha does for them)
        parts = kohya_to_peft(kohya_sd, unet, models[1:], target_alpha=lambda module, a=alphas: a.get(module, 1.0))
        sd = parts[index] if index < len(parts) else {}
        if not sd:
            continue
        if model is None:
            raise ValueError(f"the kohya file has LoRA tensors for {name} but that model was not given")
        set_peft_model_state_dict(model, sd, adapter_name="default")
        loaded += list(sd)
    return sorted({k.rsplit(".lora_", 1)[0] for k in loaded})


def _save_file_atomically(save_file, tensors, path: str, metadata: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)


__all__ = ["DIFFUSERS_WEIGHT_NAME", "load_kohya_lora", "remove_stale_temporary_exports", "save_diffusers_lora",
           "save_kohya_lora"]
