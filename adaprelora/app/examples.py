"""The one-click example of the Train tab: the shipped pictures of a subject the built-in model never
saw (`assets/examples/`), copied into Gradio's upload folder as if the user had uploaded them, each
with its caption file beside it so the caption table fills in.
"""
from __future__ import annotations

import os
import shutil
import uuid

from .form import upload_folder

EXAMPLES_DIR = os.path.normpath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "assets", "examples"))
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def example_images(folder: str = EXAMPLES_DIR) -> list[str]:
    return sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES))


def stage_example(folder: str = EXAMPLES_DIR) -> list[str]:
    """Copy the example images and their captions into a fresh folder under the upload folder."""
    target = os.path.join(upload_folder(), f"example-{uuid.uuid4().hex[:12]}")
    os.makedirs(target)
    paths = []
    for src in example_images(folder):
        dst = os.path.join(target, os.path.basename(src))
        shutil.copyfile(src, dst)
        caption = os.path.splitext(src)[0] + ".txt"
        if os.path.isfile(caption):
            shutil.copyfile(caption, os.path.splitext(dst)[0] + ".txt")
        paths.append(dst)
    return paths


def sidecar_caption(path: str) -> str:
    """The caption in `<image>.txt` beside an image in the upload folder ("" if none). Browser
    uploads never have one; staged examples do."""
    caption = os.path.splitext(path)[0] + ".txt"
    root = upload_folder()
    real = os.path.realpath(caption)
    if os.path.commonpath([real, root]) != root or not os.path.isfile(real):
        return ""
    with open(real, encoding="utf-8", errors="replace") as f:
        return f.read().strip()[:500]


__all__ = ["EXAMPLES_DIR", "example_images", "sidecar_caption", "stage_example"]
