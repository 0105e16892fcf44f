"""The Gradio app behind `python app.py`: upload photos, train a DreamBooth LoRA, watch it, generate.

`build_demo(base_model, output_root)` returns the `gr.Blocks`; `launch(demo, ...)` serves it. The app
trains through `adaprelora.training.dreambooth.train` (the code `train_dreambooth.py` runs).
Gradio is imported on first use of these names, so `app.py` can configure it first.
"""
from typing import Optional

from .defaults import DEFAULT_BASE_MODEL, PRESETS


def parse_auth(value: Optional[str]) -> Optional[tuple[str, str]]:
    """`"user:pass"` -> ("user", "pass") (the password may contain ':'); None stays None.
    Raises ValueError on another shape."""
    if value is None:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise ValueError("--auth expects user:password (both non-empty)")
    return user, password


def __getattr__(name):
    if name in ("build_demo", "launch"):
        from . import ui

        return getattr(ui, name)
    raise AttributeError(name)


__all__ = ["DEFAULT_BASE_MODEL", "PRESETS", "build_demo", "launch", "parse_auth"]
