"""The built-in text-to-image model (`assets/tiny-sd`): a small Stable Diffusion pipeline trained from
scratch on generated scenes (`scenes`), the judge that scores what it draws (`judge`), how it is
trained (`train`, `scripts/train_tiny_sd.py`), measured (`quality`) and personalised (`personalise`).
"""
import os

# The shipped model folder, found from the package so it works from any working directory.
TINY_SD_DIR = os.path.normpath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "assets", "tiny-sd"))

__all__ = ["TINY_SD_DIR"]
