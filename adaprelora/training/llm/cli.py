"""The command line's view of a fine-tuning run: messages on stdout, a tqdm bar, the metrics at the end."""
from __future__ import annotations

import json
import logging
import os

from .config import FinetuneConfig
from .trainer import _json_safe, train


def finetune(config: FinetuneConfig) -> dict:
    """Drive `train()` for the command line (messages on stdout, a tqdm bar on stderr, the eval
    metrics as one JSON line at the end); returns what it writes to `output_dir/metrics.json`."""
    from tqdm.auto import tqdm

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
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
            if event.validation_loss is not None and is_main:
                (bar.write if bar is not None else print)(f"eval_loss {event.validation_loss:.5f} at step {event.step}")
    finally:
        if bar is not None:
            bar.close()
    if is_main:
        if "best_eval_loss_step" in last.summary:
            print(f"best eval_loss {last.summary['best_eval_loss']:.5f} at step {last.summary['best_eval_loss_step']}",
                  flush=True)
        print(json.dumps(_json_safe(last.metrics), indent=None), flush=True)
    return last.summary


__all__ = ["finetune"]
