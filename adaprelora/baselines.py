"""Published LoRA optimizers in the same framework, for comparison runs (spec section 5).

`adamw` and `loraplus` are plain `torch.optim.AdamW` (see `factory.py`); the two preconditioned
methods below share AdaPreLoRA's pair discovery, batching and state handling (`base.py`) and its
stepping path (`step.py`: `scaled_lora_step`, `lora_pro_step`).
"""
from __future__ import annotations

from typing import Iterable, Optional, Tuple, Union

from torch import nn

from .base import LoRAPairOptimizer
from .step import lora_pro_step, scaled_lora_step


class ScaledLoRA(LoRAPairOptimizer):
    r"""Riemannian preconditioned LoRA, "Scaled GD" / "Scaled AdamW" (Zhang and Pilanci 2024,
    *Riemannian Preconditioned LoRA for Fine-Tuning Foundation Models*,
    https://huggingface.co/papers/2402.02347). Reference: github.com/pilancilab/Riemannian_Preconditioned_LoRA.

    .. math::
        \tilde g_A = (B^\top B + \mathrm{reg}\, I)^{-1} \nabla_A,\quad
        \tilde g_B = \nabla_B (A A^\top + \mathrm{reg}\, I)^{-1}

    then SGD (`variant="gd"`: A -= lr g_A, B -= lr g_B) or AdamW on (g_A, g_B) (`variant="adamw"`).

    Args:
        params: a model, or parameters / groups (pairs found by `pairs_from`, as in AdaPreLoRA, or
            given with `pairs=[(A, B, scale), ...]`; `lora_scale` as in AdaPreLoRA)
        lr (float): learning rate (default: 1e-3)
        variant (str): "gd" or "adamw" (default: "adamw")
        reg (float): ridge on the r x r Grams (default: 1e-6)
        betas, eps, weight_decay: AdamW's (defaults (0.9, 0.999), 1e-8, 0)
        momentum (float): heavy-ball momentum for "gd" (default: 0)
    """

    def __init__(self, params: Union[nn.Module, Iterable], lr: float = 1e-3, *, variant: str = "adamw",
                 reg: float = 1e-6, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.0, nonfinite: str = "skip", pairs=None,
                 pairs_from: Optional[str] = None, lora_scale=None):
        if variant not in ("gd", "adamw"):
            raise ValueError(f"variant must be 'gd' or 'adamw', got {variant!r}")
        if not reg > 0:
            raise ValueError(f"Invalid reg: {reg} (must be positive)")
        defaults = dict(lr=lr, reg=reg, betas=tuple(betas), eps=eps, weight_decay=weight_decay, momentum=momentum)
        super().__init__(params, defaults, variant="sgd" if variant == "gd" else "adamw",
                         pairs=pairs, nonfinite=nonfinite, pairs_from=pairs_from, lora_scale=lora_scale)

    def _step_bucket(self, bucket, pairs):
        g = bucket.group
        return scaled_lora_step(*self._factors(pairs), bucket.state, g["lr"], lr_B=bucket.group_B["lr"],
                                variant=self.variant, reg=g["reg"], betas=g["betas"], eps=g["eps"],
                                weight_decay=g["weight_decay"], momentum=g["momentum"], views=bucket.views)


class LoRAPro(LoRAPairOptimizer):
    r"""LoRA-Pro, efficient mode (Wang et al. 2025, *LoRA-Pro: Are Low-Rank Adapters Properly
    Optimized?*, https://huggingface.co/papers/2407.18242). Reference: github.com/mrflogs/LoRA-Pro.

    Replaces the LoRA gradients by the factor gradients whose equivalent weight gradient
    s (B g_A + g_B A) is closest (Frobenius) to the full gradient G:

    .. math::
        g_A = s^{-2}(B^\top B)^{-1}\nabla_A + XA,\quad
        g_B = s^{-2}[I - B(B^\top B)^{-1}B^\top]\nabla_B (AA^\top)^{-1} - BX,

    with X solving B^T B X + X A A^T = -s^{-2} (B^T B)^{-1} \nabla_A A^T (the choice nearest the
    plain LoRA gradients; solved with real symmetric eigendecompositions), then AdamW in factor
    space. State is AdamW's, O((m+n) r) per pair (the paper's "full" mode with m x n moments is
    not offered). Matches the `lora-pro-adamw` package's efficient mode with
    `efficient_solver="eig"`; its default `"vec"` solver swaps the two Grams of the Sylvester
    equation (docs/algorithm.md, section 5).

    Args:
        params: a model, or parameters / groups (pairs found by `pairs_from`, as in AdaPreLoRA, or
            given with `pairs=[(A, B, scale), ...]`; `lora_scale` as in AdaPreLoRA)
        lr (float): learning rate (default: 1e-3)
        reg (float): ridge on B^T B and A A^T (default: 1e-6)
        betas, eps, weight_decay: AdamW's (defaults (0.9, 0.999), 1e-8, 0)
    """

    def __init__(self, params: Union[nn.Module, Iterable], lr: float = 1e-3, *, reg: float = 1e-6,
                 betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 nonfinite: str = "skip", pairs=None, pairs_from: Optional[str] = None, lora_scale=None):
        if not reg > 0:
            raise ValueError(f"Invalid reg: {reg} (must be positive)")
        defaults = dict(lr=lr, reg=reg, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults, variant="adamw", pairs=pairs, nonfinite=nonfinite, pairs_from=pairs_from,
                         lora_scale=lora_scale)

    def _step_bucket(self, bucket, pairs):
        g = bucket.group
        return lora_pro_step(*self._factors(pairs), bucket.state, self._scales(bucket, pairs), g["lr"],
                             lr_B=bucket.group_B["lr"], reg=g["reg"], betas=g["betas"], eps=g["eps"],
                             weight_decay=g["weight_decay"], views=bucket.views)
