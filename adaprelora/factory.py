"""`create_optimizer(name, model, ...)`: every optimizer of the project by name, one signature."""
from __future__ import annotations

import contextlib
import io
import warnings
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


# -- the optimizers users pick instead, from their own pinned packages -----------------------------
# Each builder imports its package lazily (the library itself needs only torch), so a missing one is
# an ImportError naming the pip command, raised when that optimizer is asked for.

_PACKAGES = {"prodigy": ("prodigyopt", "prodigyopt==1.1.2"), "schedule-free": ("schedulefree", "schedulefree==1.4.1"),
             "adamw8bit": ("bitsandbytes", "bitsandbytes==0.50.2"), "adafactor": ("transformers", "transformers==5.23.0"),
             "lora-rite": ("pytorch_optimizer", "pytorch-optimizer==4.1.0")}


def _import(name: str):
    module, pin = _PACKAGES[name]
    try:
        return __import__(module)
    except ImportError:
        raise ImportError(f"optimizer {name!r} needs the {module} package: pip install {pin}") from None


# Optimizers whose lr is a multiplier of their own step-size estimate, with the value their authors
# document (the app sets it when one is picked; a much smaller lr hardly trains).
DOCUMENTED_LRS = {"prodigy": 1.0}


def _build_prodigy(model, *, lr, weight_decay: float = 0.0, use_bias_correction: bool = True,
                   safeguard_warmup: bool = True, **kw):
    """Prodigy (Mishchenko and Defazio 2024, https://huggingface.co/papers/2306.06101), the
    `prodigyopt` package's `Prodigy` (github.com/konstmish/prodigy), on every trainable tensor.

    Settings: those kohya-ss/sd-scripts and diffusers' DreamBooth LoRA scripts document for LoRA,
    `use_bias_correction=True`, `safeguard_warmup=True`, decoupled weight decay (`weight_decay` as
    given, default 0), the package's other defaults (betas (0.9, 0.999), d0 1e-6, d_coef 1).
    `lr` multiplies Prodigy's own step-size estimate: use 1.0 (a constant schedule or a decay).
    """
    _import("prodigy")
    from prodigyopt import Prodigy

    if lr < 0.1:
        warnings.warn(f"prodigy: lr={lr:g} scales Prodigy's own step-size estimate; the documented value is "
                      f"{DOCUMENTED_LRS['prodigy']}")
    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Using decoupled weight decay"
        return Prodigy(_trainable(model), lr=lr, weight_decay=weight_decay, use_bias_correction=use_bias_correction,
                       safeguard_warmup=safeguard_warmup, **kw)


def _build_adafactor(model, *, lr, **kw):
    """Adafactor (Shazeer and Stern 2018, https://huggingface.co/papers/1804.04235), transformers'
    `transformers.optimization.Adafactor`, on every trainable tensor, with an explicit learning rate:
    `relative_step=False, scale_parameter=False, warmup_init=False` (so `lr` and the trainer's
    schedule set the step size), the other settings transformers' defaults (no first moment,
    `clip_threshold=1.0`, `decay_rate=-0.8`, eps (1e-30, 1e-3), weight decay 0)."""
    _import("adafactor")
    from transformers.optimization import Adafactor

    for key in ("relative_step", "scale_parameter", "warmup_init"):
        kw.setdefault(key, False)
    return Adafactor(_trainable(model), lr=lr, **kw)


def _build_schedule_free(model, *, lr, **kw):
    """Schedule-Free AdamW (Defazio et al. 2024, https://huggingface.co/papers/2405.15682), the
    `schedulefree` package's `AdamWScheduleFree` (github.com/facebookresearch/schedule_free), on every
    trainable tensor with the package's defaults (betas (0.9, 0.999), no warm-up, weight decay 0).

    It keeps two points: the parameters hold the gradient point y while training and the average x
    (the weights to evaluate and save) after `optimizer.eval()`. It is returned in train mode; call
    `eval()` before evaluating, sampling or saving, and `train()` before the next step. The trainers
    do this for you (`adaprelora.training.options.optimizer_mode`). Meant for a constant
    learning-rate schedule (its own `warmup_steps=` replaces a warm-up schedule).
    """
    _import("schedule-free")
    from schedulefree import AdamWScheduleFree

    optimizer = AdamWScheduleFree(_trainable(model), lr=lr, **kw)
    optimizer.train()  # no state yet: this only sets the mode step() requires
    return optimizer


def _build_adamw8bit(model, *, lr, **kw):
    """8-bit AdamW (Dettmers et al. 2022, https://huggingface.co/papers/2110.02861), the
    `bitsandbytes` package's `bitsandbytes.optim.AdamW8bit`: AdamW with block-wise 8-bit moments
    (tensors under 4096 elements keep 32-bit ones), on every trainable tensor. Settings:
    bitsandbytes' defaults (betas (0.9, 0.999), eps 1e-8, weight decay 0.01, as torch's AdamW and
    our `adamw`). Runs on CUDA and, with bitsandbytes 0.50, on CPU."""
    _import("adamw8bit")
    from bitsandbytes.optim import AdamW8bit

    return AdamW8bit(_trainable(model), lr=lr, **kw)


def _build_lora_rite(model, *, lr, **kw):
    """LoRA-RITE (Yen et al. 2025, https://huggingface.co/papers/2410.20625), the `pytorch-optimizer`
    package's `LoRARite`: per-pair matrix preconditioning that is invariant to the pair's
    reparametrisation (B, A) -> (B S, S^-1 A), the transformation-invariant LoRA optimizer the
    AdaPreLoRA paper compares with. The package pairs consecutive parameters, so it is given each
    pair's A then B (`find_lora_pairs`), with the rank axis of B declared as dim 1 (PEFT's B is
    (out, r) or (out, r, 1, 1)); settings: the package's defaults (betas (0.9, 0.999), eps 1e-6,
    unmagnified-gradient clip 1.0, update skipping 1.0, weight decay 0). It steps LoRA pairs only:
    a model with other trainable tensors (DoRA magnitudes, modules_to_save) is a ValueError."""
    _import("lora-rite")
    from pytorch_optimizer.optimizer.lora_rite import LoRARite

    from .pairs import find_lora_pairs

    pairs = find_lora_pairs(model)
    in_pairs = {id(t) for pair in pairs for t in (pair.A, pair.B)}
    others = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in in_pairs]
    if not pairs or others:
        raise ValueError("lora-rite steps LoRA (lora_A/lora_B) pairs only, but "
                         + (f"{len(others)} trainable tensors are outside pairs (e.g. {others[0]}): freeze them "
                            "or pick another optimizer" if others else "the model has none"))
    kw.setdefault("lora_r_dim", 1)
    return LoRARite([t for pair in pairs for t in (pair.A, pair.B)], lr=lr, **kw)


_REGISTRY: dict[str, Callable] = {
    "adaprelora": _build_adaprelora,
    "adaprelora-sgd": _build_adaprelora_sgd,
    "adamw": _build_adamw,
    "loraplus": _build_loraplus,
    "scaled-gd": _build_scaled("gd"),
    "scaled-adamw": _build_scaled("adamw"),
    "lora-pro": _build_lora_pro,
    "prodigy": _build_prodigy,
    "adafactor": _build_adafactor,
    "schedule-free": _build_schedule_free,
    "adamw8bit": _build_adamw8bit,
    "lora-rite": _build_lora_rite,
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
