"""Writing trained LoRA adapters: the diffusers file, the kohya/A1111 file, their headers, the model card.

One module per job: `keys` (PEFT, diffusers and kohya tensor names), `writers` (the two files,
written atomically, and reading a kohya file back), `header` (the training settings in both files'
safetensors headers) and `model_card` (`README.md`).
"""
from ..models import TEXT_ENCODER_TARGET_MODULES, UNET_TARGET_MODULES  # the default (attn) targets
from .header import training_metadata
from .keys import (
    diffusers_lora_layers,
    kohya_to_peft,
    peft_state_dict,
    peft_to_kohya,
    text_encoder_keys_for,
)
from .model_card import write_model_card
from .writers import (
    DIFFUSERS_WEIGHT_NAME,
    load_kohya_lora,
    remove_stale_temporary_exports,
    save_diffusers_lora,
    save_kohya_lora,
)

__all__ = [
    "DIFFUSERS_WEIGHT_NAME", "TEXT_ENCODER_TARGET_MODULES", "UNET_TARGET_MODULES", "diffusers_lora_layers",
    "kohya_to_peft", "load_kohya_lora", "peft_state_dict", "peft_to_kohya", "remove_stale_temporary_exports",
    "save_diffusers_lora", "save_kohya_lora", "text_encoder_keys_for", "training_metadata", "write_model_card",
]
