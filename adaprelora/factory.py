"""`create_optimizer(name, model, ...)`: every optimizer of the project by name, one signature."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: add a LoRA adapter first")
    return params


def _build_adamw(model, *, lr, **kw):
    """AdamW (Loshchilov and Hutter 2019) on every trainable tensor, A and B independently."""
    kw.setdefault("foreach", None)
    return torch.optim.AdamW(_trainable(model), lr=lr, **kw)


def _build_loraplus(model, *, lr, loraplus_lr_ratio: float = 16.0, **kw):
    """LoRA+ (Hayou, Ghosh and Yu 2024, https://huggingface.co/papers/2402.12354): AdamW with
    B's learning rate = `loraplus_lr_ratio` x A's (default 16); other tensors use `lr`."""
    from .pairs import find_lora_pairs

    if loraplus_lr_ratio <= 0:
        raise ValueError(f"Invalid loraplus_lr_ratio: {loraplus_lr_ratio}")
    b_ids = {id(pair.B) for pair in find_lora_pairs(model)}
    params = _trainable(model)
    groups = [
        {"params": [p for p in params if id(p) not in b_ids], "lr": lr},
        {"params": [p for p in params if id(p) in b_ids], "lr": lr * loraplus_lr_ratio},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, **kw)


def _build_adaprelora(model, *, lr, **kw):
    from .optimizer import AdaPreLoRA

    return AdaPreLoRA(model, lr=lr, **kw)


def _build_adaprelora_sgd(model, *, lr, **kw):
    from .optimizer import AdaPreLoRA

    if kw.setdefault("variant", "sgd") != "sgd":
        raise ValueError("adaprelora-sgd is AdaPreLoRA with variant='sgd'; use 'adaprelora' for AdamW")
    return AdaPreLoRA(model, lr=lr, **kw)


def _build_scaled(variant: str) -> Callable:
    def build(model, *, lr, **kw):
        from .baselines import ScaledLoRA

        return ScaledLoRA(model, lr=lr, variant=variant, **kw)

    build.__doc__ = f"Scaled {variant.upper() if variant == 'gd' else 'AdamW'}: see ScaledLoRA."
    return build


def _build_lora_pro(model, *, lr, **kw):
    from .baselines import LoRAPro

    return LoRAPro(model, lr=lr, **kw)


_REGISTRY: dict[str, Callable] = {
    "adaprelora": _build_adaprelora,
    "adaprelora-sgd": _build_adaprelora_sgd,
    "adamw": _build_adamw,
    "loraplus": _build_loraplus,
    "scaled-gd": _build_scaled("gd"),
    "scaled-adamw": _build_scaled("adamw"),
    "lora-pro": _build_lora_pro,
}


def available_optimizers() -> list[str]:
    """Names accepted by `create_optimizer`, AdaPreLoRA first."""
    return list(_REGISTRY)


def canonical_name(name: str) -> str:
    """An optimizer name as the registry spells it: case-insensitive, `_` and `-` alike."""
    return str(name).strip().lower().replace("_", "-")


def create_optimizer(name: str, model: nn.Module, *, lr: float, **kwargs) -> torch.optim.Optimizer:
    """Build optimizer `name` (case-insensitive, `_` and `-` alike) over `model`'s trainable tensors.

    Keyword arguments go to that optimizer (e.g. `weight_decay`, `betas`, `loraplus_lr_ratio`,
    `reg`, `stats`, `damping`, `variant`). An unknown name is a ValueError listing the choices.
    """
    key = canonical_name(name)
    if key not in _REGISTRY:
        raise ValueError(f"unknown optimizer {name!r}; available: {', '.join(available_optimizers())}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"create_optimizer expects an nn.Module, got {type(model).__name__}")
    if lr is None or not lr > 0:
        raise ValueError(f"Invalid learning rate: {lr}")
    try:
        return _REGISTRY[key](model, lr=lr, **kwargs)
    except TypeError as err:
        if "unexpected keyword" in str(err):
            raise ValueError(f"optimizer {key!r}: {err}") from None
        raise
