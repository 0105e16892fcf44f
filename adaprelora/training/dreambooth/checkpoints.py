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


def register_lora_checkpoint_hooks(accelerator, unet, text_encoder, weight_dtype: torch.dtype) -> None:
    """Make `accelerator.save_state` / `load_state` save and load the LoRA tensors only."""
    unet_cls = type(accelerator.unwrap_model(unet))
    te_cls = type(accelerator.unwrap_model(text_encoder))

    def split(models):
        unet = text_encoder = None
        for model in models:
            if isinstance(model, unet_cls):
                unet = model
            elif isinstance(model, te_cls):
                text_encoder = model
            else:
                raise ValueError(f"unexpected model in checkpoint: {type(model).__name__}")
        return unet, text_encoder

    def save_weights(models, output_dir):
        save_diffusers_lora(output_dir, *split(models))

    def load_weights(models, input_dir):
        unet, text_encoder = split(models)
        load_lora_checkpoint(input_dir, unet, text_encoder)
        if weight_dtype != torch.float32:
            from diffusers.training_utils import cast_training_params

            cast_training_params([m for m in (unet, text_encoder) if m is not None], dtype=torch.float32)

    register_checkpoint_hooks(accelerator, save_weights, load_weights)


def load_lora_checkpoint(input_dir: str, unet, text_encoder=None) -> None:
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
    te_sd = {k[len("text_encoder."):]: v for k, v in state.items() if k.startswith("text_encoder.")}
    if text_encoder is not None:
        if not te_sd:
            raise ValueError("checkpoint has no text-encoder LoRA but --train_text_encoder is set")
        te_sd = text_encoder_keys_for(text_encoder, convert_state_dict_to_peft(convert_state_dict_to_diffusers(te_sd)))
        result = set_peft_model_state_dict(text_encoder, te_sd, adapter_name="default")
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise ValueError(f"checkpoint has text-encoder LoRA tensors the model does not: {unexpected[:3]}")
