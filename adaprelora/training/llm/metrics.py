"""GLUE and GSM8K metrics, named as the `evaluate` GLUE metric reports them.

`accuracy`, `f1` (binary, positive class 1), `matthews_correlation`, `pearson` and `spearmanr`
follow the definitions of scikit-learn and scipy that `evaluate` wraps, including their edge cases:
Matthews correlation is 0.0 when either side is constant, F1 is 0.0 when there is no positive
prediction and no positive label, and Pearson/Spearman are NaN when either side is constant
(the correlation is undefined). Spearman ranks ties by their average rank.
"""
from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation
from typing import Optional, Sequence

import numpy as np

# Which metrics each GLUE task reports (as evaluate.load("glue", task) does).
GLUE_TASK_METRICS: dict[str, tuple[str, ...]] = {
    "cola": ("matthews_correlation",),
    "sst2": ("accuracy",),
    "mrpc": ("accuracy", "f1"),
    "qqp": ("accuracy", "f1"),
    "stsb": ("pearson", "spearmanr"),
    "mnli": ("accuracy",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
    "wnli": ("accuracy",),
}


def _as_1d(values, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence, got shape {array.shape}")
    return array


def _pair(predictions, references) -> tuple[np.ndarray, np.ndarray]:
    preds = _as_1d(predictions, "predictions")
    refs = _as_1d(references, "references")
    if preds.shape != refs.shape:
        raise ValueError(f"predictions ({preds.size}) and references ({refs.size}) differ in length")
    if preds.size == 0:
        raise ValueError("cannot compute a metric over zero examples")
    return preds, refs


def accuracy(predictions, references) -> float:
    """Fraction of predictions equal to their reference."""
    preds, refs = _pair(predictions, references)
    return float(np.mean(preds == refs))


def f1(predictions, references, positive_label=1) -> float:
    """Binary F1 of `positive_label`: 2 TP / (2 TP + FP + FN); 0.0 when that is 0 / 0."""
    preds, refs = _pair(predictions, references)
    pred_pos = preds == positive_label
    ref_pos = refs == positive_label
    tp = int(np.sum(pred_pos & ref_pos))
    fp = int(np.sum(pred_pos & ~ref_pos))
    fn = int(np.sum(~pred_pos & ref_pos))
    denom = 2 * tp + fp + fn
    return 2 * tp / denom if denom else 0.0


def matthews_correlation(predictions, references) -> float:
    """Matthews correlation coefficient (multiclass form, equal to the phi coefficient for two
    classes); 0.0 when predictions or references take a single value."""
    preds, refs = _pair(predictions, references)
    classes, encoded = np.unique(np.concatenate([refs, preds]), return_inverse=True)
    k, n = len(classes), refs.size
    confusion = np.zeros((k, k), dtype=np.float64)
    np.add.at(confusion, (encoded[:n], encoded[n:]), 1.0)
    true_counts = confusion.sum(axis=1)  # t_k: how often class k truly occurs
    pred_counts = confusion.sum(axis=0)  # p_k: how often class k is predicted
    correct = np.trace(confusion)
    cov_tp = correct * n - np.dot(true_counts, pred_counts)
    cov_pp = n * n - np.dot(pred_counts, pred_counts)
    cov_tt = n * n - np.dot(true_counts, true_counts)
    if cov_pp == 0 or cov_tt == 0:
        return 0.0
    return float(cov_tp / math.sqrt(cov_pp * cov_tt))


def pearson(predictions, references) -> float:
    """Pearson correlation; NaN when either side is constant."""
    preds, refs = _pair(predictions, references)
    x = preds.astype(np.float64) - np.mean(preds, dtype=np.float64)
    y = refs.astype(np.float64) - np.mean(refs, dtype=np.float64)
    norm = math.sqrt(float(np.dot(x, x)) * float(np.dot(y, y)))
    if norm == 0.0:
        return float("nan")
    return float(np.clip(np.dot(x, y) / norm, -1.0, 1.0))


def average_ranks(values) -> np.ndarray:
    """1-based ranks, ties sharing the mean of the ranks they span ([10, 20, 20] -> [1, 2.5, 2.5])."""
    array = _as_1d(values, "values")
    order = np.argsort(array, kind="mergesort")
    ranks = np.empty(array.size, dtype=np.float64)
    sorted_values = array[order]
    start = 0
    while start < array.size:
        stop = start + 1
        while stop < array.size and sorted_values[stop] == sorted_values[start]:
            stop += 1
        ranks[order[start:stop]] = (start + 1 + stop) / 2.0  # mean of ranks start+1 .. stop
        start = stop
    return ranks


def spearmanr(predictions, references) -> float:
    """Spearman rank correlation: Pearson on average ranks; NaN when either side is constant."""
    preds, refs = _pair(predictions, references)
    return pearson(average_ranks(preds), average_ranks(refs))


_METRIC_FNS = {
    "accuracy": accuracy,
    "f1": f1,
    "matthews_correlation": matthews_correlation,
    "pearson": pearson,
    "spearmanr": spearmanr,
}


def glue_metrics(task: str, predictions, references) -> dict[str, float]:
    """The metrics GLUE reports for `task` ("cola", "sst2", ..., "stsb"), keyed by their names."""
    if task not in GLUE_TASK_METRICS:
        raise ValueError(f"unknown GLUE task {task!r}; choose from {', '.join(GLUE_TASK_METRICS)}")
    return {name: _METRIC_FNS[name](predictions, references) for name in GLUE_TASK_METRICS[task]}


# ---------------------------------------------------------------------------------------------
# GSM8K

# A number: optional sign (only when the minus is not glued to a preceding word or digit, so
# "3-4" gives 3 and 4), optional "$" (also "$-5"), digits with optional thousands commas,
# optional decimals ("5." at the end of a sentence is 5).
_NUMBER_RE = re.compile(
    r"(?P<sign>(?<![\w.)])[-\u2212])?\s?(?:\$\s?(?P<sign2>-)?)?"
    r"(?P<num>\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
)
GSM8K_ANSWER_MARK = "####"


def normalize_number(text: str) -> Optional[str]:
    """Canonical form of one number string: "$1,234.50" -> "1234.5", "-0" -> "0", "7.0" -> "7"."""
    cleaned = text.replace(",", "").replace("$", "").replace("\u2212", "-").replace(" ", "")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _numbers(text: str) -> list[str]:
    found = []
    for match in _NUMBER_RE.finditer(text):
        negative = bool(match.group("sign")) != bool(match.group("sign2"))
        value = normalize_number(("-" if negative else "") + match.group("num"))
        if value is not None:
            found.append(value)
    return found


def extract_gsm8k_answer(text: str) -> Optional[str]:
    """The final numeric answer of a GSM8K solution, normalized (see `normalize_number`).

    The first number after the last "####" if there is one, else the last number in the text;
    None when the text has no number at all.
    """
    if text is None:
        return None
    if GSM8K_ANSWER_MARK in text:
        after = _numbers(text.rsplit(GSM8K_ANSWER_MARK, 1)[1])
        if after:
            return after[0]
    numbers = _numbers(text)
    return numbers[-1] if numbers else None


def gsm8k_accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Exact-match accuracy of the extracted final answers; a prediction without a number is wrong."""
    if len(predictions) != len(references):
        raise ValueError(f"predictions ({len(predictions)}) and references ({len(references)}) differ in length")
    if not references:
        raise ValueError("cannot compute a metric over zero examples")
    hits = 0
    for pred, ref in zip(predictions, references):
        gold = extract_gsm8k_answer(ref)
        guess = extract_gsm8k_answer(pred)
        hits += int(guess is not None and guess == gold)
    return hits / len(references)
