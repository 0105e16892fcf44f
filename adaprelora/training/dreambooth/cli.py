"""The command line's view of a DreamBooth run: a tqdm bar, messages on stderr, one final line."""
from __future__ import annotations

import logging
import os
import sys

from ..loop import TrainEvent, format_bytes
from .config import TrainConfig
from .trainer import train


def run_cli_training(config: TrainConfig) -> TrainEvent:
    """Drive `train()` for the command line: messages and warnings on stderr, a tqdm bar with loss,
    lr and steps/s, and a final line with the output paths, wall time and peak memory (stdout).
    Only the main process prints. Returns the last event."""
    from tqdm.auto import tqdm

    is_main = os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"
    logging.basicConfig(format="%(levelname)s: %(message)s", level=logging.WARNING if is_main else logging.ERROR)
    bar = None
    last = None
    try:
        for event in train(config):
            if last is None:
                _quiet_libraries()  # after the cheap checks: bad input fails before heavy imports
            last = event
            if not is_main:
                continue
            write = (bar.write if bar is not None else print)
            for warning in event.warnings:
                write(f"warning: {warning}", file=sys.stderr)
            if event.phase == "train" and event.loss is not None:
                if bar is None:
                    bar = tqdm(total=event.max_steps, initial=event.step - 1, desc="Steps", unit="step",
                               dynamic_ncols=True)
                postfix = {"loss": f"{event.loss:.4f}", "lr": f"{event.lr:.2e}"}
                if event.steps_per_sec:
                    postfix["steps/s"] = f"{event.steps_per_sec:.2f}"
                bar.set_postfix(postfix, refresh=False)
                bar.update(event.step - bar.n)
            if event.message and not event.done:
                write(event.message, file=sys.stderr)
            if event.validation_loss is not None:
                prior = (f" (prior {event.prior_validation_loss:.5f})" if event.prior_validation_loss is not None
                         else "")
                write(f"validation loss {event.validation_loss:.5f}{prior} at step {event.step}", file=sys.stderr)
            for sample in event.samples:
                if not event.done:
                    write(f"sample: {sample}", file=sys.stderr)
    finally:
        if bar is not None:
            bar.close()
    if is_main and last is not None and last.done:
        out = last.outputs
        print(
            f"{'stopped' if last.stopped else 'finished'} at step {last.step}: LoRA saved to "
            + " and ".join(f"{out[kind]} ({label})" for kind, label in (("diffusers", "diffusers"), ("kohya", "kohya/A1111"))
                           if out.get(kind))
            + f", model card {out.get('model_card')}; "
            + (f"{out['note']}; " if out.get("note") else "")
            + (f"{out['verified']}; " if out.get("verified") else "")
            + (f"best validation loss {out['best_validation_loss']['validation_loss']:.5f} at step "
               f"{out['best_validation_loss']['step']} (all in {out['validation_loss']}); "
               if out.get("best_validation_loss") else "")
            + f"wall time {last.wall_time:.1f} s, "
            f"peak memory {format_bytes(last.peak_memory_bytes or 0)}",
            flush=True,
        )
    return last


def _quiet_libraries() -> None:
    """Keep library chatter (weight-loading bars, info logs) off the CLI's output."""
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
    except Exception:  # pragma: no cover - logging helpers moved
        pass


__all__ = ["run_cli_training"]
