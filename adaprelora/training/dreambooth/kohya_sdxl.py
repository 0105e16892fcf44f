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
# LoCon and all-linear reach the ResNets, the samplers and the embeddings (kohya's SGM names)
_DOWN_RES = re.compile(r"^down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)$")
_MID_RES = re.compile(r"^mid_block\.resnets\.(\d+)\.(\w+)$")
_UP_RES = re.compile(r"^up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)$")
_DOWNSAMPLER = re.compile(r"^down_blocks\.(\d+)\.downsamplers\.0\.conv$")
_UPSAMPLER = re.compile(r"^up_blocks\.(\d+)\.upsamplers\.0\.conv$")
_RESNET_PARTS = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                 "conv_shortcut": "skip_connection"}
_EMBEDDINGS = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def sgm_unet_module_name(module: str, layers_per_block: int) -> Optional[str]:
    """The SGM name of a diffusers SDXL UNet module LoRA can adapt (attention blocks; ResNets,
    samplers and embeddings for LoCon and all-linear), or None for any other module. An up level's
    upsampler is `output_blocks.<n>.2.conv`, after its attention block, as in SDXL (whose up
    levels with an upsampler all have attention)."""
    per_level = layers_per_block + 1
    if module in _EMBEDDINGS:
        return _EMBEDDINGS[module]
    if (m := _DOWN_RES.match(module)) and m[3] in _RESNET_PARTS:
        return f"input_blocks.{int(m[1]) * per_level + int(m[2]) + 1}.0.{_RESNET_PARTS[m[3]]}"
    if (m := _MID_RES.match(module)) and m[2] in _RESNET_PARTS:
        return f"middle_block.{2 * int(m[1])}.{_RESNET_PARTS[m[2]]}"
    if (m := _UP_RES.match(module)) and m[3] in _RESNET_PARTS:
        return f"output_blocks.{int(m[1]) * per_level + int(m[2])}.0.{_RESNET_PARTS[m[3]]}"
    if m := _DOWNSAMPLER.match(module):
        return f"input_blocks.{(int(m[1]) + 1) * per_level}.0.op"
    if m := _UPSAMPLER.match(module):
        return f"output_blocks.{int(m[1]) * per_level + layers_per_block}.2.conv"
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
            raise ValueError(f"no kohya SDXL name for UNet module {module!r}")
        return name

    return rename


__all__ = ["KOHYA_SDXL_TE1_PREFIX", "KOHYA_SDXL_TE2_PREFIX", "sgm_renamer", "sgm_unet_module_name"]
