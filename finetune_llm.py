#!/usr/bin/env python
"""LoRA fine-tuning of a Hugging Face model on GLUE or GSM8K with any optimizer of adaprelora.

    python finetune_llm.py --task glue:sst2 --model_name_or_path roberta-base --output_dir out/sst2
    python finetune_llm.py --task gsm8k --model_name_or_path HuggingFaceTB/SmolLM2-135M \\
        --optimizer adaprelora --max_steps 500 --bf16 --output_dir out/gsm8k
    accelerate launch finetune_llm.py ...        # several GPUs

Offline: --train_file/--validation_file (JSONL or CSV with the task's columns) replace the Hub data.
The logic lives in adaprelora/training/llm/.
"""
from __future__ import annotations

import argparse
import logging

from adaprelora.training.errors import run_cli
from adaprelora.training.llm import LR_SCHEDULERS, TASK_NAMES, FinetuneConfig, finetune
from adaprelora.training.options import parse_optimizer_args


def parse_args(input_args=None) -> FinetuneConfig:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = FinetuneConfig  # defaults live on the config dataclass
    p.add_argument("--task", type=str, required=True, help=f"One of: {', '.join(TASK_NAMES)}.")
    p.add_argument("--model_name_or_path", type=str, required=True, help="Hub id or local folder of the base model.")
    p.add_argument("--output_dir", type=str, required=True, help="Adapter, metrics.json, loss log, checkpoints.")
    p.add_argument("--train_file", type=str, default=None, help="Local JSONL/CSV training data (offline).")
    p.add_argument("--validation_file", type=str, default=None, help="Local JSONL/CSV evaluation data.")
    p.add_argument("--validation_mismatched_file", type=str, default=None,
                   help="MNLI only: the mismatched evaluation file (reported as accuracy_mm).")
    p.add_argument("--optimizer", type=str, default=d.optimizer, help="Optimizer name (default: %(default)s).")
    p.add_argument("--optimizer_args", type=str, nargs="*", default=[], metavar="KEY=VALUE",
                   help="Extra optimizer arguments, e.g. weight_decay=0.01 betas=(0.9,0.99).")
    p.add_argument("--lora_r", type=int, default=d.lora_r, help="LoRA rank (default: %(default)s).")
    p.add_argument("--lora_alpha", type=float, default=d.lora_alpha, help="LoRA alpha (default: %(default)s).")
    p.add_argument("--lora_dropout", type=float, default=d.lora_dropout, help="LoRA dropout (default: %(default)s).")
    p.add_argument("--target_modules", type=str, nargs="+", default=None,
                   help="Modules to adapt (default: PEFT's choice for the architecture; 'all-linear' works).")
    p.add_argument("--learning_rate", type=float, default=d.learning_rate, help="Peak learning rate (default: %(default)s).")
    p.add_argument("--lr_scheduler", type=str, default=d.lr_scheduler, choices=LR_SCHEDULERS,
                   help="Learning-rate schedule (default: %(default)s).")
    p.add_argument("--warmup_ratio", type=float, default=d.warmup_ratio, help="Warmup fraction of the steps.")
    p.add_argument("--max_steps", type=int, default=d.max_steps, help="Optimizer steps; > 0 overrides epochs.")
    p.add_argument("--num_train_epochs", type=float, default=d.num_train_epochs, help="Epochs (default: %(default)s).")
    p.add_argument("--per_device_train_batch_size", type=int, default=d.per_device_train_batch_size,
                   help="Batch size per device (default: %(default)s).")
    p.add_argument("--per_device_eval_batch_size", type=int, default=None, help="Default: the training batch size.")
    p.add_argument("--gradient_accumulation_steps", type=int, default=d.gradient_accumulation_steps,
                   help="Micro-batches per optimizer step (default: %(default)s).")
    p.add_argument("--max_grad_norm", type=float, default=None, help="Clip the gradient norm (default: off).")
    p.add_argument("--max_seq_length", type=int, default=d.max_seq_length, help="Token limit per example.")
    p.add_argument("--max_new_tokens", type=int, default=d.max_new_tokens, help="GSM8K: tokens generated per answer.")
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true", help="bf16 mixed precision.")
    precision.add_argument("--fp16", action="store_true", help="fp16 mixed precision (GPU).")
    p.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for activation memory.")
    p.add_argument("--seed", type=int, default=d.seed, help="Random seed (default: %(default)s).")
    p.add_argument("--max_train_samples", type=int, default=None, help="Use only the first N training examples.")
    p.add_argument("--max_eval_samples", type=int, default=None, help="Evaluate on the first N examples.")
    p.add_argument("--checkpointing_steps", type=int, default=None, help="Save a checkpoint every N steps.")
    p.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most N checkpoints.")
    p.add_argument("--resume_from_checkpoint", type=str, default=None,
                   help="'latest', a checkpoint-<step> name in --output_dir, or a path.")
    p.add_argument("--cpu", action="store_true", help="Train on CPU even when a GPU is present.")
    p.add_argument("--gguf_file", type=str, default=None,
                   help="Load this GGUF file inside --model_name_or_path (dequantized to fp32).")
    args = p.parse_args(input_args)

    if args.bf16:
        mixed_precision = "bf16"
    elif args.fp16:
        mixed_precision = "fp16"
    else:
        mixed_precision = None  # `accelerate launch --mixed_precision` may still set it
    fields = {k: v for k, v in vars(args).items() if k not in ("bf16", "fp16", "optimizer_args")}
    return FinetuneConfig(**fields, mixed_precision=mixed_precision,
                          optimizer_args=parse_optimizer_args(args.optimizer_args))


def main(input_args=None) -> dict:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    config = parse_args(input_args)
    config.validate()  # flag errors before any model or data is loaded
    return finetune(config)


if __name__ == "__main__":
    run_cli(main)
