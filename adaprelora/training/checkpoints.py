"""`checkpoint-<step>/` folders both trainers write: list, rotate, save atomically, resume, LoRA only.

A checkpoint is `accelerator.save_state` (optimizer, scheduler, RNG) whose model weights are
replaced by the trained tensors alone: `register_checkpoint_hooks` takes each trainer's own
save/load functions for those; `save_checkpoint` adds what else a trainer keeps (the EMA of the
weights). Folders are written under a temporary name and renamed when complete, so every
`checkpoint-*` folder loads; temporaries a killed run left are removed at start.

The output folder itself is checked before a run loads anything (`check_output_dir`); files that
must not pass for a finished result are moved aside (`set_aside`); resuming with another LoRA rank
names the ranks (`load_checkpoint`, `lora_ranks`).
"""
from __future__ import annotations

import os
import re
import shutil
from typing import Callable, Optional

from .errors import UserError

CHECKPOINT_PREFIX = "checkpoint-"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_TMP_PREFIX = f".tmp-{CHECKPOINT_PREFIX}"


def check_output_dir(path: Optional[str], flag: str = "--output_dir") -> None:
    """`UserError` when `path` cannot be the run's output folder: empty, an existing file, under a
    file, or a folder (or nearest existing parent) this process cannot write into. Cheap: the trainers
    call it before anything is loaded, so the mistake costs no model loading and no half-run."""
    if not path or not str(path).strip():
        raise UserError(f"{flag} must name a folder")
    path = os.path.abspath(os.path.expanduser(str(path)))
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag}: {path!r} is a file, not a folder; choose another {flag}")
    parent = path
    while not os.path.exists(parent):
        up = os.path.dirname(parent)
        if up == parent:
            break
        parent = up
    if not os.path.isdir(parent):
        raise UserError(f"{flag}: {path!r} lies under {parent!r}, which is a file, not a folder; "
                        f"choose another {flag}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag}: cannot write into {parent!r} (permission denied); choose another {flag}")


def set_aside(output_dir: str, paths, folder_name: str) -> str:
    """Move the files `paths` into `output_dir/folder_name/` (replacing what an earlier run put
    there), so that nothing in `output_dir` itself looks like a finished result; returns the folder."""
    folder = os.path.join(output_dir, folder_name)
    os.makedirs(folder, exist_ok=True)
    for path in paths:
        if path and os.path.isfile(path):
            os.replace(path, os.path.join(folder, os.path.basename(path)))
    return folder


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
    tmp = os.path.join(output_dir, f"{_TMP_PREFIX}{step}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp, exist_ok=True)
    save_fn(tmp)
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def remove_stale_temporary_checkpoints(output_dir: str) -> None:
    """Remove `.tmp-checkpoint-*` folders a killed run left behind (never a completed checkpoint)."""
    if os.environ.get("RANK", "0") != "0" or not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        if name.startswith(_TMP_PREFIX):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def save_checkpoint(accelerator, output_dir: str, step: int, total_limit: Optional[int],
                    save_extra: Optional[Callable[[str], None]] = None) -> Optional[str]:
    """Write `checkpoint-<step>/` (main process; None elsewhere), first rotating old ones out so
    that at most `total_limit` remain. `save_extra(folder)` adds a trainer's own state (e.g. the
    EMA of the weights) to the folder before it gets its final name. Every process calls it: it
    waits for the others around."""
    path = None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        rotate_checkpoints(output_dir, total_limit, about_to_save=True)

        def save(folder: str) -> None:
            accelerator.save_state(folder)
            if save_extra is not None:
                save_extra(folder)

        path = save_checkpoint_atomically(save, output_dir, step)
    accelerator.wait_for_everyone()
    return path


def lora_ranks(name: str, checkpoint_shape, model_shape) -> Optional[tuple[int, int]]:
    """(the checkpoint's rank, this model's) when tensor `name` is a LoRA factor whose shapes differ
    by rank alone (A is (r, in), B is (out, r)); None otherwise."""
    checkpoint_shape, model_shape = tuple(checkpoint_shape), tuple(model_shape)
    if len(checkpoint_shape) < 2 or len(checkpoint_shape) != len(model_shape) or checkpoint_shape == model_shape:
        return None
    lowered = name.lower()
    if "lora_a" in lowered or "lora_down" in lowered or "down.weight" in lowered:
        axis = 0
    elif "lora_b" in lowered or "lora_up" in lowered or "up.weight" in lowered:
        axis = 1
    else:
        return None
    rest = [i for i in range(len(model_shape)) if i != axis]
    if any(checkpoint_shape[i] != model_shape[i] for i in rest):
        return None
    return checkpoint_shape[axis], model_shape[axis]


_SIZE_MISMATCH = re.compile(r"size mismatch for (\S+): copying a param with shape torch\.Size\(\[([\d, ]*)\]\) from "
                            r"checkpoint, the shape in current model is torch\.Size\(\[([\d, ]*)\]\)")


def rank_mismatch_message(path: str, checkpoint_rank: int, model_rank: int, rank_flag: str) -> str:
    return (f"--resume_from_checkpoint: {path} holds a LoRA of rank {checkpoint_rank} but this run has "
            f"{rank_flag} {model_rank}: resume with {rank_flag} {checkpoint_rank}, or start a new run in another "
            "--output_dir")


def load_checkpoint(accelerator, path: str, rank_flag: str = "--rank") -> None:
    """`accelerator.load_state(path)`; a checkpoint that does not load is a `UserError`, which names
    the rank when the checkpoint's LoRA has another rank than this run's (`rank_flag`)."""
    from .errors import first_line

    try:
        accelerator.load_state(path)
    except UserError:
        raise
    except Exception as err:
        for name, saved, current in _SIZE_MISMATCH.findall(str(err)):
            shapes = [tuple(int(x) for x in text.split(",") if x.strip()) for text in (saved, current)]
            ranks = lora_ranks(name, *shapes)
            if ranks is not None:
                raise UserError(rank_mismatch_message(path, *ranks, rank_flag)) from None
        raise UserError(f"--resume_from_checkpoint: cannot load {path}: {first_line(err)}") from None


def register_checkpoint_hooks(accelerator, save_weights: Callable[[list, str], None],
                              load_weights: Callable[[list, str], None]) -> None:
    """Make `accelerator.save_state` / `load_state` keep only the trained tensors of the models.

    `save_weights(models, folder)` writes them (main process only) and `load_weights(models,
    folder)` reads them back; both get the unwrapped models. accelerate then saves and loads no
    full model weights, only the optimizer, scheduler and RNG states.
    """
    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            save_weights([accelerator.unwrap_model(m) for m in models], output_dir)
        weights.clear()  # the tensors written above are all a checkpoint needs

    def load_hook(models, input_dir):
        unwrapped = [accelerator.unwrap_model(m) for m in models]
        models.clear()  # accelerate must not load full model weights (none were saved)
        load_weights(unwrapped, input_dir)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


__all__ = ["CHECKPOINT_PREFIX", "check_output_dir", "list_checkpoints", "load_checkpoint", "lora_ranks",
           "rank_mismatch_message", "register_checkpoint_hooks", "remove_stale_temporary_checkpoints",
           "resolve_resume_checkpoint", "rotate_checkpoints", "save_checkpoint", "save_checkpoint_atomically",
           "set_aside"]
