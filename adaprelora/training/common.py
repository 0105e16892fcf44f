"""Plumbing every training entry point shares: user errors, optimizer arguments, checkpoints.

The CLIs, the app and the tests all go through these helpers so that a bad flag, a resume or a
checkpoint rotation behaves the same everywhere.
"""
from __future__ import annotations

import ast
import os
import re
import shutil
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterable, Optional

import torch

CHECKPOINT_PREFIX = "checkpoint-"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing folder...). Printed as one line, no traceback."""


def run_cli(main: Callable[[], object]) -> None:
    """Run `main()`; turn `UserError` (and Ctrl-C) into one clear line and a non-zero exit."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: completed checkpoints are left as they were", file=sys.stderr)
        sys.exit(130)


def parse_optimizer_args(items: Optional[Iterable[str]]) -> dict:
    """Parse `--optimizer_args key=value ...` (kohya style). Values are Python literals when they
    parse as one (`0.1`, `True`, `(0.9, 0.99)`), else strings (`variant=sgd`)."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"--optimizer_args expects key=value pairs, got {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key.isidentifier():
            raise UserError(f"--optimizer_args: {key!r} is not a valid argument name")
        try:
            value = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            value = raw.strip()
        out[key] = value
    return out


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Completed checkpoints in `output_dir` as (step, path), oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_RE.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isdir(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def rotate_checkpoints(output_dir: str, total_limit: Optional[int], about_to_save: bool = True) -> list[str]:
    """Delete the oldest checkpoints so that, after one more save, at most `total_limit` remain."""
    if not total_limit or total_limit <= 0:
        return []
    existing = list_checkpoints(output_dir)
    keep = total_limit - 1 if about_to_save else total_limit
    removed = []
    for _, path in existing[: max(0, len(existing) - keep)]:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def resolve_resume_checkpoint(output_dir: str, value: Optional[str]) -> Optional[tuple[int, str]]:
    """`--resume_from_checkpoint latest|<name>|<path>` -> (step, path), or None when there is none.

    "latest" with no checkpoint yet starts fresh (diffusers' behaviour); a named checkpoint that does
    not exist is a user error.
    """
    if not value:
        return None
    if value == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = value if os.path.isdir(value) else os.path.join(output_dir, value)
    match = _CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path)))
    if not os.path.isdir(path) or not match:
        raise UserError(
            f"--resume_from_checkpoint: no checkpoint {value!r} (expected 'latest' or a folder "
            f"named checkpoint-<step> in {output_dir})"
        )
    return int(match.group(1)), path


def save_checkpoint_atomically(save_fn: Callable[[str], None], output_dir: str, step: int) -> str:
    """Write a checkpoint into a temporary folder, then rename it to `checkpoint-<step>`.

    A run killed mid-save leaves only a `.tmp-*` folder behind, never a half-written checkpoint
    under the final name, so every `checkpoint-*` folder is loadable.
    """
    final = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")
    tmp = os.path.join(output_dir, f".tmp-{CHECKPOINT_PREFIX}{step}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp, exist_ok=True)
    save_fn(tmp)
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def peak_memory_bytes(device: Optional[torch.device] = None) -> int:
    """Peak accelerator memory if on CUDA, else this process's peak resident set size."""
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except Exception:  # pragma: no cover - non-POSIX
        return 0


def format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


@contextmanager
def stopwatch():
    """`with stopwatch() as t: ...; t()` gives the elapsed seconds."""
    start = time.perf_counter()
    yield lambda: time.perf_counter() - start


def attach_grad_scaler(optimizer, scaler) -> None:
    """Tell an optimizer that reads gradients during backward (AdaPreLoRA's exact energies) which
    loss scaler is in use, so it can undo the fp16 loss scale. A no-op for other optimizers."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    setter = getattr(inner, "set_grad_scaler", None)
    if setter is not None and scaler is not None:
        setter(scaler)
