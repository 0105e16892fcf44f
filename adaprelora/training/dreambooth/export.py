"""Writing trained LoRA adapters: the diffusers file, the kohya/A1111 file, metadata, model card.

- `pytorch_lora_weights.safetensors`: diffusers keys (`unet.…`, `text_encoder.text_model.…` and for
  SDXL `text_encoder_2.text_model.…`, the
  layout transformers 4 setups expect and diffusers maps on transformers 5 too), loadable with
  `pipe.load_lora_weights(output_dir)`; the adapters' LoraConfig (rank, alpha) is stored under
  diffusers' `lora_adapter_metadata` header key so a `--lora_alpha` other than `--rank` reloads
  exactly.
- `<output_name>.safetensors`: kohya-ss / AUTOMATIC1111 / ComfyUI keys: `lora_unet_<module>` and
  `lora_te_<module>` (dots as underscores; for SDXL the UNet modules get Stability's block names and
  the text encoders are `lora_te1_` / `lora_te2_`, see `kohya_sdxl`) with `.lora_down.weight` (A), `.lora_up.weight` (B) and
  a scalar `.alpha` (the scale is alpha / rank).
- Both files carry the training settings in their safetensors header (`ss_*` and `modelspec.*` keys
  as kohya writes them, plus `adaprelora_config`, the whole TrainConfig as JSON); the kohya file
  also has kohya's content hashes `sshs_model_hash` and `sshs_legacy_hash`.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from typing import Optional

import torch

from .kohya_metadata import BaseModelKind, base_model_metadata, dataset_metadata, kohya_hashes, modelspec_metadata
from .kohya_sdxl import KOHYA_SDXL_TE1_PREFIX, KOHYA_SDXL_TE2_PREFIX, sgm_renamer, sgm_unet_module_name

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
UNET_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]
KOHYA_UNET_PREFIX = "lora_unet_"
KOHYA_TE_PREFIX = "lora_te_"


# ------------------------------------------------------------------------------------------------
# State dicts
# ------------------------------------------------------------------------------------------------
def peft_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors of `model`'s default PEFT adapter, `<module>.lora_A.weight` / `.lora_B.weight`."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, save_embedding_layers=False)
    return {k: v.detach() for k, v in state.items()}


def diffusers_lora_layers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s LoRA tensors in the layout `save_lora_weights` expects (without the model prefix)."""
    from diffusers.utils import convert_state_dict_to_diffusers

    return convert_state_dict_to_diffusers(peft_state_dict(model))


def _te_kohya_module_name(module: str) -> str:
    # transformers 5's CLIPTextModel has no `text_model.` level; transformers 4 (most diffusers
    # setups) and A1111/kohya names keep it, and diffusers on transformers 5 maps it back.
    return module if module.startswith("text_model.") else f"text_model.{module}"


def text_encoder_keys_for(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state`'s text-encoder keys in `model`'s own layout: with or without the `text_model.` level
    (files keep it; transformers 5's CLIPTextModel has none)."""
    if hasattr(model, "text_model"):
        return {_te_kohya_module_name(k): v for k, v in state.items()}
    return {k.removeprefix("text_model."): v for k, v in state.items()}


def is_sdxl_unet(unet: Optional[torch.nn.Module]) -> bool:
    """SDXL's UNet has the "text_time" added conditioning."""
    return unet is not None and getattr(unet.config, "addition_embed_type", None) == "text_time"


def peft_to_kohya(
    unet_sd: Optional[dict[str, torch.Tensor]],
    text_encoder_sd: Optional[dict[str, torch.Tensor]],
    alpha: float,
    dtype: torch.dtype = torch.float32,
    *,
    text_encoder_2_sd: Optional[dict[str, torch.Tensor]] = None,
    sdxl_layers_per_block: Optional[int] = None,
) -> dict[str, torch.Tensor]:
    """Rename PEFT LoRA tensors to kohya keys and add each module's `.alpha`.

    With `sdxl_layers_per_block` (the SDXL UNet's `layers_per_block`) the names are kohya's SDXL
    ones: SGM block names for the UNet, `lora_te1_` / `lora_te2_` for the two text encoders.
    """
    out: dict[str, torch.Tensor] = {}
    sdxl = sdxl_layers_per_block is not None
    groups = (
        (KOHYA_UNET_PREFIX, unet_sd, sgm_renamer(sdxl_layers_per_block) if sdxl else (lambda m: m)),
        (KOHYA_SDXL_TE1_PREFIX if sdxl else KOHYA_TE_PREFIX, text_encoder_sd, _te_kohya_module_name),
        (KOHYA_SDXL_TE2_PREFIX, text_encoder_2_sd, _te_kohya_module_name),
    )
    for prefix, sd, rename in groups:
        for key, tensor in (sd or {}).items():
            for part, kohya_part in ((".lora_A.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_up.weight")):
                if key.endswith(part):
                    module = key[: -len(part)]
                    name = prefix + rename(module).replace(".", "_")
                    out[name + kohya_part] = tensor.detach().to("cpu", dtype).contiguous()
                    out[name + ".alpha"] = torch.tensor(float(alpha), dtype=dtype)
                    break
            else:
                raise ValueError(f"not a LoRA tensor of a linear layer: {key}")
    return out


def _kohya_names(model: Optional[torch.nn.Module], prefix: str, rename) -> dict[str, str]:
    if model is None:
        return {}
    names = ((rename(name), name) for name, _ in model.named_modules() if name)
    return {prefix + kohya.replace(".", "_"): name for kohya, name in names if kohya is not None}


def _unet_kohya_rename(unet: Optional[torch.nn.Module]):
    if is_sdxl_unet(unet):
        layers = unet.config.layers_per_block
        return lambda m: sgm_unet_module_name(m, layers)
    return lambda m: m


def kohya_to_peft(
    kohya_sd: dict[str, torch.Tensor],
    unet: Optional[torch.nn.Module] = None,
    text_encoder: Optional[torch.nn.Module] = None,
    target_alpha: Optional[float] = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Convert a kohya LoRA state dict back to PEFT tensors for `unet` and `text_encoder`.

    Module names are found by matching the models' own module names (kohya replaces dots with
    underscores, which cannot be undone by text alone). With `target_alpha`, each `lora_up` is
    rescaled by `alpha / target_alpha` so that an adapter created with `lora_alpha=target_alpha`
    computes exactly what the file describes. Returns (unet_sd, text_encoder_sd); a key that
    matches no module raises ValueError.
    """
    unet_sd, te_sd, _ = kohya_to_peft_sdxl(kohya_sd, unet, text_encoder, None, target_alpha)
    return unet_sd, te_sd


def kohya_to_peft_sdxl(
    kohya_sd: dict[str, torch.Tensor],
    unet: Optional[torch.nn.Module] = None,
    text_encoder: Optional[torch.nn.Module] = None,
    text_encoder_2: Optional[torch.nn.Module] = None,
    target_alpha: Optional[float] = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """`kohya_to_peft` for SD and SDXL files: returns (unet_sd, text_encoder_sd, text_encoder_2_sd);
    SDXL names (SGM UNet blocks, `lora_te1_` / `lora_te2_`) are understood when `unet` is SDXL's."""
    lookup = {
        **_kohya_names(unet, KOHYA_UNET_PREFIX, _unet_kohya_rename(unet)),
        **_kohya_names(text_encoder, KOHYA_TE_PREFIX, _te_kohya_module_name),
        **_kohya_names(text_encoder, KOHYA_SDXL_TE1_PREFIX, _te_kohya_module_name),
        **_kohya_names(text_encoder_2, KOHYA_SDXL_TE2_PREFIX, _te_kohya_module_name),
    }
    unet_sd: dict[str, torch.Tensor] = {}
    te_sd: dict[str, torch.Tensor] = {}
    te2_sd: dict[str, torch.Tensor] = {}
    for key, tensor in kohya_sd.items():
        base, _, suffix = key.partition(".")
        if suffix == "alpha":
            continue
        if suffix not in ("lora_down.weight", "lora_up.weight") or base not in lookup:
            raise ValueError(f"kohya key {key!r} matches no LoRA module of the given models")
        module = lookup[base]
        tensor = tensor.detach().clone().float()
        if suffix == "lora_up.weight" and target_alpha is not None and f"{base}.alpha" in kohya_sd:
            tensor = tensor * (float(kohya_sd[f"{base}.alpha"]) / float(target_alpha))
        name = f"{module}.{'lora_A' if suffix == 'lora_down.weight' else 'lora_B'}.weight"
        target = (unet_sd if base.startswith(KOHYA_UNET_PREFIX)
                  else te2_sd if base.startswith(KOHYA_SDXL_TE2_PREFIX) else te_sd)
        target[name] = tensor
    return unet_sd, te_sd, te2_sd


def load_kohya_lora(path: str, unet: torch.nn.Module, text_encoder: Optional[torch.nn.Module] = None,
                    text_encoder_2: Optional[torch.nn.Module] = None) -> list[str]:
    """Load a kohya file into models that already carry a PEFT adapter "default" of the same rank.

    Returns the names of the modules loaded. Used to check that the exported kohya file describes
    the same model as the diffusers file.
    """
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    kohya_sd = load_file(path)
    loaded: list[str] = []
    for index, model in enumerate((unet, text_encoder, text_encoder_2)):
        alpha = float(model.peft_config["default"].lora_alpha) if model is not None else None
        sd = kohya_to_peft_sdxl(kohya_sd, unet, text_encoder, text_encoder_2, target_alpha=alpha)[index]
        if not sd:
            continue
        if model is None:
            raise ValueError(f"the kohya file has LoRA tensors for {('unet', 'text_encoder', 'text_encoder_2')[index]} "
                             "but that model was not given")
        set_peft_model_state_dict(model, sd, adapter_name="default")
        loaded += list(sd)
    return sorted({k.rsplit(".lora_", 1)[0] for k in loaded})


# ------------------------------------------------------------------------------------------------
# Metadata and files
# ------------------------------------------------------------------------------------------------
def training_metadata(
    config,
    extra: Optional[dict] = None,
    *,
    base: Optional[BaseModelKind] = None,
    instance_records=None,
    class_records=None,
    started_at: Optional[float] = None,
    finished_at: Optional[float] = None,
) -> dict[str, str]:
    """safetensors header entries (strings only) describing the run: kohya's `ss_*` names where
    kohya has one, the `modelspec.*` keys (see `kohya_metadata`), and `adaprelora_config` (the
    whole TrainConfig as JSON).

    `base` is the base model's family (SD 1.x when not given); `instance_records` and
    `class_records` (the images trained on) give the image counts and caption tag frequencies;
    `started_at` / `finished_at` are `time.time()` values (now when not given).
    """
    now = time.time()
    base = base or BaseModelKind()
    finished_at = now if finished_at is None else finished_at
    meta = {
        "ss_session_id": str(random.randint(0, 2**32 - 1)),
        "ss_training_started_at": str(now if started_at is None else started_at),
        "ss_training_finished_at": str(finished_at),
        **base_model_metadata(base),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(config.rank),
        "ss_network_alpha": str(config.effective_lora_alpha),
        "ss_network_dropout": str(config.lora_dropout),
        # kohya: the folder's (or file's) name for a local model, the Hub id otherwise
        "ss_sd_model_name": _model_name(config.pretrained_model_name_or_path),
        "ss_output_name": config.effective_output_name,
        "ss_training_comment": "DreamBooth LoRA trained with adaprelora",
        "ss_optimizer": f"adaprelora.create_optimizer({config.optimizer!r})",
        "ss_optimizer_args": json.dumps(config.optimizer_args, default=str),
        "ss_learning_rate": str(config.learning_rate),
        "ss_unet_lr": str(config.learning_rate),
        "ss_text_encoder_lr": str(config.learning_rate if config.train_text_encoder else 0.0),
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_lr_warmup_steps": str(config.lr_warmup_steps),
        "ss_max_train_steps": str(config.max_train_steps),
        "ss_batch_size_per_device": str(config.train_batch_size),
        "ss_gradient_accumulation_steps": str(config.gradient_accumulation_steps),
        "ss_gradient_checkpointing": str(config.gradient_checkpointing),
        "ss_max_grad_norm": str(config.max_grad_norm),
        "ss_mixed_precision": str(config.mixed_precision or "no"),
        "ss_resolution": f"({config.resolution}, {config.resolution})",
        "ss_seed": str(config.seed),
        "ss_min_snr_gamma": str(config.snr_gamma),
        "ss_noise_offset": str(config.noise_offset),
        "ss_prior_loss_weight": str(config.prior_loss_weight if config.with_prior_preservation else 0.0),
        "ss_caption_dropout_rate": str(config.caption_dropout_rate),
        "ss_network_train_unet_only": str(not config.train_text_encoder),
        "ss_instance_prompt": str(config.instance_prompt or ""),
        "ss_enable_bucket": str(bool(config.enable_bucket)),
        "ss_min_bucket_reso": str(config.min_bucket_reso),
        "ss_max_bucket_reso": str(config.max_bucket_reso),
        "ss_bucket_no_upscale": str(bool(config.bucket_no_upscale)),
        "ss_cache_latents": str(bool(config.uses_latent_cache)),
        "ss_flip_aug": str(bool(config.random_flip)),
        "adaprelora_config": json.dumps(_jsonable_config(config), sort_keys=True, default=str),
    }
    if instance_records:
        meta.update(dataset_metadata(instance_records, config.instance_prompt, class_records or [],
                                     config.class_prompt if config.with_prior_preservation else None))
    meta.update(modelspec_metadata(base, title=config.effective_output_name, resolution=config.resolution,
                                   timestamp=finished_at, trigger_phrase=config.instance_prompt))
    for key, value in (extra or {}).items():
        meta[key] = value if isinstance(value, str) else json.dumps(value, default=str)
    return meta


def _model_name(name_or_path) -> str:
    name = str(name_or_path)
    return os.path.basename(os.path.normpath(name)) if os.path.exists(name) else name


def _jsonable_config(config) -> dict:
    data = config.to_dict()
    if data.get("instance_images"):
        data["instance_images"] = [os.path.basename(p) for p in data["instance_images"]]
    if data.get("instance_captions"):
        data["instance_captions"] = {os.path.basename(k): v for k, v in data["instance_captions"].items()}
    return data


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


def save_diffusers_lora(output_dir: str, unet: torch.nn.Module, text_encoder: Optional[torch.nn.Module] = None,
                        metadata: Optional[dict[str, str]] = None, weight_name: str = DIFFUSERS_WEIGHT_NAME,
                        text_encoder_2: Optional[torch.nn.Module] = None) -> str:
    """Write `unet`'s (and the text encoders') LoRA as diffusers' `pytorch_lora_weights.safetensors`
    with the adapter configs and `metadata` in the header; an SDXL UNet is saved the way
    `StableDiffusionXLPipeline.load_lora_weights` reads it. Returns the file path."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    kwargs = {"unet_lora_layers": diffusers_lora_layers(unet), "unet_lora_adapter_metadata": _lora_config_dict(unet)}
    for name, encoder in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        if encoder is not None:
            kwargs[f"{name}_lora_layers"] = {_te_kohya_module_name(k): v
                                             for k, v in diffusers_lora_layers(encoder).items()}
            kwargs[f"{name}_lora_adapter_metadata"] = _lora_config_dict(encoder)
    pipeline_cls = StableDiffusionXLPipeline if is_sdxl_unet(unet) else StableDiffusionPipeline
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, weight_name)
    # Written in a temporary folder and moved in place: a process killed meanwhile never leaves a
    # half-written file under the final name.
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


def save_kohya_lora(path: str, unet: torch.nn.Module, text_encoder: Optional[torch.nn.Module] = None,
                    metadata: Optional[dict[str, str]] = None, dtype: torch.dtype = torch.float32,
                    text_encoder_2: Optional[torch.nn.Module] = None) -> str:
    """Write the LoRA in kohya/A1111 format to `path` (fp32 by default: the exact trained values;
    pass `dtype=torch.float16` for kohya's usual half-size files). An SDXL UNet gets kohya's SDXL
    names (`kohya_sdxl`)."""
    from safetensors.torch import save_file

    sdxl = is_sdxl_unet(unet)
    layers = {"sdxl_layers_per_block": unet.config.layers_per_block} if sdxl else {}
    alpha = float(unet.peft_config["default"].lora_alpha)
    tensors = peft_to_kohya(peft_state_dict(unet), None, alpha, dtype, **layers)
    if text_encoder is not None:
        te_alpha = float(text_encoder.peft_config["default"].lora_alpha)
        tensors.update(peft_to_kohya(None, peft_state_dict(text_encoder), te_alpha, dtype, **layers))
    if text_encoder_2 is not None:
        te_alpha = float(text_encoder_2.peft_config["default"].lora_alpha)
        tensors.update(peft_to_kohya(None, None, te_alpha, dtype, text_encoder_2_sd=peft_state_dict(text_encoder_2),
                                     **layers))
    header = {"format": "pt", "modelspec.architecture": BaseModelKind(sdxl=sdxl).architecture}
    header.update(metadata or {})
    # Content hashes as kohya writes them (LoRA browsers index files by them).
    header["sshs_model_hash"], header["sshs_legacy_hash"] = kohya_hashes(tensors, header)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _save_file_atomically(save_file, tensors, path, header)
    return path


def _save_file_atomically(save_file, tensors, path: str, metadata: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)


def write_model_card(
    output_dir: str,
    config,
    files: dict[str, str],
    samples: Optional[list[str]] = None,
    steps: Optional[int] = None,
) -> str:
    """Write `README.md` (Hugging Face model card: YAML header, trigger prompt, samples, usage)."""
    samples = samples or []
    base = config.pretrained_model_name_or_path
    from .kohya_metadata import read_pipeline_class

    pipeline_name = ("StableDiffusionXLPipeline" if "XL" in (read_pipeline_class(str(base), config.revision) or "")
                     else "StableDiffusionPipeline")
    trigger = config.instance_prompt or ""
    rel = lambda p: os.path.relpath(p, output_dir).replace(os.sep, "/")  # noqa: E731
    lines = [
        "---",
        f"base_model: {json.dumps(str(base))}",
        "library_name: diffusers",
        "tags:",
        "- text-to-image",
        "- stable-diffusion",
        "- diffusers",
        "- lora",
        "- dreambooth",
        "- adaprelora",
        f"instance_prompt: {json.dumps(trigger)}",
        "---",
        "",
        f"# DreamBooth LoRA: {config.effective_output_name}",
        "",
        f"LoRA adapter (rank {config.rank}, alpha {config.effective_lora_alpha:g}) for `{base}`, trained with "
        f"DreamBooth and the `{config.optimizer}` optimizer for {steps if steps is not None else '?'} steps at "
        f"{config.resolution}px.",
        "",
        "## Trigger prompt",
        "",
        f"`{trigger}`" if trigger else "Each training image had its own caption (no single trigger prompt).",
        "",
    ]
    if samples:
        lines += ["## Samples", ""]
        prompts = config.validation_prompts
        if prompts:
            lines += [f"Prompt{'s' if len(prompts) > 1 else ''}: " + "; ".join(f"`{p}`" for p in prompts), ""]
        lines += [f"![sample {i}]({rel(p)})" for i, p in enumerate(samples)] + [""]
    lines += [
        "## Files",
        "",
        f"- `{os.path.basename(files['diffusers'])}`: diffusers format",
        f"- `{os.path.basename(files['kohya'])}`: kohya / AUTOMATIC1111 / ComfyUI format",
        "",
        "## Use with diffusers",
        "",
        "```python",
        f"from diffusers import {pipeline_name}",
        "",
        f"pipe = {pipeline_name}.from_pretrained({str(base)!r})",
        "pipe.load_lora_weights('path/to/this/folder')",
        f"image = pipe({trigger or 'your prompt'!r}).images[0]",
        "```",
        "",
        "In AUTOMATIC1111 or ComfyUI, copy the kohya file into the LoRA folder.",
        "",
        "## Training settings",
        "",
        f"- text encoder trained: {config.train_text_encoder}",
        f"- prior preservation: {config.with_prior_preservation}"
        + (f" (class prompt `{config.class_prompt}`, weight {config.prior_loss_weight}, "
           f"class caption dropout {config.class_caption_dropout_rate:g})"
           if config.with_prior_preservation else ""),
        f"- learning rate {config.learning_rate:g}, scheduler {config.lr_scheduler}, batch size "
        f"{config.train_batch_size} x {config.gradient_accumulation_steps} accumulation",
        f"- mixed precision: {config.mixed_precision or 'no'}, seed: {config.seed}",
        "",
        "The full settings are in the safetensors header of both files.",
        "",
    ]
    path = os.path.join(output_dir, "README.md")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines))
    return path


__all__ = [
    "DIFFUSERS_WEIGHT_NAME", "TEXT_ENCODER_TARGET_MODULES", "UNET_TARGET_MODULES", "diffusers_lora_layers",
    "text_encoder_keys_for", "is_sdxl_unet", "kohya_to_peft_sdxl",
    "kohya_to_peft", "load_kohya_lora", "peft_state_dict", "peft_to_kohya", "save_diffusers_lora",
    "remove_stale_temporary_exports", "save_kohya_lora", "training_metadata", "write_model_card",
]
