"""`<output_dir>/validation_loss.jsonl`: one JSON line per evaluation of the held-out loss.

Each line is `{"step": N, "validation_loss": X}`, plus `"prior_validation_loss"` with prior
preservation. The file is written whatever the tracker (TensorBoard, W&B or none), so a run can be
read back, plotted or compared without one; a resumed run keeps the lines before its resume step
and continues the file, so it reads as one uninterrupted run.
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional

VALIDATION_LOSS_FILE = "validation_loss.jsonl"


def read_validation_losses(path: str) -> list[dict]:
    """The records of a `validation_loss.jsonl` (empty when the file does not exist); a line that
    is not a JSON object with a "step" (e.g. cut short by a killed run) is skipped."""
    if not os.path.isfile(path):
        return []
    records = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
    return records


def best_record(records: list[dict], key: str = "validation_loss") -> Optional[dict]:
    """The record with the lowest finite `key` (the earliest one on a tie), or None."""
    finite = [r for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return min(finite, key=lambda r: (r[key], r["step"])) if finite else None


class ValidationLossLog:
    """Appends evaluations to `<output_dir>/validation_loss.jsonl` and keeps them in memory."""

    def __init__(self, output_dir: str, start_step: int = 0):
        """Start the file at `start_step`: lines of later (or equal) steps, left by an earlier run in
        the same folder, are dropped; a fresh run (step 0) starts an empty file."""
        self.path = os.path.join(output_dir, VALIDATION_LOSS_FILE)
        self.records = [r for r in read_validation_losses(self.path) if r["step"] < start_step]
        with open(self.path, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in self.records)

    def add(self, step: int, validation_loss: float, prior_validation_loss: Optional[float] = None) -> dict:
        """Record one evaluation (written and flushed at once) and return it."""
        record = {"step": int(step), "validation_loss": float(validation_loss)}
        if prior_validation_loss is not None:
            record["prior_validation_loss"] = float(prior_validation_loss)
        self.records.append(record)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        return record

    @property
    def last_step(self) -> Optional[int]:
        return self.records[-1]["step"] if self.records else None

    def best(self) -> Optional[dict]:
        """The evaluation with the lowest validation loss."""
        return best_record(self.records)


__all__ = ["VALIDATION_LOSS_FILE", "ValidationLossLog", "best_record", "read_validation_losses"]
