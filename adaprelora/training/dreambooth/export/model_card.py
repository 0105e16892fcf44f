"""The model card (`README.md`) written beside the LoRA files: what it is, how to load it, its samples."""
from __future__ import annotations

import json
import os
from typing import Optional

from ..family import ModelFamily, detect_family


def _layers(config) -> str:
    """", layers attn-ff, conv rank 4 (alpha 1), DoRA" (empty for the default attention LoRA)."""
    parts = [] if getattr(config, "lora_layers", "attn") == "attn" else [f"layers {config.lora_layers}"]
    if getattr(config, "conv_rank", None) is not None:
        parts.append(f"conv rank {config.conv_rank} (alpha {config.effective_conv_alpha:g})")
    if getattr(config, "use_dora", False):
        parts.append("DoRA")
    return "".join(f", {p}" for p in parts)


def write_model_card(
    output_dir: str,
    config,
    files: dict[str, str],
    samples: Optional[list[str]] = None,
    steps: Optional[int] = None,
    family: Optional[ModelFamily] = None,
) -> str:
    """Write `README.md` (Hugging Face model card: YAML header, trigger prompt, samples, usage);
    `family` (found from the base model when not given) names the pipeline class to load with."""
    samples = samples or []
    base = config.pretrained_model_name_or_path
    family = family or detect_family(str(base), config.revision)
    pipeline_name = family.pipeline_class_name
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
        f"LoRA adapter (rank {config.rank}, alpha {config.effective_lora_alpha:g}{_layers(config)}) for `{base}`, "
        "trained with "
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
        *([f"- `{os.path.basename(files['diffusers'])}`: diffusers format"] if files.get("diffusers") else []),
        f"- `{os.path.basename(files['kohya'])}`: kohya / AUTOMATIC1111 / ComfyUI format",
        "",
        *(["## Use with diffusers",
           "",
           "```python",
           f"from diffusers import {pipeline_name}",
           "",
           f"pipe = {pipeline_name}.from_pretrained({str(base)!r})",
           "pipe.load_lora_weights('path/to/this/folder')",
           f"image = pipe({trigger or 'your prompt'!r}).images[0]",
           "```",
           ""] if files.get("diffusers") else
          [f"A LyCORIS network ({files['note']}).", ""] if files.get("note") else []),
        "In AUTOMATIC1111 or ComfyUI, copy the kohya file into the LoRA folder.",
        "",
        "## Training settings",
        "",
        f"- text encoder trained: {config.train_text_encoder}",
        f"- prior preservation: {config.with_prior_preservation}"
        + (f" ({'the is_reg subsets of --dataset_config' if config.dataset_config else 'class prompt `%s`' % config.class_prompt}"
           f", weight {config.prior_loss_weight}, "
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


__all__ = ["write_model_card"]
