"""The tasks `finetune_llm.py` knows (GLUE's nine and GSM8K) and the checks their data must pass.

A TaskSpec says where a task's data lives, which columns and labels it has and which splits it is
evaluated on; the checks turn bad data into one-line UserErrors naming the file or split.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from ..errors import UserError


@dataclass(frozen=True)
class TaskSpec:
    """What a task needs: Hub location, columns, label space and evaluation splits."""

    name: str  # "glue:sst2" or "gsm8k"
    family: str  # "glue" or "gsm8k"
    hub_path: str
    hub_config: str
    text_columns: tuple[str, ...]
    label_column: Optional[str]
    num_labels: int  # 1 means regression (STS-B); 0 for generation (GSM8K)
    train_split: str
    eval_splits: tuple[str, ...]  # the first is the main one; MNLI also has the mismatched one

    @property
    def glue_task(self) -> Optional[str]:
        return self.name.split(":", 1)[1] if self.family == "glue" else None

    @property
    def is_regression(self) -> bool:
        return self.family == "glue" and self.num_labels == 1

    @property
    def required_columns(self) -> tuple[str, ...]:
        return self.text_columns + ((self.label_column,) if self.label_column else ())


# GLUE's columns and label counts, as in the `nyu-mll/glue` dataset.
_GLUE = {
    "cola": (("sentence",), 2),
    "sst2": (("sentence",), 2),
    "mrpc": (("sentence1", "sentence2"), 2),
    "qqp": (("question1", "question2"), 2),
    "stsb": (("sentence1", "sentence2"), 1),
    "mnli": (("premise", "hypothesis"), 3),
    "qnli": (("question", "sentence"), 2),
    "rte": (("sentence1", "sentence2"), 2),
    "wnli": (("sentence1", "sentence2"), 2),
}
TASK_NAMES = tuple(f"glue:{name}" for name in _GLUE) + ("gsm8k",)
# Suffix of each evaluation split's metric names in metrics.json (MNLI mismatched: `accuracy_mm`).
EVAL_SUFFIXES = {"validation_mismatched": "_mm"}


def get_task(name: str) -> TaskSpec:
    """`"glue:<cola|sst2|mrpc|qqp|stsb|mnli|qnli|rte|wnli>"` or `"gsm8k"` -> its TaskSpec."""
    key = str(name).strip().lower()
    if key == "gsm8k":
        return TaskSpec("gsm8k", "gsm8k", "openai/gsm8k", "main", ("question", "answer"), None, 0,
                        "train", ("test",))
    family, _, sub = key.partition(":")
    if family == "glue" and sub in _GLUE:
        columns, num_labels = _GLUE[sub]
        evals = ("validation_matched", "validation_mismatched") if sub == "mnli" else ("validation",)
        return TaskSpec(key, "glue", "nyu-mll/glue", sub, columns, "label", num_labels, "train", evals)
    raise UserError(f"--task: unknown task {name!r}; choose from {', '.join(TASK_NAMES)}")


def check_columns(columns, spec: TaskSpec, where: str) -> None:
    """A UserError naming the first column `spec` needs that `columns` lacks."""
    for column in spec.required_columns:
        if column not in columns:
            raise UserError(
                f"{where}: missing column {column!r} needed by {spec.name} "
                f"(needs {', '.join(spec.required_columns)}; found {', '.join(columns) or 'none'})"
            )


def _shown(value) -> str:
    """A value as the data file spells it (JSON's null, true and false)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def check_labels(labels, spec: TaskSpec, where: str) -> None:
    """GLUE labels: numbers for STS-B, class ids 0..num_labels-1 otherwise (the test split's -1 is not).

    A class id may be stored as a whole float (`1.0`: a JSON column with one float in it is read as
    floats); the error names the row and the value as written (`0.5`, `null`), not a converted one.
    """
    for row, value in enumerate(labels, start=1):
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if spec.is_regression:
            ok = number
        else:
            ok = number and float(value).is_integer() and 0 <= value < spec.num_labels
        if not ok:
            wanted = "a number" if spec.is_regression else f"an integer class id in 0..{spec.num_labels - 1}"
            raise UserError(f"{where}: row {row}: column 'label' must hold {wanted} for {spec.name}, "
                            f"found {_shown(value)}")


def check_texts(data, spec: TaskSpec, where: str) -> None:
    """Every text column (`spec.text_columns`) holds text in every row: a null, a number or a list
    would otherwise reach the tokenizer and fail there without naming the file, row or column."""
    for column in spec.text_columns:
        for row, value in enumerate(data[column], start=1):
            if not isinstance(value, str):
                raise UserError(f"{where}: row {row}: column {column!r} must hold text for {spec.name}, "
                                f"found {_shown(value)}")
