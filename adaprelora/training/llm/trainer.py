"""LoRA fine-tuning of Hugging Face language models on GLUE and GSM8K, as a generator of events.

`train(config, stop_event)` is the whole run: data (Hub or local JSONL/CSV), model + LoRA adapter,
`create_optimizer`, the shared accelerate loop (gradient accumulation, mixed precision, several
processes under `accelerate launch`), checkpoints with resume, evaluation with each task's standard
metric, and the outputs in `output_dir`:

    adapter_config.json, adapter_model.safetensors   the PEFT adapter (GLUE: with the classifier head)
    metrics.json        final eval metrics (names as the `evaluate` GLUE metric reports them; GSM8K:
                        `accuracy`), train loss, steps, wall time, peak memory
    loss_log.jsonl      one line per optimizer step: step, loss, lr, epoch (and eval_loss with --eval_steps)
    checkpoint-<step>/  optimizer, scheduler, RNG and trainable weights (`--checkpointing_steps`)
    eval_predictions.jsonl  GSM8K only: each generated answer and its extracted number

It yields `TrainEvent`s like the DreamBooth trainer: messages during setup, one event per
optimizer step, and a last one with `done=True`, the eval `metrics` and the `summary` written to
`metrics.json`. Setting `stop_event` ends training after the current step; the run then evaluates
and saves as usual, with `stopped=True`. `cli.finetune(config)` drives it for the command line.
"""
from __future__ import annotations

import json
import logging
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
from .eval import evaluate_glue, evaluate_gsm8k, heldout_loss
from .model import build_lora_model, load_tokenizer, load_trainable_weights, save_trainable_weights
from .sources import check_model_source, offline_when_unreachable, resolve_model
from .tasks import EVAL_SUFFIXES, TaskSpec

logger = logging.getLogger(__name__)
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
    """Run one fine-tuning job end to end, yielding `TrainEvent`s (see the module docstring).

    Raises `UserError` for problems the user can fix, before anything heavy is loaded when the
    settings alone tell. Closing the generator early releases the accelerator."""
    spec = config.validate()
    check_model_source(config.model_name_or_path, config.gguf_file)  # offline and not cached: fail now
    run = _FinetuneRun(config, spec, stop_event or threading.Event())
    try:
        yield from run.events()
    finally:
        run.close()


class _FinetuneRun:
    """State of one run; `events()` is the generator behind `train()`, its stages in the order they
    run: accelerator, data, model and optimizer, data loaders and schedule, `accelerator.prepare`,
    resume, the training loop, evaluation and the final files."""

    def __init__(self, config: FinetuneConfig, spec: TaskSpec, stop_event: threading.Event):
        self.config = config
        self.spec = spec
        self.stop_event = stop_event
        self.start_time = time.perf_counter()
        self.accelerator = None
        self.global_step = 0
        self.max_steps = 0
        self.tokenizer = None
        self.model_path, self.gguf_file = config.model_name_or_path, config.gguf_file  # the built-in: its folder
        self.train_data = None
        self.eval_data: dict = {}
        self.model = None
        self.optimizer = None
        self.loss_log_path = os.path.join(config.output_dir, LOSS_LOG_NAME)
        self.loss_data = None  # with --eval_steps: the evaluation split with labels, for the held-out loss
        self.loss_loader = None
        self.eval_history: list[dict] = []  # {"step", "eval_loss"} per evaluation

    def _event(self, message: str = "", phase: str = "setup", **kw) -> TrainEvent:
        return TrainEvent(step=self.global_step, max_steps=self.max_steps, message=message, phase=phase, **kw)

    # -- the run ---------------------------------------------------------------------------------
    def events(self) -> Iterator[TrainEvent]:
        cfg = self.config
        self._start_accelerator()
        resume = resolve_resume_checkpoint(cfg.output_dir, cfg.resume_from_checkpoint)
        self._load_data()
        n_trainable, n_total = self._build_model()
        train_loader, eval_loaders, steps_per_epoch = self._dataloaders()
        train_loader, eval_loaders, scheduler = self._prepare(train_loader, eval_loaders, self._lr_scheduler())
        yield from self._resume(resume)
        total_batch = cfg.per_device_train_batch_size * self.accelerator.num_processes * cfg.gradient_accumulation_steps
        yield self._event(
            f"{self.spec.name}: {len(self.train_data)} training examples, {self.max_steps} steps of {total_batch} "
            f"examples, optimizer {cfg.optimizer}, {n_trainable:,} trainable of {n_total:,} parameters")
        train_seconds = yield from self._train_loop(train_loader, scheduler, steps_per_epoch)
        stopped = self.stop_event.is_set() and self.global_step < self.max_steps
        yield self._event("evaluating", phase="eval")
        results, eval_counts = self._evaluate(eval_loaders)
        yield self._finish(results, eval_counts, train_seconds, n_trainable, stopped)

    # -- stages ----------------------------------------------------------------------------------
    def _start_accelerator(self) -> None:
        """The accelerator, the seed, the output folder (cleared of what a killed run left half-written)."""
        from accelerate.utils import set_seed

        cfg = self.config
        self.accelerator = make_accelerator(
            mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            seed=cfg.seed, cpu=cfg.cpu)
        set_seed(cfg.seed)
        os.makedirs(cfg.output_dir, exist_ok=True)
        remove_stale_temporary_checkpoints(cfg.output_dir)

    def _load_data(self) -> None:
        """The task's splits and the tokenizer, tokenized (the main process first: it fills the caches)."""
        cfg, spec = self.config, self.spec
        with self.accelerator.main_process_first():
            splits = load_task_splits(cfg, spec)
            self.model_path, self.gguf_file = resolve_model(cfg.model_name_or_path, cfg.gguf_file, log=logger.info)
            with offline_when_unreachable():
                self.tokenizer = tokenizer = load_tokenizer(self.model_path, self.gguf_file)
            if spec.family == "glue":
                self.train_data = tokenize_glue(splits[spec.train_split], tokenizer, spec, cfg.max_seq_length)
                self.eval_data = {s: tokenize_glue(splits[s], tokenizer, spec, cfg.max_seq_length)
                                  for s in spec.eval_splits if s in splits}
            else:
                self.train_data = tokenize_gsm8k_train(splits[spec.train_split], tokenizer, cfg.max_seq_length)
                self.eval_data = {s: tokenize_gsm8k_eval(splits[s], tokenizer, cfg.max_seq_length)
                                  for s in spec.eval_splits if s in splits}
            if cfg.eval_steps:  # the first evaluation split, with its answers as labels
                split = next(s for s in spec.eval_splits if s in splits)
                self.loss_data = (self.eval_data[split] if spec.family == "glue"
                                  else tokenize_gsm8k_train(splits[split], tokenizer, cfg.max_seq_length))

    def _build_model(self) -> tuple[int, int]:
        """The model with its LoRA adapter, and the optimizer (created on the model that runs:
        AdaPreLoRA hooks into it). Returns (trainable, total) parameter counts."""
        cfg = self.config
        with offline_when_unreachable():
            self.model = build_lora_model(cfg, self.spec, self.tokenizer, self.model_path, self.gguf_file)
        n_trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        n_total = sum(p.numel() for p in self.model.parameters())
        self.optimizer = build_optimizer(cfg.optimizer, self.model, cfg.learning_rate, cfg.optimizer_args)
        return n_trainable, n_total

    def _dataloaders(self):
        """(train loader, eval loaders by split, optimizer steps per epoch); sets `max_steps`."""
        from torch.utils.data import DataLoader
        from transformers import DataCollatorWithPadding

        cfg, acc, tokenizer = self.config, self.accelerator, self.tokenizer
        eval_batch = cfg.per_device_eval_batch_size or cfg.per_device_train_batch_size
        if self.spec.family == "glue":
            train_collate = eval_collate = DataCollatorWithPadding(tokenizer)
        else:
            train_collate = CausalLMCollator(tokenizer.pad_token_id)
            eval_collate = CausalLMCollator(tokenizer.pad_token_id, left=True)
        # Its own generator: starting an epoch then draws no number from the global RNG, so a resumed
        # run's dropout masks match those of the run it continues.
        train_loader = DataLoader(self.train_data.with_format(None), batch_size=cfg.per_device_train_batch_size,
                                  shuffle=True, collate_fn=train_collate,
                                  generator=torch.Generator().manual_seed(cfg.seed))
        eval_loaders = {s: DataLoader(d.with_format(None), batch_size=eval_batch, collate_fn=eval_collate)
                        for s, d in self.eval_data.items()}
        if self.loss_data is not None:
            self.loss_loader = DataLoader(self.loss_data.with_format(None), batch_size=eval_batch,
                                          collate_fn=train_collate)
        steps_per_epoch = math.ceil(math.ceil(len(train_loader) / acc.num_processes) / cfg.gradient_accumulation_steps)
        self.max_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)
        return train_loader, eval_loaders, steps_per_epoch

    def _lr_scheduler(self):
        cfg = self.config
        return build_lr_scheduler(cfg.lr_scheduler, self.optimizer,
                                  warmup_steps=math.ceil(cfg.warmup_ratio * self.max_steps),
                                  total_steps=self.max_steps, num_processes=self.accelerator.num_processes)

    def _prepare(self, train_loader, eval_loaders: dict, scheduler):
        """`accelerator.prepare` the model, optimizer, loaders and schedule; LoRA-only checkpoints."""
        acc = self.accelerator
        self.model, self.optimizer, train_loader, scheduler = acc.prepare(self.model, self.optimizer, train_loader,
                                                                          scheduler)
        eval_loaders = {s: acc.prepare(loader) for s, loader in eval_loaders.items()}
        if self.loss_loader is not None:
            self.loss_loader = acc.prepare(self.loss_loader)
        if acc.mixed_precision == "fp16":
            attach_grad_scaler(self.optimizer, acc.scaler)
        # Checkpoints hold only the trained tensors, not the frozen base model.
        register_checkpoint_hooks(acc, save_trainable_weights, load_trainable_weights)
        return train_loader, eval_loaders, scheduler

    def _resume(self, resume) -> Iterator[TrainEvent]:
        """Load the checkpoint `resume` ((step, path) or None) and keep the loss log's lines up to it."""
        if resume is not None:
            self.global_step, path = resume
            yield self._event(f"resuming from {path} (step {self.global_step})")
            load_checkpoint(self.accelerator, path)
        if self.accelerator.is_main_process:  # drop the log lines of steps a resumed run redoes
            kept = _read_loss_log(self.loss_log_path, up_to_step=self.global_step) if resume else []
            self.eval_history = [{"step": r["step"], "eval_loss": r["eval_loss"]} for r in kept
                                 if "eval_loss" in r and r["step"] < self.global_step]
            with open(self.loss_log_path, "w") as fh:
                fh.writelines(json.dumps(row) + "\n" for row in kept)

    def _train_loop(self, train_loader, scheduler, steps_per_epoch: int):
        """The shared loop; one line per step in the loss log, checkpoints. Returns the training seconds."""
        cfg, acc, model = self.config, self.accelerator, self.model
        if acc.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(acc.device)
        train_start = time.perf_counter()
        steps = training_steps(
            acc, models=[model], dataloader=train_loader, optimizer=self.optimizer, lr_scheduler=scheduler,
            compute_loss=lambda batch: model(**batch).loss, start_step=self.global_step, max_steps=self.max_steps,
            updates_per_epoch=steps_per_epoch, stop_event=self.stop_event, clip_parameters=model.parameters(),
            max_grad_norm=cfg.max_grad_norm, reduce_loss=True,
        )
        if self.loss_loader is not None:  # the starting point: the base model's (or the resumed) loss
            yield self._event(phase="eval", validation_loss=self._evaluate_loss())
        for event in steps:
            self.global_step = event.step
            row = {"step": self.global_step, "loss": event.loss, "lr": event.lr,
                   "epoch": round(self.global_step / steps_per_epoch, 4)}
            if self.loss_loader is not None and (self.global_step % cfg.eval_steps == 0
                                                 or self.global_step >= self.max_steps or self.stop_event.is_set()):
                row["eval_loss"] = event.validation_loss = self._evaluate_loss()
            if acc.is_main_process:
                with open(self.loss_log_path, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
            if cfg.checkpointing_steps and self.global_step % cfg.checkpointing_steps == 0:
                event.checkpoint = save_checkpoint(acc, cfg.output_dir, self.global_step, cfg.checkpoints_total_limit)
            yield event
        return time.perf_counter() - train_start

    def _evaluate_loss(self) -> float:
        """The held-out loss of the current weights (every process takes part); kept in `eval_history`."""
        value = heldout_loss(self.model, self.loss_loader, self.accelerator, self.spec)
        self.eval_history.append({"step": self.global_step, "eval_loss": value})
        return value

    def _evaluate(self, eval_loaders: dict) -> tuple[dict, dict]:
        """(each split's metrics, suffixed as `EVAL_SUFFIXES` says; each split's example count)."""
        cfg, acc, spec = self.config, self.accelerator, self.spec
        results: dict = {}
        eval_counts: dict = {}
        for split, loader in eval_loaders.items():
            suffix = EVAL_SUFFIXES.get(split, "")
            if spec.family == "glue":
                scores = evaluate_glue(self.model, loader, acc, spec)
            else:
                scores, rows = evaluate_gsm8k(self.model, loader, acc, self.tokenizer, self.eval_data[split],
                                              cfg.max_new_tokens)
                if acc.is_main_process:
                    with open(os.path.join(cfg.output_dir, "eval_predictions.jsonl"), "w") as fh:
                        fh.writelines(json.dumps(row) + "\n" for row in rows)
            results.update({f"{name}{suffix}": value for name, value in scores.items()})
            eval_counts[f"eval_samples{suffix}"] = len(self.eval_data[split])
        return results, eval_counts

    def _finish(self, results: dict, eval_counts: dict, train_seconds: float, n_trainable: int,
                stopped: bool) -> TrainEvent:
        """Write the adapter, `metrics.json` and the config; the last event."""
        cfg, acc = self.config, self.accelerator
        acc.wait_for_everyone()
        log = _read_loss_log(self.loss_log_path) if acc.is_main_process else []
        summary = {
            "task": self.spec.name,
            "model_name_or_path": cfg.model_name_or_path,
            "optimizer": cfg.optimizer,
            "optimizer_args": cfg.optimizer_args,
            **results,
            **eval_counts,
            **self._eval_loss_summary(),
            "train_loss": sum(row["loss"] for row in log) / len(log) if log else None,
            "last_train_loss": log[-1]["loss"] if log else None,
            "global_step": self.global_step,
            "train_samples": len(self.train_data),
            "train_runtime_s": round(train_seconds, 3),
            "peak_memory_bytes": peak_memory_bytes(acc.device),
            "trainable_params": n_trainable,
            "num_processes": acc.num_processes,
            "mixed_precision": acc.mixed_precision,
            "seed": cfg.seed,
        }
        outputs = {"output_dir": os.path.abspath(cfg.output_dir)}
        if acc.is_main_process:
            acc.unwrap_model(self.model).save_pretrained(cfg.output_dir)
            self.tokenizer.save_pretrained(cfg.output_dir)
            outputs["metrics"] = os.path.join(cfg.output_dir, METRICS_NAME)
            with open(outputs["metrics"], "w") as fh:
                json.dump(_json_safe(summary), fh, indent=2)
            with open(os.path.join(cfg.output_dir, "finetune_config.json"), "w") as fh:
                json.dump(asdict(cfg), fh, indent=2)
        acc.wait_for_everyone()
        return self._event(("stopped" if stopped else "finished") + f" at step {self.global_step}", phase="done",
                           done=True, stopped=stopped, outputs=outputs, metrics=results, summary=summary,
                           peak_memory_bytes=summary["peak_memory_bytes"],
                           wall_time=time.perf_counter() - self.start_time)

    def _eval_loss_summary(self) -> dict:
        """With `--eval_steps`: the last held-out loss, the step of the lowest and every evaluation."""
        if not self.eval_history:
            return {}
        best = min(self.eval_history, key=lambda r: (r["eval_loss"], r["step"]))
        return {"eval_loss": self.eval_history[-1]["eval_loss"], "best_eval_loss": best["eval_loss"],
                "best_eval_loss_step": best["step"], "eval_loss_history": list(self.eval_history)}

    def close(self) -> None:
        """Free the accelerator's singleton state, so another run can start in this process."""
        if self.accelerator is None:
            return
        self.model = self.optimizer = None
        release_accelerator(self.accelerator)
        self.accelerator = None


__all__ = ["LOSS_LOG_NAME", "METRICS_NAME", "train"]
