"""LoRA fine-tuning of Hugging Face language models on GLUE and GSM8K, as a generator of events.

`train(config, stop_event)` is the whole run: data (Hub or local JSONL/CSV), model + LoRA adapter,
`create_optimizer`, the shared accelerate loop (gradient accumulation, mixed precision, several
processes under `accelerate launch`), checkpoints with resume, evaluation with each task's standard
metric, and the outputs in `output_dir`:

    adapter_config.json, adapter_model.safetensors   the PEFT adapter (GLUE: with the classifier head)
    metrics.json        final eval metrics (names as the `evaluate` GLUE metric reports them; GSM8K:
                        `accuracy`), train loss, steps, wall time, peak memory
    loss_log.jsonl      one line per optimizer step: step, loss, lr, epoch
    checkpoint-<step>/  optimizer, scheduler, RNG and trainable weights (`--checkpointing_steps`)
    eval_predictions.jsonl  GSM8K only: each generated answer and its extracted number

It yields `TrainEvent`s like the DreamBooth trainer: messages during setup, one event per
optimizer step, and a last one with `done=True`, the eval `metrics` and the `summary` written to
`metrics.json`. Setting `stop_event` ends training after the current step; the run then evaluates
and saves as usual, with `stopped=True`. `finetune(config)` drives it for the command line.
"""
from __future__ import annotations

import json
import math
import os
import threading
import time
from dataclasses import asdict
from typing import Iterator, Optional

import torch

from ..checkpoints import (
    load_checkpoint,
    register_checkpoint_hooks,
    remove_stale_temporary_checkpoints,
    resolve_resume_checkpoint,
    save_checkpoint,
)
from ..loop import TrainEvent, make_accelerator, peak_memory_bytes, release_accelerator, training_steps
from ..options import attach_grad_scaler, build_lr_scheduler, build_optimizer
from .config import FinetuneConfig
from .data import CausalLMCollator, load_task_splits, tokenize_glue, tokenize_gsm8k_eval, tokenize_gsm8k_train
from .eval import evaluate_glue, evaluate_gsm8k
from .model import build_lora_model, load_tokenizer, load_trainable_weights, save_trainable_weights
from .tasks import EVAL_SUFFIXES

LOSS_LOG_NAME = "loss_log.jsonl"
METRICS_NAME = "metrics.json"


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


def train(config: FinetuneConfig, stop_event: Optional[threading.Event] = None) -> Iterator[TrainEvent]:
    """Run one fine-tuning job end to end, yielding `TrainEvent`s (see the module docstring)."""
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding

    stop_event = stop_event or threading.Event()
    start_time = time.perf_counter()
    spec = config.validate()
    accelerator = make_accelerator(mixed_precision=config.mixed_precision,
                                   gradient_accumulation_steps=config.gradient_accumulation_steps,
                                   seed=config.seed, cpu=config.cpu)
    try:
        set_seed(config.seed)
        os.makedirs(config.output_dir, exist_ok=True)
        remove_stale_temporary_checkpoints(config.output_dir)
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
        optimizer = build_optimizer(config.optimizer, model, config.learning_rate, config.optimizer_args)

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
        scheduler = build_lr_scheduler(config.lr_scheduler, optimizer,
                                       warmup_steps=math.ceil(config.warmup_ratio * max_steps),
                                       total_steps=max_steps, num_processes=accelerator.num_processes)

        # Prepare everything with our `accelerator`
        model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
        eval_loaders = {s: accelerator.prepare(loader) for s, loader in eval_loaders.items()}
        if accelerator.mixed_precision == "fp16":
            attach_grad_scaler(optimizer, accelerator.scaler)
        # Checkpoints hold only the trained tensors, not the frozen base model.
        register_checkpoint_hooks(accelerator, save_trainable_weights, load_trainable_weights)

        global_step = 0
        loss_log_path = os.path.join(config.output_dir, LOSS_LOG_NAME)
        if resume is not None:
            global_step, path = resume
            yield TrainEvent(step=global_step, max_steps=max_steps, phase="setup",
                             message=f"resuming from {path} (step {global_step})")
            load_checkpoint(accelerator, path)
        if accelerator.is_main_process:  # drop the log lines of steps a resumed run redoes
            kept = _read_loss_log(loss_log_path, up_to_step=global_step) if resume else []
            with open(loss_log_path, "w") as fh:
                fh.writelines(json.dumps(row) + "\n" for row in kept)

        # Training loop
        total_batch = config.per_device_train_batch_size * accelerator.num_processes * config.gradient_accumulation_steps
        yield TrainEvent(
            step=global_step, max_steps=max_steps, phase="setup",
            message=f"{spec.name}: {len(train_data)} training examples, {max_steps} steps of {total_batch} examples, "
                    f"optimizer {config.optimizer}, {n_trainable:,} trainable of {n_total:,} parameters")
        if accelerator.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(accelerator.device)
        train_start = time.perf_counter()
        steps = training_steps(
            accelerator, models=[model], dataloader=train_loader, optimizer=optimizer, lr_scheduler=scheduler,
            compute_loss=lambda batch: model(**batch).loss, start_step=global_step, max_steps=max_steps,
            updates_per_epoch=steps_per_epoch, stop_event=stop_event, clip_parameters=model.parameters(),
            max_grad_norm=config.max_grad_norm, reduce_loss=True,
        )
        for event in steps:
            global_step = event.step
            if accelerator.is_main_process:
                with open(loss_log_path, "a") as fh:
                    fh.write(json.dumps({"step": global_step, "loss": event.loss, "lr": event.lr,
                                         "epoch": round(global_step / steps_per_epoch, 4)}) + "\n")
            if config.checkpointing_steps and global_step % config.checkpointing_steps == 0:
                event.checkpoint = save_checkpoint(accelerator, config.output_dir, global_step,
                                                   config.checkpoints_total_limit)
            yield event
        train_seconds = time.perf_counter() - train_start
        stopped = stop_event.is_set() and global_step < max_steps

        # Evaluation
        yield TrainEvent(step=global_step, max_steps=max_steps, phase="eval", message="evaluating")
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
        outputs = {"output_dir": os.path.abspath(config.output_dir)}
        if accelerator.is_main_process:
            accelerator.unwrap_model(model).save_pretrained(config.output_dir)
            tokenizer.save_pretrained(config.output_dir)
            outputs["metrics"] = os.path.join(config.output_dir, METRICS_NAME)
            with open(outputs["metrics"], "w") as fh:
                json.dump(_json_safe(summary), fh, indent=2)
            with open(os.path.join(config.output_dir, "finetune_config.json"), "w") as fh:
                json.dump(asdict(config), fh, indent=2)
        accelerator.wait_for_everyone()
        yield TrainEvent(step=global_step, max_steps=max_steps, phase="done", done=True, stopped=stopped,
                         message=("stopped" if stopped else "finished") + f" at step {global_step}",
                         outputs=outputs, metrics=results, summary=summary,
                         peak_memory_bytes=summary["peak_memory_bytes"],
                         wall_time=time.perf_counter() - start_time)
    finally:
        release_accelerator(accelerator)


def finetune(config: FinetuneConfig) -> dict:
    """Run one job for the command line (messages on stdout, a tqdm bar on stderr, the eval metrics
    as one JSON line at the end); returns what it writes to `output_dir/metrics.json`."""
    from tqdm.auto import tqdm

    is_main = os.environ.get("RANK", "0") == "0"
    bar = None
    last = None
    try:
        for event in train(config):
            last = event
            if event.phase == "train":
                if bar is None:
                    bar = tqdm(total=event.max_steps, initial=event.step - 1, desc="training",
                               disable=os.environ.get("LOCAL_RANK", "0") != "0")
                bar.update(event.step - bar.n)
                bar.set_postfix(loss=f"{event.loss:.4f}", lr=f"{event.lr:.2e}")
            elif event.message and not event.done and event.phase == "setup" and is_main:
                print(event.message, flush=True)
    finally:
        if bar is not None:
            bar.close()
    if is_main:
        print(json.dumps(_json_safe(last.metrics), indent=None), flush=True)
    return last.summary


__all__ = ["LOSS_LOG_NAME", "METRICS_NAME", "finetune", "train"]
