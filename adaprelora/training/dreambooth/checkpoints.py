"""DreamBooth checkpoints that hold only the LoRA tensors, not the frozen base model.

`accelerate.save_state` would write the whole UNet and text encoder (gigabytes) into every
`checkpoint-<step>/`. The hooks here replace those weights by the diffusers LoRA file, and load it
back into the "default" adapters on resume; optimizer, scheduler and RNG states are still saved by
accelerate as usual. A LyCORIS run (LoHa / LoKr) saves its network's tensors instead, under the
names of its output file (`lycoris_weights.safetensors`).
"""
from __future__ import annotations

import os

import torch

from ..checkpoints import register_checkpoint_hooks
from .export import DIFFUSERS_WEIGHT_NAME, save_diffusers_lora, text_encoder_keys_for
from .lycoris_network import LYCORIS_ATTR, load_lycoris_state_dict, lycoris_state_dict
from .models import TEXT_ENCODER_NAMES, DreamBoothModels, as_list

# A LyCORIS run's checkpoint file: its network's tensors, named as in the output file.
LYCORIS_WEIGHT_NAME = "lycoris_weights.safetensors"


def register_lora_checkpoint_hooks(accelerator, models: DreamBoothModels) -> None:
    """Make `accelerator.save_state` / `load_state` save and load the LoRA tensors of `models`'
    trained parts only (SDXL's second text encoder as `text_encoder_2.` keys)."""
    classes = [type(accelerator.unwrap_model(m)) for m in (models.unet, *models.text_encoders)]

    def split(prepared):
        found = [None] * len(classes)
        for model in prepared:
            if type(model) not in classes:  # exact types: the two CLIP encoders are siblings
                raise ValueError(f"unexpected model in checkpoint: {type(model).__name__}")
            found[classes.index(type(model))] = model
        return found[0], found[1:]

    def save_weights(prepared, output_dir):
        unet, encoders = split(prepared)
        if hasattr(unet, LYCORIS_ATTR):
            from safetensors.torch import save_file

            tensors = {k: v.to("cpu").contiguous() for k, v in lycoris_state_dict([unet, *as_list(encoders)]).items()}
            save_file(tensors, os.path.join(output_dir, LYCORIS_WEIGHT_NAME))
            return
        save_diffusers_lora(output_dir, unet, encoders)

    def load_weights(prepared, input_dir):
        unet, encoders = split(prepared)
        if hasattr(unet, LYCORIS_ATTR):
            from safetensors.torch import load_file

            load_lycoris_state_dict([unet, *as_list(encoders)], load_file(os.path.join(input_dir, LYCORIS_WEIGHT_NAME)))
            return
        load_lora_checkpoint(input_dir, unet, encoders)
        if models.weight_dtype != torch.float32:
            from diffusers.training_utils import cast_training_params

            cast_training_params([unet, *as_list(encoders)], dtype=torch.float32)

    register_checkpoint_hooks(accelerator, save_weights, load_weights)


def load_lora_checkpoint(input_dir: str, unet, text_encoders=None) -> None:
    """Load a checkpoint's `pytorch_lora_weights.safetensors` into the "default" adapters of `unet`
    and `text_encoders` (one model, a sequence in the pipeline's order, or None)."""
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
    for name, encoder in zip(TEXT_ENCODER_NAMES, as_list(text_encoders)):
        prefix = f"{name}."
        te_sd = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not te_sd:
            raise ValueError(f"checkpoint has no {name} LoRA but --train_text_encoder is set")
        te_sd = text_encoder_keys_for(encoder, convert_state_dict_to_peft(convert_state_dict_to_diffusers(te_sd)))
        result = set_peft_model_state_dict(encoder, te_sd, adapter_name="default")
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise ValueError(f"checkpoint has {name} LoRA tensors the model does not: {unexpected[:3]}")


__all__ = ["LYCORIS_WEIGHT_NAME", "load_lora_checkpoint", "register_lora_checkpoint_hooks"]
