"""`FinetuneConfig`: every setting of an LLM fine-tuning run, named after `finetune_llm.py`'s flags
(which take their defaults from these fields)."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import Optional

from ..checkpoints import check_output_dir
from ..errors import UserError, check_number_fields, check_seed
from ..options import check_lr_scheduler, check_optimizer_args, config_from_namespace
from .tasks import TaskSpec, get_task


@dataclass
class FinetuneConfig:
    """Every setting of a run; field names are the CLI flags of `finetune_llm.py`."""

    task: str
    model_name_or_path: str
    output_dir: str
    train_file: Optional[str] = None
    validation_file: Optional[str] = None
    validation_mismatched_file: Optional[str] = None  # MNLI only
    # AdamW: AdaPreLoRA lost to it on the LLM suites (E2E, MiniLM; docs/results.md); --optimizer adaprelora
    optimizer: str = "adamw"
    optimizer_args: dict = field(default_factory=dict)
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    target_modules: Optional[list[str]] = None  # None: PEFT's default for the architecture
    learning_rate: float = 2e-4
    lr_scheduler: str = "linear"
    warmup_ratio: float = 0.0
    max_steps: int = -1  # > 0 overrides num_train_epochs
    num_train_epochs: float = 3.0
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: Optional[int] = None  # None: same as training
    gradient_accumulation_steps: int = 1
    max_grad_norm: Optional[float] = None  # None or 0: no clipping
    max_seq_length: int = 256
    max_new_tokens: int = 256
    mixed_precision: Optional[str] = None  # "no", "bf16", "fp16"; None: accelerate's config
    gradient_checkpointing: bool = False
    seed: int = 42
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    checkpointing_steps: Optional[int] = None
    checkpoints_total_limit: Optional[int] = None
    eval_steps: Optional[int] = None  # the held-out loss every N steps (and at the start and the end)
    resume_from_checkpoint: Optional[str] = None  # "latest", a checkpoint name or a path
    cpu: bool = False
    gguf_file: Optional[str] = None  # a GGUF checkpoint inside model_name_or_path (dequantized to fp32)

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> "FinetuneConfig":
        """Build a config from the parsed flags; an attribute with no field raises `TypeError`."""
        return config_from_namespace(cls, args)

    def validate(self) -> TaskSpec:
        """Check cross-field rules (errors name the flags) and return the task."""
        spec = get_task(self.task)
        check_number_fields(self)
        check_seed(self.seed)
        check_output_dir(self.output_dir)
        if self.eval_steps is not None and self.eval_steps < 1:
            raise UserError(f"--eval_steps must be at least 1, got {self.eval_steps}")
        if (self.train_file is None) != (self.validation_file is None):
            raise UserError("--train_file and --validation_file must be given together")
        if self.validation_mismatched_file and spec.name != "glue:mnli":
            raise UserError("--validation_mismatched_file only applies to --task glue:mnli")
        for flag in ("train_file", "validation_file", "validation_mismatched_file"):
            path = getattr(self, flag)
            if path and not os.path.isfile(path):
                raise UserError(f"--{flag}: no such file {path!r}")
        check_optimizer_args(self.optimizer, self.optimizer_args)
        positive = {
            "lora_r": self.lora_r,
            "per_device_train_batch_size": self.per_device_train_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "max_seq_length": self.max_seq_length,
            "learning_rate": self.learning_rate,
        }
        for flag, value in positive.items():
            if not value > 0:
                raise UserError(f"--{flag} must be positive, got {value}")
        if self.max_steps <= 0 and not self.num_train_epochs > 0:
            raise UserError("give --max_steps > 0 or --num_train_epochs > 0")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise UserError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UserError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        check_lr_scheduler(self.lr_scheduler)
        if self.mixed_precision not in (None, "no", "bf16", "fp16"):
            raise UserError(f"mixed precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        if spec.family == "gsm8k" and self.max_new_tokens <= 0:
            raise UserError(f"--max_new_tokens must be positive, got {self.max_new_tokens}")
        for flag in ("per_device_eval_batch_size", "max_train_samples", "max_eval_samples", "checkpoints_total_limit"):
            value = getattr(self, flag)
            if value is not None and value < 1:
                raise UserError(f"--{flag} must be at least 1, got {value}")
        if not self.lora_alpha > 0:
            raise UserError(f"--lora_alpha must be positive, got {self.lora_alpha}")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise UserError(f"--max_grad_norm must be 0 (off) or more, got {self.max_grad_norm}")
        if self.checkpointing_steps is not None and self.checkpointing_steps <= 0:
            raise UserError(f"--checkpointing_steps must be positive, got {self.checkpointing_steps}")
        return spec


__all__ = ["FinetuneConfig"]
