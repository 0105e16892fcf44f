"""The AdaPreLoRA optimizer: Adafactor-preconditioned, balanced LoRA factor steps."""
from __future__ import annotations

from typing import Iterable, Optional, Tuple, Union

from torch import nn

from .base import LoRAPairOptimizer
from .functional import ENERGY_EMAS
from .kernels import resolve_backend, triton_energy_functions
from .step import adaprelora_step


class AdaPreLoRA(LoRAPairOptimizer):
    r"""AdaPreLoRA: *Adafactor Preconditioned Low-Rank Adaptation* (Liu, Bian and Cai 2026,
    https://huggingface.co/papers/2605.08734).

    For each LoRA pair (W_eff = W0 + s B A) it keeps Adafactor's row and column accumulators
    of the full weight gradient G (R in R^m, C in R^n) and takes the factor step whose weight step
    is the closest LoRA step to Adafactor's, in Adafactor's own metric H = diag(p) (x) diag(q):

    .. math::
        M_B = B^\top P B + \lambda_B I,\; M_A = A Q A^\top + \lambda_A I,\; K = g_A A^\top \\
        dA = M_B^{-1}(g_A Q^{-1} - \tfrac12 K M_A^{-1} A),\;
        dB = (P^{-1} g_B - \tfrac12 B M_B^{-1} K) M_A^{-1}

    then clips RMS(B dA + dB A) at `clip_threshold` and feeds (dA, dB) to AdamW
    (`variant="adamw"`) or steps A -= (lr/s) dA, B -= (lr/s) dB and rebalances (`variant="sgd"`).
    Trainable tensors outside LoRA pairs get plain AdamW with the same lr and betas.
    `docs/algorithm.md` has the full rule; optimizer state is AdamW's plus m + n floats per pair.

    Args:
        params (nn.Module or iterable): a model (pairs found by `find_lora_pairs`, all trainable
            tensors optimized) or parameters / param groups together with `pairs`.
        lr (float): learning rate; factor-space like AdamW's for "adamw", a W-space step size
            for "sgd" (default: 1e-3)
        variant (str): "adamw" or "sgd" (default: "adamw")
        stats (str, optional): gradient energies, "exact" (backward hooks; needs a model),
            "tangent" (from .grad alone) or "raw" (the paper's surrogate gB A + B gA, from .grad;
            for ablations). Default: "exact" with a model, else "tangent".
        betas (Tuple[float, float]): AdamW's (default: (0.9, 0.999))
        eps (float): AdamW's (default: 1e-8)
        weight_decay (float): decoupled weight decay (default: 0)
        momentum (float): heavy-ball momentum of the sgd variant, on the solved step (default: 0)
        momentum_before_solve (bool): sgd variant only: feed the solve a bias-corrected EMA (beta =
            betas[0]) of the factor gradients instead of the gradients, Adafactor-with-momentum
            style; an ablation of where momentum goes, not the default (default: False). With it
            the sgd step keeps the Adafactor row/column scaling of the solve ("two-sided diagonal
            whitening on momentum"); `clip_threshold` and `relative_step` complete Adafactor's step.
        relative_step (bool): sgd variant only: Adafactor's relative step size, lr scaled per pair
            by max(relative_step_eps, RMS(s B A)) (the adapter's weight before the step; it starts
            at zero, so early steps are lr * relative_step_eps) (default: False)
        relative_step_eps (float): Adafactor's eps2, the floor of that scale (default: 1e-3)
        energy_ema (str): "squared" (Adafactor's: EMA of the row/column energies, then the square
            root) or "root" (EMA of their square roots; an ablation) (default: "squared")
        decay_rate (float): Adafactor's beta2_t = 1 - t ** decay_rate (default: -0.8)
        eps_factored (float): Adafactor's epsilon on the energies (default: 1e-30)
        clip_threshold (float, optional): update clipping on RMS(Delta); None disables (default: 1.0)
        damping (float): ridge as a fraction of the Gram matrices' mean eigenvalue (default: 0.1)
        nonfinite (str): "skip" (leave the pair untouched, warn once) or "raise" (default: "skip")
        backend (str): "auto", "torch" or "triton" (default: "auto": Triton on CUDA if importable)
        pairs (list, optional): [(A, B, scale), ...] when params are bare tensors
        pairs_from (str, optional): how to find the pairs of a parameter list without `pairs`:
            "names" ((name, tensor) items, e.g. `model.named_parameters()`), "order" (each
            lora_down/lora_A directly followed by its lora_up/lora_B, or kohya's LoRA+ groups),
            "none" (only `pairs`). Default: "names" for named items, else "order".
            `docs/integrations.md` shows it in kohya, diffusers' scripts and TRL.
        lora_scale (float or list, optional): the LoRA scale s (alpha / r) of the pairs found in a
            parameter list, one for all or one per pair; default 1. It cancels out of the "adamw"
            variant's step; the "sgd" variant's weight step is lr * s_true / lora_scale.
    """

    def __init__(self, params: Union[nn.Module, Iterable], lr: float = 1e-3, *, variant: str = "adamw",
                 stats: Optional[str] = None, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.0, decay_rate: float = -0.8,
                 eps_factored: float = 1e-30, clip_threshold: Optional[float] = 1.0, damping: float = 0.1,
                 nonfinite: str = "skip", backend: str = "auto", pairs=None, momentum_before_solve: bool = False,
                 pairs_from: Optional[str] = None, lora_scale=None, relative_step: bool = False,
                 relative_step_eps: float = 1e-3, energy_ema: str = "squared"):
        has_model = isinstance(params, nn.Module)
        if stats is None:
            stats = "exact" if has_model and pairs is None else "tangent"
        if stats not in ("exact", "tangent", "raw"):
            raise ValueError(f"stats must be 'exact', 'tangent' or 'raw', got {stats!r}")
        if stats == "exact" and not has_model:
            raise ValueError(
                "stats='exact' reads each layer's input and output gradient with hooks, so it needs "
                "the model: pass AdaPreLoRA(model, ...), or build it from the parameters and call "
                "optimizer.attach(model), or use stats='tangent' with bare parameters"
            )
        if not decay_rate < 0:
            raise ValueError(f"Invalid decay_rate: {decay_rate} (must be negative, e.g. -0.8)")
        if clip_threshold is not None and not clip_threshold > 0:
            raise ValueError(f"Invalid clip_threshold: {clip_threshold} (positive, or None to disable)")
        if not damping >= 0:
            raise ValueError(f"Invalid damping: {damping}")
        if momentum and variant != "sgd":
            raise ValueError("momentum applies to variant='sgd' only (the adamw variant has betas)")
        if momentum_before_solve and (variant != "sgd" or momentum):
            raise ValueError("momentum_before_solve needs variant='sgd' and momentum=0 (its EMA uses betas[0])")
        if relative_step and variant != "sgd":
            raise ValueError("relative_step needs variant='sgd' (it scales the W-space step size; the adamw "
                             "variant's Adam moments normalise the step's scale anyway)")
        if not relative_step_eps > 0:
            raise ValueError(f"Invalid relative_step_eps: {relative_step_eps} (must be positive, e.g. 1e-3)")
        if energy_ema not in ENERGY_EMAS:
            raise ValueError(f"energy_ema must be one of {', '.join(map(repr, ENERGY_EMAS))}, got {energy_ema!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, momentum=momentum,
                        decay_rate=decay_rate, eps_factored=eps_factored, clip_threshold=clip_threshold,
                        damping=damping)
        super().__init__(params, defaults, variant=variant, pairs=pairs, nonfinite=nonfinite, pairs_from=pairs_from,
                         lora_scale=lora_scale)
        self._scale_given = pairs is not None or lora_scale is not None
        self.stats = stats
        self.momentum_before_solve = bool(momentum_before_solve)
        self.relative_step = bool(relative_step)
        self.relative_step_eps = float(relative_step_eps)
        self.energy_ema = energy_ema
        self.backend = resolve_backend(backend, self.pairs[0].A.device)
        self._collector = None
        if stats == "exact":
            from .stats import ExactEnergyCollector

            energy_fn, conv_fn = self._energy_functions()
            self._collector = ExactEnergyCollector(self.pairs, energy_fn, conv_fn)

    def _energy_functions(self):
        return triton_energy_functions() if self.backend == "triton" else (None, None)

    # -- public extras ----------------------------------------------------------------------
    def set_grad_scaler(self, scaler) -> None:
        """Under fp16 loss scaling (torch.amp.GradScaler, accelerate's `accelerator.scaler`), tell
        the optimizer the scaler so the exact energies, read during the scaled backward, are
        divided by the scale like the gradients are."""
        if self._collector is not None:
            self._collector.set_grad_scaler(scaler)

    def attach(self, *models: nn.Module) -> "AdaPreLoRA":
        """Switch an optimizer built from a parameter list to exact energies: hook the LoRA layers
        of `models` (a PEFT model, a diffusers UNet and text encoder, a kohya-style network) whose
        weights are the pairs' tensors, matched by identity. A PEFT layer's own scale replaces the
        default 1 unless `lora_scale` or `pairs` gave one. Call it before the first step."""
        from .pairs import bind_pair_modules
        from .stats import ExactEnergyCollector

        if self.stats == "raw":
            raise ValueError("attach() switches to exact energies, but this optimizer was built with stats='raw': "
                             "leave attach() out to keep the raw surrogate, or build it without stats='raw'")
        bind_pair_modules(self.pairs, models, adopt_scale=not self._scale_given)
        if self._collector is not None:
            self._collector.remove()
        energy_fn, conv_fn = self._energy_functions()
        self._collector = ExactEnergyCollector(self.pairs, energy_fn, conv_fn)
        self.stats = "exact"
        return self

    def remove_hooks(self) -> None:
        """Remove the backward hooks of `stats="exact"` (the optimizer then falls back to tangent
        energies, with a warning, if stepped again)."""
        if self._collector is not None:
            self._collector.remove()

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        if self._collector is not None:
            self._collector.reset()

    # -- the rule ---------------------------------------------------------------------------
    def _extra_pair_state(self, m: int, n: int, r: int) -> dict:
        extra = {"adafactor_row": (m,), "adafactor_col": (n,)}
        if self.momentum_before_solve:
            extra.update(grad_ema_A=(r, n), grad_ema_B=(m, r))
        return extra

    def _before_pairs(self) -> None:
        if self._collector is not None:
            self._collector.synchronize()

    def _after_pairs(self) -> None:
        if self._collector is not None:
            self._collector.reset()

    def _energies(self, bucket):
        """The exact energies the hooks collected for a bucket (lists, None for a layer they
        missed), or None: `adaprelora_step` computes the missing ones as `stats` says."""
        if self._collector is None:
            return None, None
        rows, cols = self._collector.take(bucket.pair_ids)
        if any(r is None for r in rows):
            self._warn_once("no-energies", "stats='exact': some LoRA layers had gradients but no hooked backward "
                            "(hooks removed, or run outside the model): using tangent energies for them")
        return rows, cols

    def _step_bucket(self, bucket, pairs):
        rows, cols = self._energies(bucket)
        g = bucket.group
        return adaprelora_step(
            *self._factors(pairs), rows, cols, bucket.state, self._scales(bucket, pairs), g["lr"], lr_B=bucket.group_B["lr"],
            variant=self.variant, betas=g["betas"], eps=g["eps"], weight_decay=g["weight_decay"],
            momentum=g["momentum"], momentum_before_solve=self.momentum_before_solve, decay_rate=g["decay_rate"],
            eps_factored=g["eps_factored"], clip_threshold=g["clip_threshold"], damping=g["damping"],
            stats="tangent" if self.stats == "exact" else self.stats, relative_step=self.relative_step,
            relative_step_eps=self.relative_step_eps, energy_ema=self.energy_ema, backend=self.backend,
            views=bucket.views)
