"""DreamBooth checkpoints that hold only the LoRA tensors, not the frozen base model.

`accelerate.save_state` would write the whole UNet and text encoder (gigabytes) into every
`checkpoint-<step>/`. The hooks here replace those weights by the diffusers LoRA file, and load it
back into the "default" adapters on resume; optimizer, scheduler and RNG states are still saved by
accelerate as usual.
"""
from __future__ import annotations

import os

import torch

from ..checkpoints import register_checkpoint_hooks
from .export import DIFFUSERS_WEIGHT_NAME, save_diffusers_lora, text_encoder_keys_for


def register_lora_checkpoint_hooks(accelerator, unet, text_encoder, weight_dtype: torch.dtype,
                                   text_encoder_2=None) -> None:
    """Make `accelerator.save_state` / `load_state` save and load the LoRA tensors only (SDXL's
    second text encoder, when given, as `text_encoder_2.` keys)."""
    classes = [type(accelerator.unwrap_model(m)) if m is not None else None
               for m in (unet, text_encoder, text_encoder_2)]

    def split(models):
        found = [None, None, None]
        for model in models:
            if type(model) not in classes:  # exact types: the two CLIP encoders are siblings
                raise ValueError(f"unexpected model in checkpoint: {type(model).__name__}")
            found[classes.index(type(model))] = model
        return found

    def save_weights(models, output_dir):
        unet, te, te2 = split(models)
        save_diffusers_lora(output_dir, unet, te, text_encoder_2=te2)

    def load_weights(models, input_dir):
        unet, te, te2 = split(models)
        load_lora_checkpoint(input_dir, unet, te, text_encoder_2=te2)
        if weight_dtype != torch.float32:
            from diffusers.training_utils import cast_training_params

            cast_training_params([m for m in (unet, te, te2) if m is not None], dtype=torch.float32)

    register_checkpoint_hooks(accelerator, save_weights, load_weights)


def load_lora_checkpoint(input_dir: str, unet, text_encoder=None, text_encoder_2=None) -> None:
    """Load a checkpoint's `pytorch_lora_weights.safetensors` into the models' "default" adapters."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(os.path.join(input_dir, DIFFUSERS_WEIGHT_NAME))
    unet_sd = {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(unet_sd), adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"checkpoint has LoRA tensors the model does not: {unexpected[:3]}")
    for prefix, encoder in (("text_encoder.", text_encoder), ("text_encoder_2.", text_encoder_2)):
        if encoder is None:
            continue
        te_sd = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not te_sd:
            raise ValueError(f"checkpoint has no {prefix[:-1]} LoRA but --train_text_encoder is set")
        te_sd = text_encoder_keys_for(encoder, convert_state_dict_to_peft(convert_state_dict_to_diffusers(te_sd)))
        result = set_peft_model_state_dict(encoder, te_sd, adapter_name="default")
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise ValueError(f"checkpoint has {prefix[:-1]} LoRA tensors the model does not: {unexpected[:3]}")
