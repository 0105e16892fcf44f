"""The stepping path of every LoRA-pair optimizer: one public function per rule, one private
helper that all the torch implementations go through.

As in `torch.optim.adam` (the class validates and keeps the state, `adam()` picks an
implementation, private functions do the maths on tensor lists): `adaprelora_step`,
`scaled_lora_step` and `lora_pro_step` take a bucket's factors and gradients as lists, its
stacked state and the hyperparameters; `_choose_impl` picks the fused Triton kernels
(`kernels.fused_step`) or the batched torch implementation; every torch implementation runs inside
`_bucket_step`, which stacks the bucket in the compute dtype, masks the pairs with a missing or
non-finite gradient or energy, gives those pairs their old state back and writes the others to
the parameters. The maths itself is `functional`'s.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import torch

from . import functional as F


class _Stacked(NamedTuple):
    """A bucket stacked in the compute dtype (`_stack_pairs`); A/gradA and B/gradB are views into
    one buffer each, so implementations can use the pairs [A; gA] and [B, gB] in one product."""

    XA: torch.Tensor  # (k, 2r, n): [A; gradA] per pair
    XB: torch.Tensor  # (k, 2, m, r): B, gradB per pair
    present: list  # the pairs that have both gradients

    @property
    def A(self):
        return self.XA.narrow(1, 0, self.XA.shape[1] // 2)

    @property
    def gradA(self):
        r = self.XA.shape[1] // 2
        return self.XA.narrow(1, r, r)

    @property
    def B(self):
        return self.XB.select(1, 0)

    @property
    def gradB(self):
        return self.XB.select(1, 1)


def _stack_pairs(A, B, gradA, gradB) -> _Stacked:
    """Stack a bucket's factors and gradients (zeros for a missing gradient) with one copy per side."""
    k, r, n, m = len(A), A[0].shape[0], A[0][0].numel(), B[0].shape[0]
    cdt = torch.promote_types(A[0].dtype, torch.float32)
    present = [ga is not None and gb is not None for ga, gb in zip(gradA, gradB)]
    if not all(present):
        gradA = [g if ok else torch.zeros_like(a) for g, a, ok in zip(gradA, A, present)]
        gradB = [g if ok else torch.zeros_like(b) for g, b, ok in zip(gradB, B, present)]
    XA = torch.stack([t for pair in zip(A, gradA) for t in pair]).view(k, 2 * r, n).to(cdt)
    XB = torch.stack([t for pair in zip(B, gradB) for t in pair]).view(k, 2, m, r).to(cdt)
    return _Stacked(XA, XB, present)


class _Bucket(NamedTuple):
    """What an implementation's update receives from `_bucket_step`."""

    x: _Stacked  # factors and gradients (zeros for the pairs left out)
    energies: tuple  # stacked (k, ...) energies, zeros for the pairs left out
    step: torch.Tensor  # (k,) new step counts, state["step"] itself (unchanged for the pairs left out)
    # (rows, A, B, views): the pairs to update, the parameters and the caller's cache of per-pair state
    # views, when an AdamW step may move them directly (`functional.factor_step_`'s `params`); None
    # when the factors must be copied back
    params: Optional[tuple]
    # False: nobody has checked the gradients yet; the update checks them before it moves any state
    # and returns None if one is non-finite (`_bucket_step`'s `update_checks_gradients`)
    gradients_checked: bool = True


def _finite_rows(*tensors: torch.Tensor) -> torch.Tensor:
    """(k,) True where the stacked tensors' rows are all finite: a sum is non-finite iff some
    element is (or the values overflow, which is no usable gradient either)."""
    total = tensors[0].sum(tuple(range(1, tensors[0].dim())))
    for t in tensors[1:]:
        total.add_(t.sum(tuple(range(1, t.dim()))))
    return torch.isfinite(total)


def _bucket_step(A, B, gradA, gradB, state: dict, update: Callable[[_Bucket], Optional[bool]], energies=None,
                 views: Optional[dict] = None, update_checks_gradients: bool = False) -> torch.Tensor:
    """The one stack / mask / restore / write-back of every torch implementation.

    Stacks the bucket (`_stack_pairs`), computes `energies(x)` if given (a tuple of (k, ...)
    tensors), leaves out the pairs with a missing gradient or a NaN/inf gradient or energy (their
    gradients and energies are zeroed so they cannot spread a NaN into batched algebra), runs
    `update(bucket)` (which moves `state` and either the stacked factors, returning False, or the
    parameters themselves, returning True), gives the pairs left out their old state back,
    advances the step counts and, after a False, copies the updated factors into the parameters.
    Returns ok (k,): the pairs that were updated.

    `update_checks_gradients`: the update reads a norm of every pair's gradients anyway (AdaPreLoRA's
    Grams), so when every gradient and energy is present and finite the separate pass over the
    gradients is skipped and the update is run with `gradients_checked=False`; it then returns None,
    having moved nothing, if a gradient is non-finite, and the bucket is stacked again and stepped
    with the pairs left out as above (the rare case).
    """
    x = _stack_pairs(A, B, gradA, gradB)
    k = len(A)
    if not any(x.present):
        return torch.zeros(k, dtype=torch.bool, device=x.XA.device)
    es = tuple(energies(x)) if energies is not None else ()
    direct = _writable(A, B, x.XA.dtype)
    if update_checks_gradients and all(x.present):
        ok = _finite_rows(*es) if es else torch.ones(k, dtype=torch.bool, device=x.XA.device)
        if bool(ok.all()):
            step = state["step"].add_(1)
            wrote = update(_Bucket(x, es, step, (range(k), A, B, views) if direct else None, False))
            if wrote is not None:
                if not wrote:
                    _write_back(A, B, x, range(k))
                return ok
            state["step"].sub_(1)  # nothing moved: a gradient is non-finite
            x = _stack_pairs(A, B, gradA, gradB)  # the update scaled the stacked gradients in place
    ok = _finite_rows(x.gradA, x.gradB, *es)
    if not all(x.present):
        ok &= torch.tensor(x.present, device=ok.device)
    all_ok = bool(ok.all())
    skipped = saved = None
    if not all_ok:
        if not bool(ok.any()):
            return ok
        zero = torch.zeros((), dtype=x.XA.dtype, device=x.XA.device)
        keep = ok[:, None, None]
        x.XA[:, x.XA.shape[1] // 2:] = torch.where(keep, x.gradA, zero)
        x.XB[:, 1] = torch.where(keep, x.gradB, zero)
        es = tuple(torch.where(ok.view((k,) + (1,) * (e.dim() - 1)), e, zero) for e in es)
        skipped = (~ok).nonzero().flatten()
        saved = {name: t[skipped].clone() for name, t in state.items()}
    step = state["step"].add_(ok.to(state["step"].dtype))  # the pairs left out keep their count
    targets = range(k) if all_ok else ok.nonzero().flatten().tolist()
    wrote = update(_Bucket(x, es, step, (targets, A, B, views) if direct else None))
    if saved is not None:
        for name, value in saved.items():
            state[name][skipped] = value
    if not wrote:
        _write_back(A, B, x, targets)
    return ok


def _write_back(A, B, x: _Stacked, targets) -> None:
    """Copy the stacked factors' rows `targets` into the parameters (cast to their dtype)."""
    k = len(A)
    A_new, B_new = x.A.view((k,) + A[0].shape).unbind(0), x.B.view((k,) + B[0].shape).unbind(0)
    torch._foreach_copy_([A[j] for j in targets] + [B[j] for j in targets],
                         [A_new[j] for j in targets] + [B_new[j] for j in targets])


def _uniform(lists, dtype: torch.dtype) -> bool:
    """Every tensor of the lists present, of `dtype` and contiguous."""
    return all(t is not None and t.dtype == dtype and t.is_contiguous() for ts in lists for t in ts)


def _writable(A, B, dtype: torch.dtype) -> bool:
    """An AdamW step can move these factors in place with the fused kernel: contiguous, in the
    compute dtype (a bf16 factor steps on its float32 copy, then is copied back)."""
    return F.fused_adamw_ok(A[0]) and _uniform((A, B), dtype)


def _fusable(*lists) -> bool:
    """Every tensor present, contiguous, float32/bfloat16/float16, and of one dtype."""
    dtype = lists[0][0].dtype
    return dtype in (torch.float32, torch.bfloat16, torch.float16) and _uniform(lists, dtype)


def _choose_impl(backend: str, A, B, gradA, gradB, *, fusable: bool = True) -> Optional[Callable]:
    """The implementation for one bucket, as torch's `_default_to_fused_or_foreach`: the fused
    Triton step (`kernels.fused_step.fused_bucket_step`) when `backend` is "triton" (resolved by
    `kernels.resolve_backend`), the rule allows it (`fusable`) and every factor and gradient is
    present, contiguous and of one float32/bfloat16/float16 dtype; None (the torch path) otherwise."""
    if backend not in ("torch", "triton"):
        raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")
    if backend == "triton" and fusable and _fusable(A, B, gradA, gradB):
        from .kernels.fused_step import fused_bucket_step

        return fused_bucket_step
    return None


def _stacked_energies(e, k: int):
    """(k, d) energies from a tensor or a complete list of (d,) tensors."""
    return e if isinstance(e, torch.Tensor) else torch.stack(list(e))


def _complete_energies(row, col, k: int, stacked: Callable[[], _Stacked], scale, stats: str, damping: float):
    """Row and column energies, (k, m) / (k, n), with the missing ones (row/col None, or None
    entries: a pair the hooks missed) computed from the stacked bucket `stacked()`: the tangent
    projection's (`stats="tangent"`) or the raw surrogate's (`stats="raw"`)."""
    if row is not None and (isinstance(row, torch.Tensor) or all(e is not None for e in row)):
        return _stacked_energies(row, k), _stacked_energies(col, k)
    x = stacked()
    inv_s = 1.0 / scale.to(device=x.XA.device, dtype=x.XA.dtype).reshape(-1, 1, 1)
    gA, gB = x.gradA * inv_s, x.gradB * inv_s
    if stats == "raw":
        t_row, t_col = F.raw_surrogate_energies(x.A, x.B, gA, gB)
    elif stats == "tangent":
        t_row, t_col = F.tangent_energies(x.A, x.B, gA, gB, damping)
    else:
        raise ValueError(f"stats must be 'tangent' or 'raw' for energies not given, got {stats!r}")
    if row is None:
        return t_row, t_col
    row = torch.stack([t if e is None else e.to(t.dtype) for t, e in zip(t_row, row)])
    col = torch.stack([t if e is None else e.to(t.dtype) for t, e in zip(t_col, col)])
    return row, col


# -- AdaPreLoRA ------------------------------------------------------------------------------------
def adaprelora_step(A: Sequence[torch.Tensor], B: Sequence[torch.Tensor], gradA: Sequence[Optional[torch.Tensor]],
                    gradB: Sequence[Optional[torch.Tensor]], row, col, state: dict, scale: torch.Tensor, lr, *,
                    lr_B=None, variant: str = "adamw", betas=(0.9, 0.999), eps: float = 1e-8,
                    weight_decay: float = 0.0, momentum: float = 0.0, momentum_before_solve: bool = False,
                    decay_rate: float = -0.8, eps_factored: float = 1e-30, clip_threshold: Optional[float] = 1.0,
                    damping: float = 0.1, rebalance: bool = True, stats: str = "tangent",
                    relative_step: bool = False, relative_step_eps: float = 1e-3, energy_ema: str = "squared",
                    backend: str = "torch", views: Optional[dict] = None) -> torch.Tensor:
    """One AdaPreLoRA step (spec 3.1 to 3.5) for a bucket of k pairs of equal (m, n, r, dtype).

    Args:
        A, B: the k factors (r, n) / (m, r) (conv: (r, in, kh, kw) / (out, r, 1, 1)); updated in place.
        gradA, gradB: their `.grad`s (the LoRA scale s included); None for a pair without
            gradients, which is left untouched.
        row, col: gradient energies, (k, m) / (k, n) or lists of (m,) / (n,); None (or None
            entries) for energies to compute from the gradients as `stats` says.
        state: the bucket's stacked state (`base.Bucket.state`), updated in place.
        scale: (k,) LoRA scales s. lr: the learning rate; lr_B: B's when it differs (B in its own
            param group, kohya's LoRA+), else None.
        momentum_before_solve: feed the solve the bias-corrected EMA of the gradients (state
            "grad_ema_A/B"; sgd variant; torch path).
        relative_step: sgd variant: scale lr per pair by max(relative_step_eps, RMS(s B A)),
            Adafactor's relative step size (`functional.relative_step_scale`; torch path).
        energy_ema: "squared" (Adafactor's EMA of the energies, then the square root) or "root"
            (EMA of their square roots; torch path). See `functional.adafactor_accumulators`.
        backend: "torch" or "triton" (CUDA tensors, or the CPU interpreter); `_choose_impl`
            falls back to torch for a bucket the kernels do not take.
        views: a dict the caller keeps with `state` between steps, where the torch path caches
            per-pair views of the stacked state (k views per tensor and step otherwise); None: none kept.
    Returns:
        ok (k,) bool: the pairs that were updated; the others (no gradient, or a NaN/inf gradient
        or energy) kept their factors and state.
    """
    hyper = dict(lr_B=lr_B, variant=variant, betas=betas, eps=eps, weight_decay=weight_decay, momentum=momentum,
                 decay_rate=decay_rate, eps_factored=eps_factored, clip_threshold=clip_threshold, damping=damping,
                 rebalance=rebalance)
    fusable = not (momentum_before_solve or relative_step) and energy_ema == "squared"
    impl = _choose_impl(backend, A, B, gradA, gradB, fusable=fusable)
    if impl is not None:
        row, col = _complete_energies(row, col, len(A), lambda: _stack_pairs(A, B, gradA, gradB), scale, stats,
                                      damping)
        return impl(A, B, gradA, gradB, row, col, state, scale, lr, **hyper)
    return _torch_adaprelora_step(A, B, gradA, gradB, row, col, state, scale, lr, stats=stats,
                                  momentum_before_solve=momentum_before_solve, relative_step=relative_step,
                                  relative_step_eps=relative_step_eps, energy_ema=energy_ema, views=views, **hyper)


def _torch_adaprelora_step(A, B, gradA, gradB, row, col, state, scale, lr, *, lr_B, variant, betas, eps,
                           weight_decay, momentum, momentum_before_solve, decay_rate, eps_factored, clip_threshold,
                           damping, rebalance, stats, relative_step=False, relative_step_eps=1e-3,
                           energy_ema="squared", views=None) -> torch.Tensor:
    cdt = torch.promote_types(A[0].dtype, torch.float32)
    inv_s = scale.to(device=A[0].device, dtype=cdt).reciprocal().view(-1, 1, 1)

    def energies(x):
        return _complete_energies(row, col, len(A), lambda: x, scale, stats, damping)

    def update(b: _Bucket) -> Optional[bool]:
        x, (rows, cols), step = b.x, b.energies, b.step
        if momentum_before_solve:
            F.gradient_ema_(state["grad_ema_A"], state["grad_ema_B"], x.gradA, x.gradB, step, betas[0])
        R, C = state["adafactor_row"], state["adafactor_col"]
        # unchecked gradients: the accumulators move only once the Grams show them finite
        accumulate = F.adafactor_accumulators_ if b.gradients_checked else F.adafactor_accumulators
        R_new, C_new, p, q = accumulate(R, C, rows, cols, torch.clamp(step, min=1), decay_rate, eps_factored,
                                        energy_ema)
        grams = F.balanced_grams_(x.XA, x.XB, p, q, inv_s)
        if not b.gradients_checked:
            if not bool(grams.finite().all()):
                return None
            R.copy_(R_new)
            C.copy_(C_new)
        # the weight before this step (Adafactor's RMS(X_{t-1})), read before the factors move
        rel = F.relative_step_scale(x.A, x.B, inv_s, relative_step_eps)[:, None, None] if relative_step else None
        dA, dB = F.balanced_directions(x.XA, x.XB, grams, damping, clip_threshold)
        return F.factor_step_(x.A, x.B, dA, dB, state, step, variant=variant, lr=lr, lr_B=lr_B, betas=betas,
                              eps=eps, weight_decay=weight_decay, momentum=momentum, sgd_scale=inv_s,
                              rebalance_sgd=rebalance, lr_scale=rel, params=b.params)

    # momentum before the solve moves its gradient EMAs before the Grams: it needs checked gradients
    return _bucket_step(A, B, gradA, gradB, state, update, energies, views,
                        update_checks_gradients=not momentum_before_solve)


# -- the preconditioned baselines (torch only) -----------------------------------------------------
def scaled_lora_step(A, B, gradA, gradB, state: dict, lr, *, lr_B=None, variant: str = "adamw", reg: float = 1e-6,
                     betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                     momentum: float = 0.0, views: Optional[dict] = None) -> torch.Tensor:
    """One Scaled GD / Scaled AdamW step (Zhang and Pilanci 2024) for a bucket: the gradients
    preconditioned by (B^T B + reg I)^-1 and (A A^T + reg I)^-1 (`functional.scaled_gradients`),
    then SGD ("sgd", with heavy-ball `momentum`) or AdamW ("adamw"). Arguments as `adaprelora_step`."""

    def update(b: _Bucket) -> bool:
        x = b.x
        dA, dB = F.scaled_gradients(x.A, x.B, x.gradA, x.gradB, reg)
        return F.factor_step_(x.A, x.B, dA, dB, state, b.step, variant=variant, lr=lr, lr_B=lr_B, betas=betas,
                              eps=eps, weight_decay=weight_decay, momentum=momentum, params=b.params)

    return _bucket_step(A, B, gradA, gradB, state, update, views=views)


def lora_pro_step(A, B, gradA, gradB, state: dict, scale: torch.Tensor, lr, *, lr_B=None, reg: float = 1e-6,
                  betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                  views: Optional[dict] = None) -> torch.Tensor:
    """One LoRA-Pro step (Wang et al. 2025, efficient mode) for a bucket: the factor gradients
    whose equivalent gradient is the Frobenius projection of the full one
    (`functional.lora_pro_gradients`), then AdamW. Arguments as `adaprelora_step`."""

    def update(b: _Bucket) -> bool:
        x = b.x
        s = scale.to(device=x.XA.device, dtype=x.XA.dtype).reshape(-1, 1, 1)
        dA, dB = F.lora_pro_gradients(x.A, x.B, x.gradA, x.gradB, s, reg)
        return F.factor_step_(x.A, x.B, dA, dB, state, b.step, variant="adamw", lr=lr, lr_B=lr_B, betas=betas,
                              eps=eps, weight_decay=weight_decay, params=b.params)

    return _bucket_step(A, B, gradA, gradB, state, update, views=views)


__all__ = ["adaprelora_step", "lora_pro_step", "scaled_lora_step"]
