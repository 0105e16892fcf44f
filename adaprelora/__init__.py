"""adaprelora: LoRA training with AdaPreLoRA, the Adafactor-preconditioned LoRA optimizer."""
from .factory import available_optimizers, create_optimizer
from .pairs import LoraPair, find_lora_pairs

__version__ = "0.1.0"


def __getattr__(name):  # lazy: importing the package stays cheap for the CLIs
    if name == "AdaPreLoRA":
        from .optimizer import AdaPreLoRA

        return AdaPreLoRA
    if name in ("ScaledLoRA", "LoRAPro"):
        from . import baselines

        return getattr(baselines, name)
    raise AttributeError(name)


__all__ = ["AdaPreLoRA", "LoraPair", "available_optimizers", "create_optimizer", "find_lora_pairs"]
