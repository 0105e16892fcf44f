"""The Gradio app behind `python app.py`: upload photos, train a DreamBooth LoRA, watch it, generate.

`build_demo(base_model, output_root)` returns the `gr.Blocks`; `launch(demo, ...)` serves it. The app
trains through `adaprelora.training.dreambooth.train` (the code `train_dreambooth.py` runs).
"""
from .generate import DEFAULT_BASE_MODEL
from .ui import build_demo, launch, parse_auth

__all__ = ["DEFAULT_BASE_MODEL", "build_demo", "launch", "parse_auth"]
