"""LoRA fine-tuning of Hugging Face language models on GLUE and GSM8K with any optimizer of the library.

`finetune(FinetuneConfig(...))` is the whole run: data (Hub or local JSONL/CSV), model + LoRA
adapter, `create_optimizer`, an accelerate training loop (gradient accumulation, mixed precision,
several processes under `accelerate launch`), checkpoints with resume, evaluation with each task's
standard metric, and the outputs in `output_dir`:

    adapter_config.json, adapter_model.safetensors   the PEFT adapter (GLUE: with the classifier head)
    metrics.json        final eval metrics (names as the `evaluate` GLUE metric reports them; GSM8K:
                        `accuracy`), train loss, steps, wall time, peak memory
    loss_log.jsonl      one line per optimizer step: step, loss, lr, epoch
    checkpoint-<step>/  optimizer, scheduler, RNG and trainable weights (`--checkpointing_steps`)
    eval_predictions.jsonl  GSM8K only: each generated answer and its extracted number

Here live the run itself, its configuration, the model with its adapter and the checkpoints; the
parts it orchestrates have their own modules: `llm_tasks` (which tasks, what their data must hold),
`llm_data` (loading, tokenization, batching) and `llm_eval` (metrics of the trained model).
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from .. import available_optimizers, create_optimizer
from .common import (
    UserError,
    attach_grad_scaler,
    peak_memory_bytes,
    resolve_resume_checkpoint,
    rotate_checkpoints,
    save_checkpoint_atomically,
    stopwatch,
)

# Also re-exported: `from adaprelora.training.llm import ...` stays the way in for scripts and tests.
from .llm_data import (  # noqa: F401
    GSM8K_PROMPT,
    IGNORE_INDEX,
    CausalLMCollator,
    build_causal_lm_example,
    format_gsm8k_prompt,
    load_task_splits,
    tokenize_glue,
    tokenize_gsm8k_eval,
    tokenize_gsm8k_train,
)
from .llm_eval import evaluate_glue, evaluate_gsm8k, generate_answers  # noqa: F401
from .llm_tasks import EVAL_SUFFIXES, TASK_NAMES, TaskSpec, check_columns, check_labels, get_task  # noqa: F401

logger = logging.getLogger(__name__)

TRAINABLE_WEIGHTS_NAME = "trainable_weights.safetensors"
LOSS_LOG_NAME = "loss_log.jsonl"
METRICS_NAME = "metrics.json"
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass
class FinetuneConfig:
    """Every setting of a run; field names are the CLI flags of `finetune_llm.py`."""

    task: str
    model_name_or_path: str
    output_dir: str
    train_file: Optional[str] = None
    validation_file: Optional[str] = None
    validation_mismatched_file: Optional[str] = None  # MNLI only
    optimizer: str = "adaprelora"
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
    resume_from_checkpoint: Optional[str] = None  # "latest", a checkpoint name or a path
    cpu: bool = False
    gguf_file: Optional[str] = None  # a GGUF checkpoint inside model_name_or_path (dequantized to fp32)

    def validate(self) -> TaskSpec:
        """Check cross-field rules (errors name the flags) and return the task."""
        spec = get_task(self.task)
        if (self.train_file is None) != (self.validation_file is None):
            raise UserError("--train_file and --validation_file must be given together")
        if self.validation_mismatched_file and spec.name != "glue:mnli":
            raise UserError("--validation_mismatched_file only applies to --task glue:mnli")
        for flag in ("train_file", "validation_file", "validation_mismatched_file"):
            path = getattr(self, flag)
            if path and not os.path.isfile(path):
                raise UserError(f"--{flag}: no such file {path!r}")
        names = available_optimizers()
        if str(self.optimizer).strip().lower().replace("_", "-") not in names:
            raise UserError(f"--optimizer: unknown optimizer {self.optimizer!r}; choose from {', '.join(names)}")
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
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise UserError(f"--lr_scheduler: unknown {self.lr_scheduler!r}; choose from {', '.join(LR_SCHEDULERS)}")
        if self.mixed_precision not in (None, "no", "bf16", "fp16"):
            raise UserError(f"mixed precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        if spec.family == "gsm8k" and self.max_new_tokens <= 0:
            raise UserError(f"--max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.checkpointing_steps is not None and self.checkpointing_steps <= 0:
            raise UserError(f"--checkpointing_steps must be positive, got {self.checkpointing_steps}")
        return spec


# ---------------------------------------------------------------------------------------------
# Model


def _gguf_kwargs(gguf_file: Optional[str]) -> dict:
    return {"gguf_file": gguf_file} if gguf_file else {}


def load_tokenizer(path: str, gguf_file: Optional[str] = None):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **_gguf_kwargs(gguf_file))
    except Exception as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"--model_name_or_path: could not load a tokenizer from {path!r}: {first}") from None
    if len(tokenizer) < 2:
        raise UserError(f"--model_name_or_path: the tokenizer loaded from {path!r} is empty")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"the tokenizer of {path!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_lora_model(config: FinetuneConfig, spec: TaskSpec, tokenizer):
    """The base model for the task with a fresh LoRA adapter (GLUE: the head is trained in full)."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    try:
        if spec.family == "glue":
            model = AutoModelForSequenceClassification.from_pretrained(
                config.model_name_or_path,
                num_labels=spec.num_labels,
                problem_type="regression" if spec.is_regression else "single_label_classification",
                **_gguf_kwargs(config.gguf_file),
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(config.model_name_or_path, **_gguf_kwargs(config.gguf_file))
    except (OSError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"--model_name_or_path: could not load {config.model_name_or_path!r}: {first}") from None
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
        raise UserError(f"--target_modules: {str(err).splitlines()[0]}") from None


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
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


# ---------------------------------------------------------------------------------------------
# Training


def _json_safe(value):
    """NaN (an undefined correlation) -> null, so metrics.json stays standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


def _read_loss_log(path: str, up_to_step: Optional[int] = None) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return [row for row in rows if up_to_step is None or row["step"] <= up_to_step]


def _make_accelerator(config: FinetuneConfig):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    try:
        return Accelerator(
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
            cpu=config.cpu,
        )
    except ValueError as err:  # e.g. fp16 without a GPU
        raise UserError(f"mixed precision {config.mixed_precision!r}: {str(err).splitlines()[0]}") from None


def _register_checkpoint_hooks(accelerator) -> None:
    """Checkpoints hold only the trained tensors, not the frozen base model."""
    from safetensors.torch import load_file, save_file

    def save_hook(models, weights, output_dir):
        for model in models:
            save_file(trainable_state_dict(accelerator.unwrap_model(model)),
                      os.path.join(output_dir, TRAINABLE_WEIGHTS_NAME))
        weights.clear()

    def load_hook(models, input_dir):
        while models:
            model = accelerator.unwrap_model(models.pop())
            load_trainable_state_dict(model, load_file(os.path.join(input_dir, TRAINABLE_WEIGHTS_NAME)))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def finetune(config: FinetuneConfig) -> dict:
    """Run one fine-tuning job end to end; returns what it writes to `output_dir/metrics.json`."""
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm
    from transformers import DataCollatorWithPadding, get_scheduler

    spec = config.validate()
    accelerator = _make_accelerator(config)
    set_seed(config.seed)
    os.makedirs(config.output_dir, exist_ok=True)
    resume = resolve_resume_checkpoint(config.output_dir, config.resume_from_checkpoint)

    # Data and tokenizer
    with accelerator.main_process_first():
        splits = load_task_splits(config, spec)
        tokenizer = load_tokenizer(config.model_name_or_path, config.gguf_file)
        if spec.family == "glue":
            train_data = tokenize_glue(splits[spec.train_split], tokenizer, spec, config.max_seq_length)
            eval_data = {s: tokenize_glue(splits[s], tokenizer, spec, config.max_seq_length)
                         for s in spec.eval_splits if s in splits}
        else:
            train_data = tokenize_gsm8k_train(splits[spec.train_split], tokenizer, config.max_seq_length)
            eval_data = {s: tokenize_gsm8k_eval(splits[s], tokenizer, config.max_seq_length)
                         for s in spec.eval_splits if s in splits}

    # Model, LoRA adapter and optimizer (created on the model that runs: AdaPreLoRA hooks into it)
    model = build_lora_model(config, spec, tokenizer)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    try:
        optimizer = create_optimizer(config.optimizer, model, lr=config.learning_rate, **config.optimizer_args)
    except ValueError as err:
        raise UserError(f"--optimizer {config.optimizer}: {err}") from None

    # DataLoaders and schedule
    eval_batch = config.per_device_eval_batch_size or config.per_device_train_batch_size
    if spec.family == "glue":
        train_collate = eval_collate = DataCollatorWithPadding(tokenizer)
    else:
        train_collate = CausalLMCollator(tokenizer.pad_token_id)
        eval_collate = CausalLMCollator(tokenizer.pad_token_id, left=True)
    # Its own generator: starting an epoch then draws no number from the global RNG, so a resumed
    # run's dropout masks match those of the run it continues.
    train_loader = DataLoader(train_data.with_format(None), batch_size=config.per_device_train_batch_size,
                              shuffle=True, collate_fn=train_collate,
                              generator=torch.Generator().manual_seed(config.seed))
    eval_loaders = {s: DataLoader(d.with_format(None), batch_size=eval_batch, collate_fn=eval_collate)
                    for s, d in eval_data.items()}
    steps_per_epoch = math.ceil(
        math.ceil(len(train_loader) / accelerator.num_processes) / config.gradient_accumulation_steps)
    max_steps = config.max_steps if config.max_steps > 0 else math.ceil(config.num_train_epochs * steps_per_epoch)
    scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        # accelerate steps a prepared scheduler once per process at each optimizer step
        num_warmup_steps=math.ceil(config.warmup_ratio * max_steps) * accelerator.num_processes,
        num_training_steps=max_steps * accelerator.num_processes,
    )

    # Prepare everything with our `accelerator`
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    eval_loaders = {s: accelerator.prepare(loader) for s, loader in eval_loaders.items()}
    if accelerator.mixed_precision == "fp16":
        attach_grad_scaler(optimizer, accelerator.scaler)
    _register_checkpoint_hooks(accelerator)

    global_step = 0
    loss_log_path = os.path.join(config.output_dir, LOSS_LOG_NAME)
    if resume is not None:
        global_step, path = resume
        accelerator.print(f"resuming from {path} (step {global_step})")
        accelerator.load_state(path)
    if accelerator.is_main_process:  # drop the log lines of steps a resumed run redoes
        kept = _read_loss_log(loss_log_path, up_to_step=global_step) if resume else []
        with open(loss_log_path, "w") as fh:
            fh.writelines(json.dumps(row) + "\n" for row in kept)

    # Training loop
    total_batch = config.per_device_train_batch_size * accelerator.num_processes * config.gradient_accumulation_steps
    accelerator.print(
        f"{spec.name}: {len(train_data)} training examples, {max_steps} steps of {total_batch} examples, "
        f"optimizer {config.optimizer}, {n_trainable:,} trainable of {n_total:,} parameters"
    )
    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    progress = tqdm(total=max_steps, initial=global_step, desc="training",
                    disable=not accelerator.is_local_main_process)
    first_epoch = global_step // steps_per_epoch
    skip_batches = (global_step % steps_per_epoch) * config.gradient_accumulation_steps
    num_epochs = math.ceil(max_steps / steps_per_epoch)
    model.train()
    micro_losses = []
    with stopwatch() as elapsed:
        for epoch in range(first_epoch, num_epochs):
            if global_step >= max_steps:
                break
            train_loader.set_epoch(epoch)  # the same shuffle for an epoch, resumed or not
            for i, batch in enumerate(train_loader):
                if epoch == first_epoch and i < skip_batches:
                    continue
                with accelerator.accumulate(model):
                    loss = model(**batch).loss
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and config.max_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                micro_losses.append(loss.detach().float())
                if not accelerator.sync_gradients:
                    continue
                global_step += 1
                step_loss = accelerator.reduce(torch.stack(micro_losses).mean(), reduction="mean").item()
                micro_losses = []
                lr = scheduler.get_last_lr()[0]
                if accelerator.is_main_process:
                    with open(loss_log_path, "a") as fh:
                        fh.write(json.dumps({"step": global_step, "loss": step_loss, "lr": lr,
                                             "epoch": round(global_step / steps_per_epoch, 4)}) + "\n")
                progress.update(1)
                progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
                if config.checkpointing_steps and global_step % config.checkpointing_steps == 0:
                    _save_checkpoint(accelerator, config, global_step)
                if global_step >= max_steps:
                    break
        train_seconds = elapsed()
    progress.close()

    # Evaluation
    results: dict = {}
    eval_counts: dict = {}
    for split, loader in eval_loaders.items():
        suffix = EVAL_SUFFIXES.get(split, "")
        if spec.family == "glue":
            scores = evaluate_glue(model, loader, accelerator, spec)
        else:
            scores, rows = evaluate_gsm8k(model, loader, accelerator, tokenizer, eval_data[split],
                                          config.max_new_tokens)
            if accelerator.is_main_process:
                with open(os.path.join(config.output_dir, "eval_predictions.jsonl"), "w") as fh:
                    fh.writelines(json.dumps(row) + "\n" for row in rows)
        results.update({f"{name}{suffix}": value for name, value in scores.items()})
        eval_counts[f"eval_samples{suffix}"] = len(eval_data[split])

    # Outputs: adapter, metrics
    accelerator.wait_for_everyone()
    log = _read_loss_log(loss_log_path) if accelerator.is_main_process else []
    summary = {
        "task": spec.name,
        "model_name_or_path": config.model_name_or_path,
        "optimizer": config.optimizer,
        "optimizer_args": config.optimizer_args,
        **results,
        **eval_counts,
        "train_loss": sum(row["loss"] for row in log) / len(log) if log else None,
        "last_train_loss": log[-1]["loss"] if log else None,
        "global_step": global_step,
        "train_samples": len(train_data),
        "train_runtime_s": round(train_seconds, 3),
        "peak_memory_bytes": peak_memory_bytes(accelerator.device),
        "trainable_params": n_trainable,
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "seed": config.seed,
    }
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(config.output_dir)
        tokenizer.save_pretrained(config.output_dir)
        with open(os.path.join(config.output_dir, METRICS_NAME), "w") as fh:
            json.dump(_json_safe(summary), fh, indent=2)
        with open(os.path.join(config.output_dir, "finetune_config.json"), "w") as fh:
            json.dump(asdict(config), fh, indent=2)
        accelerator.print(json.dumps(_json_safe({k: summary[k] for k in results}), indent=None))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    _release_accelerator_state(accelerator)
    return summary


def _release_accelerator_state(accelerator) -> None:
    """Let a later `finetune` call in this process choose another precision or accumulation.

    accelerate keeps one process-wide state and refuses a second `Accelerator(mixed_precision=...)`
    that differs; a benchmark runs several configurations in one process. Only the single-process
    case is reset: a distributed launch runs one job per process anyway.
    """
    if accelerator.num_processes != 1:
        return
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def _save_checkpoint(accelerator, config: FinetuneConfig, step: int) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        rotate_checkpoints(config.output_dir, config.checkpoints_total_limit)
        save_checkpoint_atomically(accelerator.save_state, config.output_dir, step)
    accelerator.wait_for_everyone()
