"""LoRA tensor names: PEFT's (as trained), diffusers' (the diffusers file) and kohya's (the kohya file).

kohya-ss / AUTOMATIC1111 / ComfyUI name a module `lora_unet_<module>` or `lora_te_<module>` (dots
as underscores; for SDXL the UNet modules get Stability's block names and the text encoders are
`lora_te1_` / `lora_te2_`, see `kohya_sdxl`), with `.lora_down.weight` (A), `.lora_up.weight` (B)
and a scalar `.alpha` (the scale is alpha / rank; per module, so LoCon's convolutions keep their own).
Convolutions keep PEFT's shapes, which are kohya's: `lora_down` (r, in, k, k), `lora_up` (out, r, 1, 1).
DoRA's magnitude is LyCORIS's `.dora_scale` on the output axis (LyCORIS's default `wd_on_output`):
(out, 1) for a Linear, (out, 1, 1, 1) for a Conv2d, where PEFT keeps (out,) and (1, out, 1, 1).
Going back needs the models: kohya's underscores cannot be told from the dots they replaced by text
alone.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch

from ..family import detect_family
from ..kohya_sdxl import KOHYA_SDXL_TE1_PREFIX, KOHYA_SDXL_TE2_PREFIX, sgm_renamer, sgm_unet_module_name
from ..models import as_list

KOHYA_UNET_PREFIX = "lora_unet_"
KOHYA_TE_PREFIX = "lora_te_"


def peft_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors of `model`'s default PEFT adapter, `<module>.lora_A.weight` / `.lora_B.weight`."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, save_embedding_layers=False)
    return {k: v.detach() for k, v in state.items()}


def diffusers_lora_layers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s LoRA tensors in the layout `save_lora_weights` expects (without the model prefix).

    diffusers' conversion gives its own names (`.lora.down` in a UNet, `.lora_linear_layer.down` in
    a text encoder) to the attention projections only; the other layers (feed-forward, convolutions,
    the CLIP MLP) are given the same naming here, since diffusers' loader reads a file in one
    naming, guessed from its first key."""
    from diffusers.utils import convert_state_dict_to_diffusers

    state = convert_state_dict_to_diffusers(peft_state_dict(model))
    text = any(".lora_linear_layer." in k for k in state)
    down, up = (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight") if text else (
        ".lora.down.weight", ".lora.up.weight")
    return {k.replace(".lora_A.weight", down).replace(".lora_B.weight", up): v for k, v in state.items()}


def file_text_encoder_module(module: str) -> str:
    """A text-encoder module's name in the files: with the `text_model.` level. transformers 5's
    CLIPTextModel has none; transformers 4 (most diffusers setups) and A1111/kohya names keep it,
    and diffusers on transformers 5 maps it back."""
    return module if module.startswith("text_model.") else f"text_model.{module}"


def text_encoder_keys_for(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state`'s text-encoder keys in `model`'s own layout: with or without the `text_model.` level
    (files keep it; transformers 5's CLIPTextModel has none)."""
    if hasattr(model, "text_model"):
        return {file_text_encoder_module(k): v for k, v in state.items()}
    return {k.removeprefix("text_model."): v for k, v in state.items()}


def _is_sdxl_unet(unet: Optional[torch.nn.Module]) -> bool:
    return unet is not None and detect_family(unet_config=unet.config).sdxl


MAGNITUDE = "lora_magnitude_vector"  # DoRA's magnitude in PEFT's state dicts


def magnitude_to_dora_scale(magnitude: torch.Tensor) -> torch.Tensor:
    """PEFT's DoRA magnitude ((out,) for a Linear, (1, out, 1, 1) for a Conv2d) as LyCORIS's
    output-axis `dora_scale`: (out, 1) or (out, 1, 1, 1)."""
    flat = magnitude.reshape(-1, 1)
    return flat if magnitude.dim() <= 2 else flat.reshape(-1, 1, 1, 1)


def dora_scale_to_magnitude(dora_scale: torch.Tensor) -> torch.Tensor:
    """The inverse of `magnitude_to_dora_scale` (an output-axis `dora_scale` in PEFT's shape)."""
    return dora_scale.reshape(-1) if dora_scale.dim() <= 2 else dora_scale.reshape(1, -1, 1, 1)


def peft_to_kohya(
    unet_sd: Optional[dict[str, torch.Tensor]],
    text_encoder_sd: Optional[dict[str, torch.Tensor]],
    alpha: float,
    dtype: torch.dtype = torch.float32,
    *,
    text_encoder_2_sd: Optional[dict[str, torch.Tensor]] = None,
    sdxl_layers_per_block: Optional[int] = None,
    alphas: Optional[dict[str, float]] = None,
) -> dict[str, torch.Tensor]:
    """Rename PEFT LoRA tensors to kohya keys and add each module's `.alpha` (`alphas[module]`
    where given, e.g. LoCon's convolutions, else `alpha`); DoRA magnitudes become `.dora_scale`.

    With `sdxl_layers_per_block` (the SDXL UNet's `layers_per_block`) the names are kohya's SDXL
    ones: SGM block names for the UNet, `lora_te1_` / `lora_te2_` for the two text encoders.
    `alphas` is keyed by the module names of the state dicts given (one model's, or several
    models' with the same names).
    """
    out: dict[str, torch.Tensor] = {}
    sdxl = sdxl_layers_per_block is not None
    groups = (
        (KOHYA_UNET_PREFIX, unet_sd, sgm_renamer(sdxl_layers_per_block) if sdxl else (lambda m: m)),
        (KOHYA_SDXL_TE1_PREFIX if sdxl else KOHYA_TE_PREFIX, text_encoder_sd, file_text_encoder_module),
        (KOHYA_SDXL_TE2_PREFIX, text_encoder_2_sd, file_text_encoder_module),
    )
    for prefix, sd, rename in groups:
        for key, tensor in (sd or {}).items():
            for part, kohya_part in ((".lora_A.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_up.weight"),
                                     (f".{MAGNITUDE}.weight", ".dora_scale"), (f".{MAGNITUDE}", ".dora_scale")):
                if key.endswith(part):
                    module = key[: -len(part)]
                    name = prefix + rename(module).replace(".", "_")
                    if kohya_part == ".dora_scale":
                        tensor = magnitude_to_dora_scale(tensor)
                    out[name + kohya_part] = tensor.detach().to("cpu", dtype).contiguous()
                    module_alpha = (alphas or {}).get(module, alpha)
                    out[name + ".alpha"] = torch.tensor(float(module_alpha), dtype=dtype)
                    break
            else:
                raise ValueError(f"not a LoRA tensor of a Linear or Conv2d layer: {key}")
    return out


def module_alphas(model: torch.nn.Module, adapter: str = "default") -> dict[str, float]:
    """{module name: its LoRA alpha} for `model`'s adapter (PEFT's alpha_pattern applied)."""
    from peft.tuners.lora import LoraLayer

    return {name: float(module.lora_alpha[adapter]) for name, module in model.named_modules()
            if isinstance(module, LoraLayer) and adapter in module.lora_alpha}


def kohya_tensors(unet: torch.nn.Module, text_encoders=None,
                  dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The kohya file's tensors for `unet` and `text_encoders` (one model, a sequence or None) with
    their "default" adapters; an SDXL UNet gets kohya's SDXL names."""
    layers = {"sdxl_layers_per_block": unet.config.layers_per_block} if _is_sdxl_unet(unet) else {}
    alpha = lambda model: float(model.peft_config["default"].lora_alpha)  # noqa: E731
    tensors = peft_to_kohya(peft_state_dict(unet), None, alpha(unet), dtype, alphas=module_alphas(unet), **layers)
    for index, encoder in enumerate(as_list(text_encoders)):
        sd = peft_state_dict(encoder)
        first, second = (sd, None) if index == 0 else (None, sd)
        tensors.update(peft_to_kohya(None, first, alpha(encoder), dtype, text_encoder_2_sd=second,
                                     alphas=module_alphas(encoder), **layers))
    return tensors


def _kohya_names(model: Optional[torch.nn.Module], prefix: str, rename) -> dict[str, str]:
    if model is None:
        return {}
    names = ((rename(name), name) for name, _ in model.named_modules() if name)
    return {prefix + kohya.replace(".", "_"): name for kohya, name in names if kohya is not None}


def _unet_kohya_rename(unet: Optional[torch.nn.Module]):
    if _is_sdxl_unet(unet):
        layers = unet.config.layers_per_block
        return lambda m: sgm_unet_module_name(m, layers)
    return lambda m: m


def kohya_to_peft(
    kohya_sd: dict[str, torch.Tensor],
    unet: Optional[torch.nn.Module] = None,
    text_encoders=None,
    target_alpha: Union[None, float, Callable[[str], float]] = None,
) -> tuple[dict[str, torch.Tensor], ...]:
    """Convert a kohya LoRA state dict back to PEFT tensors for `unet` and `text_encoders` (one
    model or a sequence: SDXL's two).

    Module names are found by matching the models' own module names. With `target_alpha` (a number,
    or a function of the PEFT module name), each `lora_up` is rescaled by `alpha / target_alpha` so
    that an adapter created with that alpha computes exactly what the file describes. A
    `.dora_scale` becomes the module's DoRA magnitude in PEFT's shape. Returns (unet_sd, one state
    dict per text encoder, at least one); SDXL names (SGM UNet blocks, `lora_te1_` / `lora_te2_`) are understood
    when `unet` is SDXL's. A key that matches no module raises ValueError.
    """
    encoders = as_list(text_encoders)
    first = encoders[0] if encoders else None
    second = encoders[1] if len(encoders) > 1 else None
    lookup = {
        **_kohya_names(unet, KOHYA_UNET_PREFIX, _unet_kohya_rename(unet)),
        **_kohya_names(first, KOHYA_TE_PREFIX, file_text_encoder_module),
        **_kohya_names(first, KOHYA_SDXL_TE1_PREFIX, file_text_encoder_module),
        **_kohya_names(second, KOHYA_SDXL_TE2_PREFIX, file_text_encoder_module),
    }
    unet_sd: dict[str, torch.Tensor] = {}
    te_sd: dict[str, torch.Tensor] = {}
    te2_sd: dict[str, torch.Tensor] = {}
    for key, tensor in kohya_sd.items():
        base, _, suffix = key.partition(".")
        if suffix == "alpha":
            continue
        if suffix not in ("lora_down.weight", "lora_up.weight", "dora_scale") or base not in lookup:
            raise ValueError(f"kohya key {key!r} matches no LoRA module of the given models")
        module = lookup[base]
        tensor = tensor.detach().clone().float()
        if suffix == "lora_up.weight" and target_alpha is not None and f"{base}.alpha" in kohya_sd:
            target = target_alpha(module) if callable(target_alpha) else target_alpha
            tensor = tensor * (float(kohya_sd[f"{base}.alpha"]) / float(target))
        if suffix == "dora_scale":
            name, tensor = f"{module}.{MAGNITUDE}", dora_scale_to_magnitude(tensor)
        else:
            name = f"{module}.{'lora_A' if suffix == 'lora_down.weight' else 'lora_B'}.weight"
        target = (unet_sd if base.startswith(KOHYA_UNET_PREFIX)
                  else te2_sd if base.startswith(KOHYA_SDXL_TE2_PREFIX) else te_sd)
        target[name] = tensor
    return (unet_sd, te_sd, te2_sd)[: 1 + max(len(encoders), 1)]


__all__ = ["KOHYA_TE_PREFIX", "KOHYA_UNET_PREFIX", "MAGNITUDE", "diffusers_lora_layers", "dora_scale_to_magnitude",
           "file_text_encoder_module", "kohya_tensors", "kohya_to_peft", "magnitude_to_dora_scale", "module_alphas",
           "peft_state_dict", "peft_to_kohya", "text_encoder_keys_for"]
