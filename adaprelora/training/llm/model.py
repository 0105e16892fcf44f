"""The model of an LLM run: tokenizer, base model with a LoRA adapter, and its trained tensors."""
from __future__ import annotations

from typing import Optional

import torch

from ..checkpoints import lora_ranks, rank_mismatch_message
from ..errors import UserError, first_line
from .config import FinetuneConfig
from .tasks import TaskSpec

TRAINABLE_WEIGHTS_NAME = "trainable_weights.safetensors"


def _gguf_kwargs(gguf_file: Optional[str]) -> dict:
    return {"gguf_file": gguf_file} if gguf_file else {}


def load_tokenizer(path: str, gguf_file: Optional[str] = None):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **_gguf_kwargs(gguf_file))
    except Exception as err:
        raise UserError(f"--model_name_or_path: could not load a tokenizer from {path!r}: {first_line(err)}") from None
    if len(tokenizer) < 2:
        raise UserError(f"--model_name_or_path: the tokenizer loaded from {path!r} is empty")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"the tokenizer of {path!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_lora_model(config: FinetuneConfig, spec: TaskSpec, tokenizer, path: Optional[str] = None,
                     gguf_file: Optional[str] = None):
    """The base model for the task with a fresh LoRA adapter (GLUE: the head is trained in full).

    `path` and `gguf_file` (default: the config's) say where the weights are when that differs from
    `--model_name_or_path`, as for the built-in model (`sources.resolve_model`)."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if path is None:
        path, gguf_file = config.model_name_or_path, config.gguf_file
    try:
        if spec.family == "glue":
            model = AutoModelForSequenceClassification.from_pretrained(
                path,
                num_labels=spec.num_labels,
                problem_type="regression" if spec.is_regression else "single_label_classification",
                **_gguf_kwargs(gguf_file),
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **_gguf_kwargs(gguf_file))
    except (OSError, ValueError) as err:
        raise UserError(f"--model_name_or_path: could not load {config.model_name_or_path!r}: {first_line(err)}") from None
    if model.config.pad_token_id is None:  # decoder classifiers find the last token through it
        model.config.pad_token_id = tokenizer.pad_token_id
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS if spec.family == "glue" else TaskType.CAUSAL_LM,
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.target_modules,
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as err:
        raise UserError(f"--target_modules: {first_line(err)}") from None


def trainable_state_dict(model) -> dict:
    """The tensors being trained (LoRA factors, and the classifier head for GLUE), on CPU."""
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state_dict(model, state: dict) -> None:
    params = dict(model.named_parameters())
    missing = [name for name, p in params.items() if p.requires_grad and name not in state]
    unknown = [name for name in state if name not in params]
    if missing or unknown:
        raise UserError(
            f"checkpoint does not match the model ({len(missing)} trainable tensors missing, "
            f"{len(unknown)} unknown, e.g. {(missing + unknown)[0]!r}): same --model_name_or_path, "
            "--task and LoRA flags as the run that wrote it?"
        )
    for name, value in state.items():
        if tuple(value.shape) != tuple(params[name].shape):
            ranks = lora_ranks(name, value.shape, params[name].shape)
            if ranks is not None:
                raise UserError(rank_mismatch_message("the checkpoint", *ranks, "--lora_r"))
            raise UserError(f"checkpoint does not match the model: {name!r} has shape {tuple(value.shape)} there and "
                            f"{tuple(params[name].shape)} here: same --model_name_or_path, --task and LoRA flags as "
                            "the run that wrote it?")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def save_trainable_weights(models: list, output_dir: str) -> None:
    """Checkpoint hook: the trained tensors of each model (LoRA factors, GLUE's head)."""
    import os

    from safetensors.torch import save_file

    for model in models:
        save_file(trainable_state_dict(model), os.path.join(output_dir, TRAINABLE_WEIGHTS_NAME))


def load_trainable_weights(models: list, input_dir: str) -> None:
    import os

    from safetensors.torch import load_file

    for model in models:
        load_trainable_state_dict(model, load_file(os.path.join(input_dir, TRAINABLE_WEIGHTS_NAME)))


__all__ = ["TRAINABLE_WEIGHTS_NAME", "build_lora_model", "load_tokenizer", "load_trainable_state_dict",
           "load_trainable_weights", "save_trainable_weights", "trainable_state_dict"]
