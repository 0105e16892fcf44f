"""DreamBooth LoRA for Stable Diffusion 1.x/2.x and SDXL: what is specific to it, around the shared loop.

    from adaprelora.training.dreambooth import TrainConfig, train

`config` (TrainConfig, diffusers' flag names), `data` (images, captions, dataset), `family`
(`detect_family`: SD 1.x, 2.x or SDXL), `models` (`DreamBoothModels`: the pipeline parts, LoRA
adapters), `class_images` (prior preservation), `checkpoints` (LoRA-only checkpoint hooks),
`validation` (sample images), `export` (diffusers and kohya files, their headers, model card),
`verify` (the export check), `trainer` (`train()`, a generator of `TrainEvent`s) and `cli` (the
command line's progress output).
"""
from ..loop import TrainEvent
from .cli import run_cli_training
from .config import TrainConfig
from .data import check_instance_data
from .trainer import _DreamBoothRun, train
from .validation import VALIDATION_DIR

__all__ = ["TrainConfig", "TrainEvent", "VALIDATION_DIR", "_DreamBoothRun", "check_instance_data",
           "run_cli_training", "train"]
