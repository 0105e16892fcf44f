"""kohya's names for an SDXL LoRA: Stability's (SGM) UNet block names and two text encoders.

kohya-ss/sd-scripts writes SDXL UNet LoRA keys with the block layout of Stability's original code
(`input_blocks.<n>.1`, `middle_block.1`, `output_blocks.<n>.1`) rather than diffusers'
(`down_blocks.<i>.attentions.<j>`...), and the text encoders as `lora_te1_` (CLIP ViT-L) and
`lora_te2_` (OpenCLIP ViT-bigG). AUTOMATIC1111, ComfyUI and Forge expect these names, and
diffusers' `load_lora_weights` maps them back. In SGM numbering each down level holds
`layers_per_block` layers plus a downsampler, each up level `layers_per_block + 1` layers, and
`input_blocks.0` is the input convolution.
"""
from __future__ import annotations

import re
from typing import Optional

KOHYA_SDXL_TE1_PREFIX = "lora_te1_"
KOHYA_SDXL_TE2_PREFIX = "lora_te2_"

_DOWN = re.compile(r"^down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)$")
_MID = re.compile(r"^mid_block\.attentions\.0\.(.*)$")
_UP = re.compile(r"^up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)$")


def sgm_unet_module_name(module: str, layers_per_block: int) -> Optional[str]:
    """The SGM name of a diffusers SDXL UNet attention module (where LoRA goes), or None for a
    module outside the attention blocks."""
    if m := _DOWN.match(module):
        block, layer, rest = int(m[1]), int(m[2]), m[3]
        return f"input_blocks.{block * (layers_per_block + 1) + layer + 1}.1.{rest}"
    if m := _MID.match(module):
        return f"middle_block.1.{m[1]}"
    if m := _UP.match(module):
        block, layer, rest = int(m[1]), int(m[2]), m[3]
        return f"output_blocks.{block * (layers_per_block + 1) + layer}.1.{rest}"
    return None


def sgm_renamer(layers_per_block: int):
    """`sgm_unet_module_name` for one UNet, raising for a module it cannot name."""
    def rename(module: str) -> str:
        name = sgm_unet_module_name(module, layers_per_block)
        if name is None:
            raise ValueError(f"no kohya SDXL name for UNet module {module!r} (LoRA is only on attention blocks)")
        return name

    return rename


__all__ = ["KOHYA_SDXL_TE1_PREFIX", "KOHYA_SDXL_TE2_PREFIX", "sgm_renamer", "sgm_unet_module_name"]
