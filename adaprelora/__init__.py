"""adaprelora: LoRA training with AdaPreLoRA, the Adafactor-preconditioned LoRA optimizer."""
import logging

from .factory import available_optimizers, create_optimizer
from .pairs import LoraPair, find_lora_pairs

__version__ = "0.1.0"

# peft imports bitsandbytes (our `adamw8bit`) whenever it is installed, and bitsandbytes 0.50 then
# logs, on CPUs with AVX512-BF16, that an optional 4-bit CPU kernel package is missing. Nothing here
# uses 4-bit kernels: that one logger is kept quiet.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def __getattr__(name):  # lazy: importing the package stays cheap for the CLIs
    if name == "AdaPreLoRA":
        from .optimizer import AdaPreLoRA

        return AdaPreLoRA
    if name in ("ScaledLoRA", "LoRAPro"):
        from . import baselines

        return getattr(baselines, name)
    raise AttributeError(name)


__all__ = ["AdaPreLoRA", "LoraPair", "available_optimizers", "create_optimizer", "find_lora_pairs"]
