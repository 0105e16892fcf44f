"""Trained LoRAs on disk under the app's `--output-root`: create, describe, list, delete.

Layout, one folder per LoRA (the folder is also the trainer's `output_dir`):

    <output_root>/loras/<name>/
        adaprelora_app.json          settings, status, outputs and samples (paths relative to the folder)
        instance_images/             the uploaded images, copied in (the run is self-contained)
        pytorch_lora_weights.safetensors, checkpoint-*/, samples...   written by the trainer

Names are plain slugs (letters, digits, `.`, `_`, `-`); every path is resolved and checked to lie
inside `<output_root>/loras` before anything is read, written or deleted there. A `loras/` folder
removed while the app runs is made again when next needed (an empty list, a new run); one that
cannot be made (the output root became a file, no permission) is a `StoreError` saying so.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Optional

META_FILE = "adaprelora_app.json"
LORAS_DIR = "loras"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")

# Status values kept in the metadata file. A run still marked "training" when a new app starts
# belongs to a process that died: it is marked "interrupted", listed as "interrupted at step N"
# (and resumable) when it left a checkpoint, as "failed" when it died before the first one.
TRAINING, DONE, STOPPED, FAILED, INTERRUPTED = "training", "done", "stopped", "failed", "interrupted"


class StoreError(ValueError):
    """A request the store refuses (bad name, unknown LoRA, a path outside the store)."""


def slugify(text: str, max_len: int = 40) -> str:
    """`"a photo of sks dog!"` -> `"a-photo-of-sks-dog"`; empty when nothing usable is left."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", text or "").strip("-").lower()
    return slug[:max_len].strip("-")


@dataclass
class LoraInfo:
    """One LoRA folder as the UI shows it."""

    name: str
    path: str
    meta: dict = field(default_factory=dict)

    @property
    def status(self) -> str:
        return str(self.meta.get("status", "unknown"))

    @property
    def weights_path(self) -> Optional[str]:
        """The diffusers weights file, if training got far enough to write one."""
        rel = (self.meta.get("outputs") or {}).get("diffusers")
        candidates = [rel] if rel else []
        candidates.append(DIFFUSERS_WEIGHTS)
        for cand in candidates:
            path = os.path.join(self.path, cand)
            if os.path.isfile(path):
                return path
        return None

    @property
    def ready(self) -> bool:
        """Usable for generation: training ended (done or stopped) and weights exist."""
        return self.status in (DONE, STOPPED) and self.weights_path is not None

    @property
    def last_checkpoint(self) -> Optional[tuple[int, str]]:
        """(step, folder) of the newest complete `checkpoint-<step>/`, or None."""
        from adaprelora.training.checkpoints import list_checkpoints

        found = list_checkpoints(self.path)
        return found[-1] if found else None

    @property
    def resumable(self) -> bool:
        """A run whose process died after its first checkpoint, with its settings recorded."""
        return self.status == INTERRUPTED and bool(self.meta.get("train_config")) and self.last_checkpoint is not None

    @property
    def status_label(self) -> str:
        """The status as the LoRAs tab lists it: "interrupted at step N" for a resumable run,
        "failed" for one that died before its first checkpoint."""
        if self.status == INTERRUPTED:
            checkpoint = self.last_checkpoint
            return f"interrupted at step {checkpoint[0]}" if checkpoint else FAILED
        return self.status

    def output_file(self, kind: str) -> Optional[str]:
        """Absolute path of output `kind` ('diffusers' or 'kohya') if it exists and the run ended
        (done or stopped): a run that died may have left a half-written file."""
        if self.status not in (DONE, STOPPED):
            return None
        rel = (self.meta.get("outputs") or {}).get(kind)
        if not rel:
            return self.weights_path if kind == "diffusers" else None
        path = os.path.join(self.path, rel)
        return path if os.path.isfile(path) else None

    def size_bytes(self) -> int:
        total = 0
        for root, _dirs, files in os.walk(self.path):
            for name in files:
                try:
                    total += os.lstat(os.path.join(root, name)).st_size
                except OSError:
                    pass
        return total


class LoraStore:
    """The registry of trained LoRAs under one output root (safe to share between users)."""

    def __init__(self, output_root: str):
        self.output_root = os.path.realpath(os.path.expanduser(output_root))
        self.loras_root = os.path.join(self.output_root, LORAS_DIR)
        self.ensure_root()
        self._lock = threading.Lock()
        self._active: set[str] = set()  # LoRAs being trained by this process
        for info in self.list():
            if info.status == TRAINING:
                info.meta["status"] = INTERRUPTED
                self.save_meta(info)

    # -- paths -----------------------------------------------------------------------------
    def ensure_root(self) -> None:
        """Make `<output_root>/loras` if it is missing (removed while the app runs); `StoreError`
        when it cannot be made."""
        if os.path.isdir(self.loras_root):
            return
        try:
            os.makedirs(self.loras_root, exist_ok=True)
        except OSError as err:
            blocker = next((p for p in (self.output_root, self.loras_root) if os.path.exists(p) and not os.path.isdir(p)),
                           None)
            reason = f"{blocker} is a file, not a folder" if blocker else (err.strerror or str(err))
            raise StoreError(f"the output folder {self.loras_root} is gone and cannot be made again: {reason}. "
                             "Remove what is in its way, or restart the app with another --output-root") from None

    def path_for(self, name: str) -> str:
        """The folder of LoRA `name`; refuses names that are not slugs or that escape the store."""
        if not isinstance(name, str) or not _NAME_RE.match(name) or name in (".", ".."):
            raise StoreError(
                f"invalid LoRA name {name!r}: use letters, digits, '.', '_' or '-' (at most 80 characters)"
            )
        path = os.path.join(self.loras_root, name)
        real = os.path.realpath(path)
        if os.path.dirname(real) != self.loras_root:
            raise StoreError(f"LoRA {name!r} does not lie inside the output folder")
        return path

    def contains(self, path: str) -> bool:
        """True when `path` resolves to somewhere inside the output root."""
        real = os.path.realpath(path)
        return os.path.commonpath([real, self.output_root]) == self.output_root

    # -- create / update -------------------------------------------------------------------
    def create(self, base_name: str, meta: dict) -> LoraInfo:
        """Reserve a new folder named `base_name` (or `base_name-2`, `-3`...) and write `meta`."""
        base = slugify(base_name) or "lora"
        self.ensure_root()
        for i in range(1, 1000):
            name = base if i == 1 else f"{base}-{i}"
            path = self.path_for(name)
            try:
                os.mkdir(path)  # atomic: two users asking for the same name get different folders
            except FileExistsError:
                continue
            meta = dict(meta, name=name, status=TRAINING)
            meta.setdefault("created", _dt.datetime.now().isoformat(timespec="seconds"))
            info = LoraInfo(name=name, path=path, meta=meta)
            with self._lock:
                self._active.add(name)
            self.save_meta(info)
            return info
        raise StoreError(f"too many LoRAs named {base!r}; choose another name")

    def reopen(self, info: LoraInfo) -> None:
        """Mark an interrupted run as training again (its resume), so it cannot be deleted meanwhile."""
        with self._lock:
            if info.name in self._active:
                raise StoreError(f"LoRA {info.name!r} is already training")
            self._active.add(info.name)
        info.meta["status"] = TRAINING
        info.meta.pop("finished", None)
        self.save_meta(info)

    def finish(self, info: LoraInfo, status: str) -> None:
        """Record how a run ended and release it (it may now be deleted)."""
        info.meta["status"] = status
        info.meta["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
        try:
            self.save_meta(info)
        finally:
            with self._lock:
                self._active.discard(info.name)

    def save_meta(self, info: LoraInfo) -> None:
        """Write the metadata atomically (a crash never leaves half a JSON file); a LoRA folder
        removed meanwhile is made again to hold it."""
        self.ensure_root()
        os.makedirs(info.path, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".meta-", suffix=".json", dir=info.path)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(info.meta, fh, indent=2, sort_keys=True, default=str)
        os.replace(tmp, os.path.join(info.path, META_FILE))

    def relative(self, info: LoraInfo, path: str) -> Optional[str]:
        """`path` relative to the LoRA folder, or None when it lies elsewhere."""
        real, base = os.path.realpath(path), os.path.realpath(info.path)
        if os.path.commonpath([real, base]) != base:
            return None
        return os.path.relpath(real, base)

    # -- read ------------------------------------------------------------------------------
    def get(self, name: str) -> LoraInfo:
        path = self.path_for(name)
        meta_path = os.path.join(path, META_FILE)
        if not os.path.isfile(meta_path):
            raise StoreError(f"no trained LoRA named {name!r}")
        try:
            with open(meta_path, encoding="utf-8") as fh:
                meta = json.load(fh)
        except (OSError, ValueError) as err:
            raise StoreError(f"LoRA {name!r} has an unreadable metadata file: {err}") from None
        if not isinstance(meta, dict):
            raise StoreError(f"LoRA {name!r} has an unreadable metadata file")
        return LoraInfo(name=name, path=path, meta=meta)

    def list(self) -> list[LoraInfo]:
        """Every LoRA folder with metadata, newest first."""
        found = []
        self.ensure_root()
        for name in os.listdir(self.loras_root):
            try:
                found.append(self.get(name))
            except StoreError:
                continue  # stray files, temp folders, foreign folders
        found.sort(key=lambda info: (str(info.meta.get("created", "")), info.name), reverse=True)
        return found

    def names(self) -> list[str]:
        """Names of the LoRAs usable for generation, newest first."""
        return [info.name for info in self.list() if info.ready]

    # -- delete ----------------------------------------------------------------------------
    def delete(self, name: str) -> None:
        info = self.get(name)
        if os.path.islink(info.path):
            raise StoreError(f"LoRA {name!r} is a link; remove it by hand")
        with self._lock:
            if name in self._active:
                raise StoreError(f"LoRA {name!r} is still training; stop it first")
            shutil.rmtree(info.path)


def format_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
